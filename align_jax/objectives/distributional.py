"""Distributional preference objectives (ALGORITHMS.md §4.1–§4.2): D2O and AOT.

D2O prefers the distribution of a prompt's self-generated responses over its human negative; AOT
asks the implicit reward of positives to stochastically dominate that of negatives, which couples
the whole batch through a sort. The sort runs over the whole [B] axis: under a global `jit` with a
batch-sharded B that is already the sort over all devices (XLA gathers what it needs), so no
explicit collective is needed; TRL, by contrast, sorts per device.
"""

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError

_AOT_SURROGATES = ("logistic", "squared_hinge", "least_squares")


def d2o(
  logp_BxK: jax.Array,
  ref_logp_BxK: jax.Array,
  *,
  beta: float,
  alpha: float,
  sample_mask_BxK: jax.Array | None = None,
):
  r"""D2O, distributional dispreference optimisation (Duan et al. 2024, arXiv 2403.03419).

  Layout of the K axis: index 0 is the human-annotated negative y_l, indices 1..K−1 are the
  N = K − 1 self-generated responses y_1..y_N (the paper's "K" is N here):

  .. math::
    z = \frac{\beta}{N}\sum_{i=1}^{N}\big[\log\pi_\theta(y_i) - \log\pi_r^-(y_i)\big]
        - \alpha\big[\log\pi_\theta(y_l) - \log\pi_r^+(y_l)\big], \qquad
    \ell = \mathrm{softplus}(-z)

  `ref_logp_BxK[:, 0]` is log π_r^+(y_l) and `ref_logp_BxK[:, 1:]` is log π_r^−(y_i); with a single
  reference (the default in ALGORITHMS.md §4.1) both come from π_ref. The references are held under
  stop-gradient. The self-samples are data, but their log-probs under π_θ are differentiated:
  ∂ℓ/∂log π_θ(y_i) = −(β/N) σ(−z) and ∂ℓ/∂log π_θ(y_l) = α σ(−z). β/N multiplies the sum of
  *sequence* log-ratios (a per-token mean changes the scale). With N = 1, α = β and one reference
  this is DPO with the self-sample as the chosen response.

  Args:
    logp_BxK: sequence log-probs under the policy of [y_l, y_1, ..., y_N].
    ref_logp_BxK: log π_r^+(y_l) in column 0, log π_r^−(y_i) in columns 1..N (no gradient flows in).
    beta: weight β of the mean self-sample log-ratio.
    alpha: weight α of the negative's log-ratio.
    sample_mask_BxK: 1 for real self-samples, 0 for padding ones; column 0 is ignored (the
      negative is always present). The mean runs over the real samples of each prompt (the sample
      term is 0 when a prompt has none). None: all real.

  Returns:
    loss_B and per-prompt metrics: margin z, accuracy 1[z > 0], the mean self-sample log-ratio
    (`sample_log_ratio`) and the negative's log-ratio (`negative_log_ratio`), both without β, α.

  Examples:
    >>> logp = jnp.array([[-25., -20., -22., -21.]])
    >>> ref = jnp.array([[-24., -20.5, -21.5, -21.5]])
    >>> loss, m = d2o(logp, ref, beta=0.1, alpha=0.1)
    >>> print(f"{loss[0]:.6f} {m['margin'][0]:.6f}")   # softplus(−z), ALGORITHMS.md §7.5
    0.636514 0.116667
  """
  ratio_BxK = logp_BxK - jax.lax.stop_gradient(ref_logp_BxK)
  samples_BxN = ratio_BxK[:, 1:]
  if sample_mask_BxK is None:
    w_BxN = jnp.ones_like(samples_BxN)
  else:
    w_BxN = jax.lax.stop_gradient(jnp.asarray(sample_mask_BxK)[:, 1:]).astype(samples_BxN.dtype)
  n_B = jnp.sum(w_BxN, axis=-1)
  sample_ratio_B = jnp.sum(w_BxN * samples_BxN, axis=-1) / jnp.maximum(n_B, 1.0)
  negative_ratio_B = ratio_BxK[:, 0]
  z_B = beta * sample_ratio_B - alpha * negative_ratio_B
  metrics = {
    "margin": z_B,
    "accuracy": (z_B > 0).astype(jnp.float32),
    "sample_log_ratio": sample_ratio_B,
    "negative_log_ratio": negative_ratio_B,
  }
  return jax.nn.softplus(-z_B), metrics


def _aot_surrogate(z_B: jax.Array, *, beta: float, label_smoothing: float, h: str) -> jax.Array:
  """The convex violation penalty h(z) of AOT (ALGORITHMS.md §4.2)."""
  if h == "logistic":
    return (1.0 - label_smoothing) * jax.nn.softplus(
      -beta * z_B
    ) + label_smoothing * jax.nn.softplus(beta * z_B)
  if h == "squared_hinge":
    return jnp.square(jax.nn.relu(beta - z_B))
  return jnp.square(beta - z_B)


def _aot(
  u_B: jax.Array,
  v_B: jax.Array,
  example_mask_B: jax.Array | None,
  *,
  beta: float,
  label_smoothing: float,
  h: str,
):
  """Rank-couples u and v over the valid entries; rank i's loss goes to the u of rank i."""
  if h not in _AOT_SURROGATES:
    raise ConfigError(f"aot h {h!r} is unknown; use one of {_AOT_SURROGATES}")
  if not 0.0 <= label_smoothing <= 0.5:
    raise ConfigError(f"aot label_smoothing must lie in [0, 0.5]; got {label_smoothing}")
  if label_smoothing and h != "logistic":
    raise ConfigError(f"aot label_smoothing applies to h='logistic' only; got h={h!r}")
  valid_B = (
    jnp.ones(u_B.shape, bool)
    if example_mask_B is None
    else jnp.asarray(example_mask_B).astype(bool)
  )
  # Padding sorts last on both sides (sort keys +inf), so the valid entries are coupled among
  # themselves exactly as if the padding were removed. The values themselves are gathered, never the
  # +inf keys, so masked rows stay finite and their zero loss has a finite (zero) gradient.
  order_u_B = jnp.argsort(jnp.where(valid_B, u_B, jnp.inf), stable=True)
  order_v_B = jnp.argsort(jnp.where(valid_B, v_B, jnp.inf), stable=True)
  rank_u_B = jnp.argsort(order_u_B)
  v_coupled_B = v_B[order_v_B][rank_u_B]  # the v whose rank equals the rank of u_b
  z_B = u_B - v_coupled_B
  h_B = _aot_surrogate(z_B, beta=beta, label_smoothing=label_smoothing, h=h)
  loss_B = jnp.where(valid_B, h_B, 0.0)
  zero = jnp.zeros_like(z_B)
  metrics = {
    "margin": jnp.where(valid_B, beta * (u_B - v_B), zero),
    "accuracy": jnp.where(valid_B, u_B > v_B, False).astype(jnp.float32),
    "sorted_margin": jnp.where(valid_B, beta * z_B, zero),
    "dominance_violation": jnp.where(valid_B, z_B < 0, False).astype(jnp.float32),
  }
  return loss_B, metrics


def aot(
  logp_Bx2: jax.Array,
  ref_logp_Bx2: jax.Array,
  *,
  beta: float,
  label_smoothing: float = 0.0,
  h: str = "logistic",
  example_mask_B: jax.Array | None = None,
):
  r"""AOT, paired: alignment via optimal transport (Melnyk et al. 2024, arXiv 2406.05882).

  Policy margins u_b = log π(y_w) − log π(y_l) must first-order dominate the reference margins
  v_b = log π_ref(y_w) − log π_ref(y_l). Sorting each over the batch gives the optimal (monotone)
  coupling for any convex h, so the one-dimensional OT violation is

  .. math:: \frac{1}{n}\sum_{i=1}^{n} h\big(u_{(i)} - v_{(i)}\big), \qquad
            u_{(1)} \le \dots \le u_{(n)},\ v_{(1)} \le \dots \le v_{(n)}

  with h one of "logistic" (1 − ε)·softplus(−βz) + ε·softplus(βz) (the default, TRL's "aot"),
  "squared_hinge" relu(β − z)² or "least_squares" (β − z)² (IPO-like; not a relaxation of 0/1).
  The indicator 1[z < 0] of the paper is omitted: it has no gradient, and since it is not convex
  the sorted pairing is not its OT solution (u = [0, 1], v = [0.5, 2]: sorted pairs violate twice,
  crossed pairs once). Gradients flow through the sorted values with the permutation held
  constant. With n = 1 and the logistic h this is DPO (label smoothing: cDPO). The reference is
  held under stop-gradient.

  The loss couples the batch, so per-example attribution is a convention: the loss of rank i is
  assigned to the example whose u has rank i among the valid ones, paired with the i-th smallest
  v (another example's). Only the mean over valid examples is meaningful; it equals the mean of
  the sorted form above. Masked examples (padding prompts) are removed from the sort, get loss 0
  and zero metrics, and the valid examples' losses equal those of the batch with the padding
  sliced out.

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    beta: scale of z in the logistic h; the target margin of the squared hinge and least squares.
    label_smoothing: ε ∈ [0, 0.5] of the logistic h (must be 0 for the other h).
    h: "logistic", "squared_hinge" or "least_squares".
    example_mask_B: 1 for real examples, 0 for padding (None: all real).

  Returns:
    loss_B (rank-coupled as above) and per-example metrics: margin β(u_b − v_b) and accuracy
    1[u_b > v_b] (the DPO quantities of the pair), sorted_margin β·z of the coupled ranks, and
    dominance_violation 1[z < 0] (its mean is the share of quantiles where dominance fails).

  Examples:
    >>> logp = jnp.array([[-10., -11.], [-12., -11.5], [-9., -12.], [-15., -14.]])
    >>> ref = jnp.array([[-10.5, -10.5], [-12., -11.], [-9.5, -11.], [-14., -14.5]])
    >>> loss, _ = aot(logp, ref, beta=0.1)
    >>> print(f"{loss.mean():.6f}")   # sort(u) − sort(v) = [0, −0.5, 0.5, 1.5], ALGORITHMS.md §7.4
    0.675256
  """
  ref_logp_Bx2 = jax.lax.stop_gradient(ref_logp_Bx2)
  u_B = logp_Bx2[:, 0] - logp_Bx2[:, 1]
  v_B = ref_logp_Bx2[:, 0] - ref_logp_Bx2[:, 1]
  return _aot(u_B, v_B, example_mask_B, beta=beta, label_smoothing=label_smoothing, h=h)


def aot_unpaired(
  logp_Bx2: jax.Array,
  ref_logp_Bx2: jax.Array,
  *,
  beta: float,
  label_smoothing: float = 0.0,
  h: str = "logistic",
  example_mask_B: jax.Array | None = None,
):
  r"""AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882; TRL "aot_unpaired").

  The implicit rewards of positives, u_b = log π(y_w) − log π_ref(y_w), must first-order dominate
  those of negatives, v_b = log π(y_l) − log π_ref(y_l); each is sorted over the batch separately:

  .. math:: \frac{1}{n}\sum_{i=1}^{n} h\big(u_{(i)} - v_{(i)}\big)

  Positives and negatives need not share prompts; row b only says both belong to the batch, and the
  mask removes both of a row. Everything else (h, label smoothing, the rank attribution of loss_B,
  masking, n = 1 reducing to DPO) is as in `aot`.

  Args:
    logp_Bx2: sequence log-probs of [positive, negative] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    beta: scale of z in the logistic h; the target margin of the squared hinge and least squares.
    label_smoothing: ε ∈ [0, 0.5] of the logistic h (must be 0 for the other h).
    h: "logistic", "squared_hinge" or "least_squares".
    example_mask_B: 1 for real rows, 0 for padding (None: all real).

  Returns:
    loss_B (rank-coupled) and per-example metrics: margin β(u_b − v_b), accuracy 1[u_b > v_b],
    sorted_margin β·z of the coupled ranks and dominance_violation 1[z < 0].

  Examples:
    >>> logp = jnp.array([[-10., -11.], [-12., -11.5], [-9., -12.], [-15., -14.]])
    >>> ref = jnp.array([[-10.5, -10.5], [-12., -11.], [-9.5, -11.], [-14., -14.5]])
    >>> loss, _ = aot_unpaired(logp, ref, beta=0.1)
    >>> print(f"{loss.mean():.6f}")   # sorted differences [0, 0.5, 1, 0], ALGORITHMS.md §7.4
    0.674788
  """
  ratio_Bx2 = logp_Bx2 - jax.lax.stop_gradient(ref_logp_Bx2)
  return _aot(
    ratio_Bx2[:, 0],
    ratio_Bx2[:, 1],
    example_mask_B,
    beta=beta,
    label_smoothing=label_smoothing,
    h=h,
  )


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).


def d2o_objective(logp_BxK: jax.Array, batch: dict, stats: dict, *, beta: float, alpha: float):
  """`d2o` on a negatives batch: K index 0 is the human negative, 1.. the model's own samples
  (`response_mask_BxK` marks the real ones); one reference serves both roles."""
  return (
    *d2o(
      logp_BxK,
      batch["ref_logp_BxK"],
      beta=beta,
      alpha=alpha,
      sample_mask_BxK=batch["response_mask_BxK"],
    ),
    stats,
  )


def aot_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`aot` on a pairs batch; padding prompts (`example_mask_B` = 0) are removed from its sort."""
  return (
    *aot(logp_BxK, batch["ref_logp_BxK"], example_mask_B=batch["example_mask_B"], **cfg),
    stats,
  )


def aot_unpaired_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`aot_unpaired` on a pairs batch; padding rows are removed from its sorts."""
  return (
    *aot_unpaired(logp_BxK, batch["ref_logp_BxK"], example_mask_B=batch["example_mask_B"], **cfg),
    stats,
  )
