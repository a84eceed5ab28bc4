r"""GSPO (Zheng et al. 2025): GRPO's advantages with one length-normalised ratio per sequence.

s = (π_θ(y|x)/π_old(y|x))^(1/|y|), clipped to [1 − 3e-4, 1 + 4e-4] (the paper's range) in
−min(s·A, clip(s)·A), averaged over the K = rollout.num_policy samples of a prompt
(objectives/grpo.py). The clip only matters for updates after the first on one rollout
(rollout.updates_per_batch, rollout.minibatches).

  python -m align_jax.main --config=configs/gspo.py
  python -m align_jax.main --config=configs/gspo.py:smoke
  python -m align_jax.main --config=configs/gspo.py --config.rollout.minibatches=2

Expected (default): exact/reward rises; exact/kl_policy_ref grows from 0.
"""

from align_jax import config_lib, models


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "gspo"
  c.objective = "gspo"
  c.model = models.preset(arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 4
  c.loss.epsilon_low = 3e-4
  c.loss.epsilon_high = 4e-4
  c.loss.beta = 0.0
  c.loss.kl_estimator = "k1"
  c.loss.kl_in = "reward"
  c.loss.kl_ratio = False
  c.loss.kl_level = "sequence"
  if arg.smoke:
    config_lib.smoke(c)
  return c
