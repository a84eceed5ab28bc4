r"""REINFORCE on the KL-penalised reward r − β·log(π/π_ref): the RLHF baseline, without a baseline.

K = rollout.num_policy samples per prompt, each pushed by its own penalised reward (Williams
1992); loss.baseline = loo subtracts the mean of the other K − 1 (that is configs/rloo.py). The
expected gradient is −∇(E_π[r] − β·KL(π‖π_ref)) (ALGORITHMS.md §1.7): the exact metrics compare the
policy with that objective's optimum π_ref·exp(r/β) (target.kind = rlhf, β tied to loss.beta).

  python -m align_jax.main --config=configs/reinforce.py
  python -m align_jax.main --config=configs/reinforce.py:smoke
  python -m align_jax.main --config=configs/reinforce.py --config.loss.beta=0.3 --config.rollout.num_policy=4

Expected (default): exact/reward rises and exact/kl_policy_target = KL(π‖π_ref·e^{r/β}/Z) falls.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "reinforce"
  c.objective = "reinforce"
  config_lib.set_model(c, arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 4
  c.loss.beta = 1.0  # KL coefficient of the penalised reward.
  c.loss.baseline = "none"  # none | loo (configs/rloo.py).
  c.target.kind = "rlhf"
  c.target.beta = c.loss.get_ref("beta")
  if arg.smoke:
    config_lib.smoke(c)
  return c
