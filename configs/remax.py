r"""ReMax (Li et al. 2023, arXiv 2310.10505): REINFORCE with the greedy decode's reward as baseline.

Per prompt the rollout draws rollout.num_policy samples and one greedy (temperature-0) decode of the
current policy; each sample's advantage is r̃(y) − r̃(ȳ) with r̃ = r − β·log(π/π_ref) (ALGORITHMS.md
§5.10; the baseline depends on the prompt only, so the estimator is unbiased). The exact metrics
compare the policy with π_ref·exp(r/β).

  python -m align_jax.main --config=configs/remax.py
  python -m align_jax.main --config=configs/remax.py:smoke

Expected (default): exact/reward rises and exact/kl_policy_target falls.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "remax"
  c.objective = "remax"
  config_lib.set_model(c, arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 2
  c.loss.beta = 1.0  # KL coefficient of the penalised reward.
  c.target.kind = "rlhf"
  c.target.beta = c.loss.get_ref("beta")
  if arg.smoke:
    config_lib.smoke(c)
  return c
