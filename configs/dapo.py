r"""DAPO (Yu et al. 2025): clip-higher, token-mean loss, dynamic sampling, overlong shaping.

Group-normalised advantages over K = rollout.num_policy samples; token ratios clipped to
[1 − ε_low, 1 + ε_high] = [0.8, 1.28]; one mean over every token of the batch. Dynamic sampling:
data.batch_size prompts are drawn and rolled out, and the first rollout.informative_prompts of
them whose samples' rewards are not all equal are trained on (too few: the rest are dropped by
weight 0; the metric objective/informative is the share of trained groups with a signal).
Overlong shaping (loss.overlong_max_len, loss.overlong_buffer) is off on the testbed, whose
responses all have one length (objectives/grpo.py).

  python -m align_jax.main --config=configs/dapo.py
  python -m align_jax.main --config=configs/dapo.py:smoke
  python -m align_jax.main --config=configs/dapo.py --config.loss.epsilon_high=0.2

Expected (default): exact/reward rises; exact/kl_policy_ref grows from 0.
"""

from align_jax import config_lib, models


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "dapo"
  c.objective = "dapo"
  c.model = models.preset(arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 4
  c.loss.epsilon_low = 0.2
  c.loss.epsilon_high = 0.28  # Clip-higher.
  c.loss.overlong_max_len = 0  # L_max of the overlong shaping (0: off).
  c.loss.overlong_buffer = 0  # L_cache.
  c.loss.aggregation = "token-mean"
  c.loss.norm_len = 0
  c.loss.beta = 0.0  # DAPO drops the KL penalty.
  c.loss.kl_estimator = "k1"
  c.loss.kl_in = "reward"
  c.loss.kl_ratio = False
  c.loss.kl_level = "token"
  c.data.batch_size = 48  # Prompts drawn per rollout ...
  c.rollout.informative_prompts = 32  # ... of which this many with unequal rewards are kept.
  if arg.smoke:
    config_lib.smoke(c)
    c.data.batch_size = 24
    c.rollout.informative_prompts = 16
  return c
