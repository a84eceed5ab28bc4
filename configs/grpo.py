r"""GRPO (Shao et al. 2024, DeepSeekMath): group-normalised advantages, clipped token ratios.

K = rollout.num_policy samples per prompt form a group; each sample's advantage is its reward
minus the group mean over the group's standard deviation; every token's ratio π_θ/π_old to the
sampler's log-prob is clipped to [1 − ε, 1 + ε]; the k3 estimator of KL(π‖π_ref) per token is
added to the loss with β = 0.04; per-token losses are averaged per sequence, then over sequences
(objectives/grpo.py). Several updates per rollout (PPO-style) with rollout.updates_per_batch and
rollout.minibatches.

  python -m align_jax.main --config=configs/grpo.py
  python -m align_jax.main --config=configs/grpo.py:smoke
  python -m align_jax.main --config=configs/grpo.py --config.rollout.updates_per_batch=2 \
    --config.rollout.minibatches=2
  python -m align_jax.main --config=configs/grpo.py --config.loss.kl_in=reward \
    --config.loss.kl_estimator=k1
  python -m align_jax.main --config=configs/grpo.py --config.loss.aggregation=token-mean

Expected (default): exact/reward rises; exact/kl_policy_ref grows from 0.
"""

from align_jax import config_lib, models


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "grpo"
  c.objective = "grpo"
  c.model = models.preset(arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 4  # The group size G.
  c.loss.epsilon = 0.2  # Clip range of the token ratio.
  c.loss.beta = 0.04  # KL coefficient (DeepSeekMath).
  c.loss.kl_estimator = "k3"  # k1 | k2 | k3
  c.loss.kl_in = "loss"  # loss | reward
  c.loss.kl_ratio = False  # In the loss: times π/π_old (DeepSeek-V3.2).
  c.loss.kl_level = "token"  # token | sequence
  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
  c.loss.aggregation = "seq-mean-token-mean"
  c.loss.norm_len = c.sampling.get_ref("max_new_tokens")  # seq-mean-token-sum-norm's length.
  if arg.smoke:
    config_lib.smoke(c)
  return c
