r"""Dr. GRPO (Liu et al. 2025): GRPO without the std normalisation and the length normalisation.

Advantage r − mean(r) over the K = rollout.num_policy samples of a prompt; per-token clipped
ratios; each sequence's token sum divided by the fixed generation budget (norm_len =
sampling.max_new_tokens), then the mean over sequences (objectives/grpo.py). No KL penalty by
default; with one, k1 in the reward gives the gradient of E_π[r] − β·KL(π‖π_ref) on-policy.

  python -m align_jax.main --config=configs/dr_grpo.py
  python -m align_jax.main --config=configs/dr_grpo.py:smoke
  python -m align_jax.main --config=configs/dr_grpo.py --config.loss.beta=0.1

Expected (default): exact/reward rises; exact/kl_policy_ref grows from 0.
"""

from align_jax import config_lib, models


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "dr_grpo"
  c.objective = "dr_grpo"
  c.model = models.preset(arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 4
  c.loss.epsilon = 0.2
  c.loss.norm_len = c.sampling.get_ref("max_new_tokens")  # The constant length normaliser.
  c.loss.aggregation = "seq-mean-token-sum-norm"
  c.loss.beta = 0.0
  c.loss.kl_estimator = "k1"
  c.loss.kl_in = "reward"  # k1 in the reward: the unbiased KL gradient.
  c.loss.kl_ratio = False
  c.loss.kl_level = "token"
  c.optim.lr = (
    2e-3  # The sum over 4 tokens / 4 and centred rewards: a smaller gradient than GRPO's.
  )
  if arg.smoke:
    config_lib.smoke(c)
  return c
