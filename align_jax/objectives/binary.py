"""Binary-feedback objectives on [B] log-probs: one completion per example, labelled desirable or not.

KTO (with its batch reference point z0) and BCO (with its running reward shift δ). Batch statistics are
means over the whole [B] axis: under a global `jit` with a batch-sharded B this is already the mean over
all devices (TRL gathers across processes for the same effect), so no explicit collective is needed.
"""

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError


def _masked_mean(x_B: jax.Array, mask_B: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """(mean of x over mask, number of masked-in entries); the mean is 0 when the mask is empty."""
  w_B = jnp.ones_like(x_B) if mask_B is None else jnp.asarray(mask_B).astype(x_B.dtype)
  n = jnp.sum(w_B)
  return jnp.sum(w_B * x_B) / jnp.where(n > 0, n, 1.0), n


def kto_reference_point(
  mismatched_logp_B: jax.Array, mismatched_ref_logp_B: jax.Array, mask_B: jax.Array | None = None
) -> jax.Array:
  r"""KTO's reference point z0: a batch estimate of KL(π‖π_ref), clamped at 0, under stop-gradient.

  .. math:: z_0 = \mathrm{sg}\Big(\max\big(0,\ \mathrm{mean}_j[\log\pi_\theta(y'_j|x_j) - \log\pi_{\rm ref}(y'_j|x_j)]\big)\Big)

  y'_j is a completion that does not belong to x_j, its log-probs computed without gradient
  (ALGORITHMS.md §5.6, [R]). Building the mismatched pairs is the data pipeline's job; this function
  only reduces their log-probs.

  Convention (differs from TRL): our pairs are drawn once over the dataset — record i is paired with
  record i − 1's completion when the records are assembled (`data.preference.with_mismatched`), a
  partner fixed for the run and shuffled with its record. TRL instead rotates the completions by one
  inside each batch, so a prompt's mismatched completion changes with the batch it lands in. Both
  average log π/π_ref over mismatched pairs of the batch; only which pairs those are differs.

  Args:
    mismatched_logp_B: policy sequence log-probs of the mismatched (x_j, y'_j) pairs.
    mismatched_ref_logp_B: the same under the frozen reference.
    mask_B: 1 for real examples, 0 for padding (None: all real).

  Returns:
    z0, a scalar ≥ 0 with no gradient.

  Examples:
    >>> z0 = kto_reference_point(jnp.array([0.3, -0.1, 0.4]), jnp.zeros(3))
    >>> print(f"{z0:.6f}")   # mean(0.3, −0.1, 0.4), ALGORITHMS.md §7.7
    0.200000
  """
  kl, _ = _masked_mean(mismatched_logp_B - mismatched_ref_logp_B, mask_B)
  return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto(
  logp_B: jax.Array,
  ref_logp_B: jax.Array,
  desirable_B: jax.Array,
  z0: jax.Array,
  *,
  beta: float,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
):
  r"""KTO, Kahneman–Tversky optimisation (Ethayarajh et al. 2024, arXiv 2402.01306).

  With r = log π_θ(y|x) − log π_ref(y|x) and the reference point z0 (see `kto_reference_point`):

  .. math::
    \ell_D = \lambda_D\,(1 - \sigma(\beta(r - z_0))), \qquad \ell_U = \lambda_U\,(1 - \sigma(\beta(z_0 - r)))

  computed as λ·σ(−m) with the signed margin m = ±β(r − z0). The loss of an example is bounded in
  [0, λ] (it saturates, unlike DPO); the batch loss is the mean over desirable and undesirable examples
  together, so a batch with only one kind is fine. TRL `kto_trainer.py` (ALGORITHMS.md §5.6, [R]):
  β = 0.1, λ_D = λ_U = 1 there, and TRL warns unless λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3].

  Args:
    logp_B: sequence log-probs of the completions under the policy.
    ref_logp_B: the same under the frozen reference (no gradient flows into it).
    desirable_B: 1/True for desirable completions, 0/False for undesirable ones.
    z0: the reference point (scalar or [B]); held under stop-gradient.
    beta: inverse temperature of the implicit reward.
    desirable_weight: λ_D.
    undesirable_weight: λ_U.

  Returns:
    loss_B and per-example metrics: reward β·r, signed margin ±β(r − z0), accuracy 1[margin > 0],
    and z0.

  Examples:
    >>> loss, _ = kto(jnp.array([0.5, -0.5]), jnp.zeros(2), jnp.array([True, False]), 0.2, beta=0.1)
    >>> print(f"{loss[0]:.6f} {loss[1]:.6f}")   # 1 − σ(0.03), 1 − σ(0.07); ALGORITHMS.md §7.7
    0.492501 0.482507
  """
  desirable_B = jnp.asarray(desirable_B).astype(bool)
  ratio_B = logp_B - jax.lax.stop_gradient(ref_logp_B)
  z0_B = jnp.broadcast_to(jax.lax.stop_gradient(z0), ratio_B.shape)
  margin_B = jnp.where(desirable_B, 1.0, -1.0) * beta * (ratio_B - z0_B)
  weight_B = jnp.where(desirable_B, desirable_weight, undesirable_weight)
  metrics = {
    "reward": beta * ratio_B,
    "margin": margin_B,
    "accuracy": (margin_B > 0).astype(jnp.float32),
    "z0": z0_B,
  }
  return weight_B * jax.nn.sigmoid(-margin_B), metrics


def bco_update_delta(
  delta: jax.Array,
  count: jax.Array,
  rewards_B: jax.Array,
  mask_B: jax.Array | None = None,
  *,
  momentum: float | None = None,
):
  r"""BCO's reward shift δ after seeing a batch of implicit rewards; call it before `bco`.

  Default (momentum None): δ is the running mean of every reward seen so far, desirable and undesirable
  alike, as TRL's `RunningMoments` keeps it (ALGORITHMS.md §5.7, [R]):

  .. math:: \delta' = \delta + \frac{n}{c + n}\,(\bar r - \delta), \qquad c' = c + n

  with n the number of (unmasked) rewards in the batch and r̄ their mean. With a float `momentum` m,
  δ' = m·δ + (1 − m)·r̄ instead (an exponential moving average; not in TRL or §5.7, our option). A batch
  with no unmasked reward leaves δ unchanged. Start from δ = 0, c = 0 and keep both in the train state
  (they must be checkpointed). The rewards are held under stop-gradient.

  Args:
    delta: current shift δ (scalar).
    count: how many rewards δ averages so far (scalar; float32 counts exactly up to 2^24).
    rewards_B: implicit rewards β·(log π − log π_ref) of this batch.
    mask_B: 1 for real examples, 0 for padding (None: all real).
    momentum: None for the cumulative mean, or the EMA factor m ∈ [0, 1).

  Returns:
    (new δ, new count).

  Examples:
    >>> delta, count = bco_update_delta(0.0, 0.0, jnp.array([0.05, -0.05]))
    >>> print(f"{delta:.6f} {count:.0f}")   # mean(0.05, −0.05), ALGORITHMS.md §7.7
    0.000000 2
  """
  batch_mean, n = _masked_mean(jax.lax.stop_gradient(rewards_B), mask_B)
  new_count = count + n
  if momentum is None:
    step = n / jnp.where(new_count > 0, new_count, 1.0)
    return delta + step * (batch_mean - delta), new_count
  if not 0.0 <= momentum < 1.0:
    raise ConfigError(f"bco momentum must lie in [0, 1); got {momentum}")
  ema = momentum * delta + (1.0 - momentum) * batch_mean
  return jnp.where(n > 0, ema, delta), new_count


def bco(
  logp_B: jax.Array,
  ref_logp_B: jax.Array,
  chosen_B: jax.Array,
  delta: jax.Array,
  *,
  beta: float,
  udm_weight_B: jax.Array | None = None,
):
  r"""BCO, binary classifier optimisation (Jung et al. 2024, arXiv 2404.04656).

  The implicit reward r_θ = β(log π_θ − log π_ref) is the logit of a classifier of desirable vs.
  undesirable completions, shifted by δ (see `bco_update_delta`):

  .. math:: \ell_D = \mathrm{softplus}(-(r_\theta - \delta)), \qquad \ell_U = \mathrm{softplus}(r_\theta - \delta)

  Undesirable losses are multiplied by `udm_weight_B` when underlying-distribution matching is on
  (computed by the data pipeline: `align_jax.data.udm.bco_udm_weight`). Everything here follows TRL
  `trl/experimental/bco/bco_trainer.py` (ALGORITHMS.md §5.7, all [R]; default β = 0.1 there).

  Args:
    logp_B: sequence log-probs of the completions under the policy.
    ref_logp_B: the same under the frozen reference (no gradient flows into it).
    chosen_B: 1/True for desirable completions, 0/False for undesirable ones.
    delta: the reward shift δ (scalar), already updated with this batch; held under stop-gradient.
    beta: inverse temperature of the implicit reward.
    udm_weight_B: density-ratio weights for undesirable examples (None: no UDM).

  Returns:
    loss_B and per-example metrics: reward r_θ, signed margin ±(r_θ − δ), accuracy 1[margin > 0], δ.

  Examples:
    >>> loss, _ = bco(jnp.array([-10., -12.]), jnp.array([-10.5, -11.5]), jnp.array([True, False]),
    ...               0.03, beta=0.1)
    >>> print(f"{loss[0]:.6f} {loss[1]:.6f}")   # softplus(−0.02), softplus(−0.08); ALGORITHMS.md §7.7
    0.683197 0.653947
  """
  chosen_B = jnp.asarray(chosen_B).astype(bool)
  reward_B = beta * (logp_B - jax.lax.stop_gradient(ref_logp_B))
  delta_B = jnp.broadcast_to(jax.lax.stop_gradient(delta), reward_B.shape)
  margin_B = jnp.where(chosen_B, 1.0, -1.0) * (reward_B - delta_B)
  loss_B = jax.nn.softplus(-margin_B)
  if udm_weight_B is not None:
    loss_B = jnp.where(chosen_B, 1.0, jax.lax.stop_gradient(udm_weight_B)) * loss_B
  metrics = {
    "reward": reward_B,
    "margin": margin_B,
    "accuracy": (margin_B > 0).astype(jnp.float32),
    "delta": delta_B,
  }
  return loss_B, metrics


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# K index 0 is the labelled completion (batch["desirable_B"]); for KTO, index 1 is a mismatched
# completion (another example's response after this prompt).


def kto_objective(
  logp_BxK: jax.Array,
  batch: dict,
  stats: dict,
  *,
  beta: float,
  desirable_weight: float,
  undesirable_weight: float,
):
  """`kto` on a binary batch, with z0 from its mismatched completions (`kto_reference_point`)."""
  ref_BxK = batch["ref_logp_BxK"]
  z0 = kto_reference_point(logp_BxK[:, 1], ref_BxK[:, 1], batch["example_mask_B"])
  return (
    *kto(
      logp_BxK[:, 0],
      ref_BxK[:, 0],
      batch["desirable_B"],
      z0,
      beta=beta,
      desirable_weight=desirable_weight,
      undesirable_weight=undesirable_weight,
    ),
    stats,
  )


def bco_objective(
  logp_BxK: jax.Array, batch: dict, stats: dict, *, beta: float, delta_momentum: float
):
  """`bco` on a binary batch: updates the running shift {"delta", "count"} in `stats` with this
  batch's rewards first (`bco_update_delta`; `delta_momentum` < 0 is the cumulative mean, else the
  EMA factor), and weights undesirable losses by `batch["udm_weight_B"]` when the data has it."""
  ref_BxK = batch["ref_logp_BxK"]
  reward_B = beta * (logp_BxK[:, 0] - ref_BxK[:, 0])
  delta, count = bco_update_delta(
    stats["delta"],
    stats["count"],
    reward_B,
    batch["example_mask_B"],
    momentum=None if delta_momentum < 0 else delta_momentum,
  )
  loss_B, metrics = bco(
    logp_BxK[:, 0],
    ref_BxK[:, 0],
    batch["desirable_B"],
    delta,
    beta=beta,
    udm_weight_B=batch.get("udm_weight_B"),
  )
  return loss_B, metrics, {"delta": delta, "count": count}


def bco_init_stats(num_contexts: int, loss_cfg: dict) -> dict:
  """BCO's initial running statistics: δ = 0 after 0 rewards."""
  del num_contexts, loss_cfg
  return {"delta": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}
