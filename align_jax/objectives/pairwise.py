"""Pairwise preference objectives on [B, 2] log-probs: index 0 = chosen, 1 = rejected."""

import jax
import jax.numpy as jnp


def log_ratio_margin(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array) -> jax.Array:
  """h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]."""
  ratio_Bx2 = logp_Bx2 - ref_logp_Bx2
  return ratio_Bx2[:, 0] - ratio_Bx2[:, 1]


def dpo(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array, *, beta: float):
  r"""DPO, sigmoid loss (Rafailov et al. 2023, eq. 7).

  .. math:: \ell = -\log\sigma(\beta h) = \mathrm{softplus}(-\beta h)

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    beta: inverse temperature of the implicit reward β·log(π/π_ref).

  Returns:
    loss_B and per-prompt metrics: margin β·h, accuracy 1[h > 0], and the implicit rewards.

  Examples:
    >>> loss, _ = dpo(jnp.array([[-10., -12.]]), jnp.array([[-10.5, -11.5]]), beta=0.1)
    >>> print(f"{loss[0]:.6f}")   # softplus(-0.1), ALGORITHMS.md §7.7
    0.644397
  """
  h_B = log_ratio_margin(logp_Bx2, jax.lax.stop_gradient(ref_logp_Bx2))
  margin_B = beta * h_B
  reward_Bx2 = beta * (logp_Bx2 - ref_logp_Bx2)
  metrics = {
      "margin": margin_B,
      "accuracy": (h_B > 0).astype(jnp.float32),
      "reward_chosen": reward_Bx2[:, 0],
      "reward_rejected": reward_Bx2[:, 1],
  }
  return jax.nn.softplus(-margin_B), metrics
