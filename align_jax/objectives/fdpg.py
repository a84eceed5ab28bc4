"""f-DPG: distributional policy gradients for any f-divergence (ALGORITHMS.md §1).

The policy π_θ is fitted to a fixed target p = P/Z given as an unnormalised energy-based model
log P (see `align_jax.targets`) by descending D_f(π_θ‖p) = E_p[f(π/p)] (Go et al. 2023,
arXiv 2302.08215). Its gradient is a policy gradient E_π[R ∇log π] with the pseudo-reward
R = −f'(π/p) (§1.4), estimated from samples of a proposal q with importance weights π/q (§1.5).
Everything here is a pure function of arrays [B, K] (B prompts / contexts, K samples per prompt;
each context has its own partition function Z_x, CDPG §1.1.5); the running statistics a trainer
keeps in its state — the per-context Ẑ and the window of past pseudo-rewards used as a baseline —
are updated by pure functions too.

A trainer step, in order (naver/disco's `Tuner` / `FDivergenceLoss` semantics, [R] in §1.3, §1.5):

1. `update_log_z` with the batch's log P − log q, then gather `log_z_B = log_z_X[prompt_B]`;
2. `baseline, _ = baseline_window_mean(window)` (previous calls only; 0 on the first call);
3. `loss_B, metrics, samples = fdpg(..., log_z_B, baseline, ...)`;
4. `window = baseline_window_push(window, samples["pseudo_reward_BxK"], samples["used_BxK"])`.
"""

import math

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "tv", "js", "amari", "pearson", "neyman")
OUTSIDE_SUPPORT_RULES = ("mask", "limit")
PROPOSAL_CRITERIA = ("kl", "tv")
# The exact baseline of forward KL: E_π[p/π] = 1 when Ẑ is exact (§1.5); pass it as `baseline_B`.
FORWARD_KL_BASELINE = 1.0

_LOG2 = math.log(2.0)


def check_divergence(divergence: str, alpha: float | None):
  """Raises ConfigError unless `divergence` is one of `DIVERGENCES` with a valid Amari `alpha`."""
  if divergence not in DIVERGENCES:
    raise ConfigError(f"divergence {divergence!r} is unknown; known: {DIVERGENCES}")
  if divergence == "amari":
    if alpha is None or alpha in (0.0, 1.0):
      raise ConfigError(f"amari needs alpha outside {{0, 1}} (the KL limits); got {alpha}")
  elif alpha is not None:
    raise ConfigError(
      f"alpha is only used by the amari divergence; got alpha={alpha} for {divergence!r}"
    )


def _limit_outside_support(divergence: str, alpha: float | None) -> float:
  """lim_{ℓ→+∞} pseudo_reward(ℓ): the pseudo-reward of a sample with P = 0 (may be −inf)."""
  if divergence == "amari":
    return 1.0 / (alpha - 1.0) if alpha < 1.0 else -math.inf
  return {
    "forward_kl": 0.0,
    "reverse_kl": -math.inf,
    "tv": -0.5,
    "js": -0.5 * _LOG2,
    "pearson": -math.inf,
    "neyman": -1.0,
  }[divergence]


def pseudo_reward(ell: jax.Array, divergence: str, *, alpha: float | None = None) -> jax.Array:
  r"""The f-DPG pseudo-reward R = −f'(t) of a sample, from its log-ratio ℓ = log t = log(π/p).

  ALGORITHMS.md §1.4, in the stable forms of its table:

  ======================  ======================  =====================================
  divergence              f(t)                    R(ℓ)
  ======================  ======================  =====================================
  forward_kl  KL(p‖π)     −log t                  exp(−ℓ)
  reverse_kl  KL(π‖p)     t log t                 −ℓ − 1
  tv                      ½|t − 1|                −½ sign(ℓ)
  js  (½ convention)      ½[t log(2t/(1+t))       ½(softplus(−ℓ) − log 2)
                          + log(2/(1+t))]
  amari  α ∉ {0, 1}       (t^α − αt − (1−α))      (1 − exp((α−1)ℓ))/(α − 1)
                          / (α(α−1))
  pearson  χ²(π‖p)        (t − 1)²                −2 expm1(ℓ)
  neyman  χ²(p‖π)         (t − 1)²/t              expm1(−2ℓ)
  ======================  ======================  =====================================

  A sample outside the target's support (P = 0) has ℓ = +∞ and gets the table's limit: forward KL 0,
  TV −½, JS −½ log 2, Neyman −1, Amari 1/(α − 1) for α < 1, and −∞ for reverse KL, Pearson and Amari
  α > 1 (their divergence is then +∞; `fdpg` masks such samples or the target must be smoothed). At
  π = p every pseudo-reward is the constant −f'(1) (0 for TV by sign(0) = 0). naver/disco's `JSLoss`
  is twice the JS row (a learning-rate factor); its forward KL, reverse KL and TV rows are these.

  Args:
    ell: log π(x) − log p(x), any shape; +inf for samples outside the support of p.
    divergence: one of `DIVERGENCES`.
    alpha: the Amari order α (only for "amari"); α → 1 is reverse KL, α → 0 forward KL.

  Returns:
    R with the shape of `ell`.

  Examples:
    >>> ell = jnp.log(jnp.array([0.167405, 0.276004]) / jnp.array([0.374688, 0.103380]))
    >>> print(pseudo_reward(ell, "forward_kl").round(5))   # p/π, ALGORITHMS.md §7.1
    [2.23821 0.37456]
    >>> print(f'{pseudo_reward(jnp.array([jnp.inf]), "js")[0]:.6f}')   # −½ log 2 off support, §7.1
    -0.346574
  """
  check_divergence(divergence, alpha)
  if divergence == "forward_kl":
    return jnp.exp(-ell)
  if divergence == "reverse_kl":
    return -ell - 1.0
  if divergence == "tv":
    return -0.5 * jnp.sign(ell)
  if divergence == "js":
    return 0.5 * (jax.nn.softplus(-ell) - _LOG2)
  if divergence == "amari":
    return -jnp.expm1((alpha - 1.0) * ell) / (alpha - 1.0)
  if divergence == "pearson":
    return -2.0 * jnp.expm1(ell)
  return jnp.expm1(-2.0 * ell)  # neyman


def _masked_mean_BxK(x_BxK, mask_BxK):
  """Σ_k over the mask / max(count, 1) per prompt (0 for an empty mask); x off it is ignored."""
  total_B = jnp.sum(jnp.where(mask_BxK, x_BxK, 0.0), axis=-1)
  return total_B / jnp.maximum(jnp.sum(mask_BxK, axis=-1), 1)


def _is_estimates(lpi_BxK, lq_BxK, lP_BxK, log_z_B, real_BxK):
  """Per-prompt IS estimates of §1.8 from samples of q; log_z_B must be finite."""
  lp_BxK = lP_BxK - log_z_B[:, None]  # log p̂; −inf outside the support.
  in_support = lP_BxK > -jnp.inf
  safe_lp_BxK = jnp.where(in_support, lp_BxK, 0.0)
  p_over_q_BxK = jnp.where(in_support, jnp.exp(safe_lp_BxK - lq_BxK), 0.0)
  w_BxK = jnp.exp(lpi_BxK - lq_BxK)
  # KL(p‖π) ≈ (1/Ẑ)·mean[e^{lP−lq}(lP − lπ)] − log Ẑ; the P = 0 terms are 0 (disco's NaN → 0).
  kl_p_pi_BxK = jnp.where(
    in_support, p_over_q_BxK * (safe_lp_BxK + log_z_B[:, None] - lpi_BxK), 0.0
  )
  kl_p_pi_B = _masked_mean_BxK(kl_p_pi_BxK, real_BxK) - log_z_B
  # KL(π‖p) ≈ mean[w (lπ − lP + log Ẑ)]: +inf as soon as one sample has P = 0.
  kl_pi_p_B = _masked_mean_BxK(w_BxK * (lpi_BxK - lp_BxK), real_BxK)
  tv_B = 0.5 * _masked_mean_BxK(jnp.abs(w_BxK - p_over_q_BxK), real_BxK)
  # JS: ½ KL(p‖m) + ½ KL(π‖m), log m = logaddexp(log p̂, lπ) − log 2, each by IS with q.
  lm_BxK = jnp.logaddexp(lp_BxK, lpi_BxK) - _LOG2
  kl_p_m_BxK = jnp.where(in_support, p_over_q_BxK * (safe_lp_BxK - lm_BxK), 0.0)
  js_BxK = 0.5 * kl_p_m_BxK + 0.5 * w_BxK * (lpi_BxK - lm_BxK)
  return {
    "kl_target_policy": kl_p_pi_B,
    "kl_policy_target": kl_pi_p_B,
    "tv": tv_B,
    "js": _masked_mean_BxK(js_BxK, real_BxK),
  }


def _real_mask(mask_BxK, shape):
  if mask_BxK is None:
    return jnp.ones(shape, bool)
  return jnp.asarray(jax.lax.stop_gradient(mask_BxK)) > 0


def fdpg(
  logp_BxK: jax.Array,
  proposal_logp_BxK: jax.Array,
  target_logp_BxK: jax.Array,
  log_z_B: jax.Array,
  baseline_B: jax.Array,
  *,
  divergence: str,
  alpha: float | None = None,
  sample_mask_BxK: jax.Array | None = None,
  outside_support: str = "mask",
  clip_log_ratio: float | None = None,
):
  r"""The f-DPG per-batch surrogate loss (Go et al. 2023; ALGORITHMS.md §1.5).

  .. math::
    \ell_i = \mathrm{sg}(\log\pi_i) - (\log P_i - \log\hat Z),\quad
    w_i = e^{\mathrm{sg}(\log\pi_i) - \log q_i},\quad
    \mathcal{L} = -\frac{1}{N}\sum_i \mathrm{sg}\big(w_i\,(R(\ell_i) - B)\big)\,\log\pi_\theta(x_i)

  with R the pseudo-reward of `pseudo_reward`. With exact Ẑ and a baseline B that does not depend on
  the current samples, ∇L is an unbiased estimate of ∇_θ D_f(π_θ‖p): E_q[w ∇log π] = 0 makes any
  such B harmless. Baselines: naver/disco's window of the pseudo-rewards of previous calls
  (`baseline_window_*`, a scalar shared by all prompts), forward KL's exact `FORWARD_KL_BASELINE`
  = E_π[p/π] = 1, or 0. The forward-KL product w·R = p̂/q is formed in log space, so it stays finite
  when ℓ alone overflows.

  Samples outside the target's support (log P = −∞, a failed pointwise constraint) follow
  `outside_support`:

  * "mask" (this function's default): they get zero weight (and no pseudo-reward), but still count
    in N. The expected gradient is then E_π[1_S (R − B) ∇log π]; for forward KL with B = 0 that is
    still the exact gradient (its pseudo-reward vanishes off the support S), otherwise it ignores
    the push away from x ∉ S. In particular "mask" biases the TV and JS gradients: their limit
    pseudo-rewards (−½, −½ log 2) are finite, and the dropped term E_π[1_{S^c} (R_lim − B) ∇log π]
    is not 0 — use "limit" for them (configs/fdpg.py does). The only rule under which reverse KL,
    Pearson and Amari α > 1 are finite (their divergence is +∞).
  * "limit": they get the table's limit pseudo-reward (forward KL 0, TV −½, JS −½ log 2, Neyman −1,
    Amari 1/(α−1) for α < 1): the unbiased estimator. A ConfigError for divergences whose limit is
    −∞.

  Alternatively smooth the constraint upstream — `targets.pointwise(..., epsilon=ε)` gives P > 0
  everywhere, so both rules coincide and reverse KL is finite (at the price of a different target).

  A prompt whose log Ẑ is −inf (no sample of its context in the support yet, see `update_log_z`) is
  skipped: zero loss and gradient, metric `z_valid` = 0.

  Args:
    logp_BxK: sequence log π_θ(x_i) of each sample (differentiated).
    proposal_logp_BxK: log q(x_i) of the distribution actually sampled from (held under
      stop-gradient; equal to sg(logp_BxK) on-policy).
    target_logp_BxK: unnormalised log P(x_i) of the target (−inf outside its support; no gradient).
    log_z_B: log Ẑ of each prompt's context (a scalar broadcasts; no gradient).
    baseline_B: baseline B per prompt (a scalar broadcasts; no gradient).
    divergence: one of `DIVERGENCES`.
    alpha: the Amari order (only for "amari").
    sample_mask_BxK: 1 for real samples, 0 for padding (None: all real); N counts the real ones.
    outside_support: "mask" or "limit", see above ("mask" biases TV and JS).
    clip_log_ratio: if set, the finite ℓ are clipped to [−c, c] before the pseudo-reward (§1.10: the
      exponential pseudo-rewards are heavy-tailed and overflow); None for the exact estimator.

  Returns:
    loss_B, per-prompt metrics, and per-sample values for `baseline_window_push`
    {"pseudo_reward_BxK" (0 where unused), "used_BxK" (samples that entered the loss)}. Metrics:
    `pseudo_reward` (mean over used samples), `importance_weight` (mean π/q), `ess_fraction`
    ((Σw)²/(N Σw²)), `support_fraction` (share of samples with P > 0), `z_valid`, and the IS
    estimates of §1.8 with the prompt's Ẑ: `kl_target_policy` KL(p‖π), `kl_policy_target` KL(π‖p)
    (+inf if a sample has P = 0), `tv`, `js` (0 where Ẑ is not valid).

  Examples:
    >>> a, r = jnp.array([0.4, 0.3, 0.2, 0.1]), jnp.array([1., 0., 2., -1.])
    >>> x = jnp.array([0, 2, 2, 3, 1])
    >>> logpi = jax.nn.log_softmax(jnp.array([0., 0.5, -0.5, 1.]))[x][None]
    >>> log_P = (jnp.log(a) + r)[x][None]
    >>> loss, m, _ = fdpg(logpi, jnp.log(a)[x][None], log_P, jnp.log(2.901912), 2.534322,
    ...                   divergence="forward_kl")
    >>> print(f"{loss[0]:.5f}")   # exact Z, B = batch mean pseudo-reward; ALGORITHMS.md §7.1
    -1.19944
  """
  check_divergence(divergence, alpha)
  if outside_support not in OUTSIDE_SUPPORT_RULES:
    raise ConfigError(
      f"outside_support must be one of {OUTSIDE_SUPPORT_RULES}; got {outside_support!r}"
    )
  if outside_support == "limit" and _limit_outside_support(divergence, alpha) == -math.inf:
    raise ConfigError(
      f"{divergence} has pseudo-reward −inf outside the target's support: use "
      "outside_support='mask' or an ε-smoothed target (targets.pointwise epsilon)"
    )
  sg = jax.lax.stop_gradient
  lpi_BxK = sg(logp_BxK)
  lq_BxK, lP_BxK = sg(proposal_logp_BxK), sg(target_logp_BxK)
  shape = lpi_BxK.shape
  log_z_B = jnp.broadcast_to(sg(jnp.asarray(log_z_B, lpi_BxK.dtype)), shape[:1])
  baseline_B = jnp.broadcast_to(sg(jnp.asarray(baseline_B, lpi_BxK.dtype)), shape[:1])
  real_BxK = _real_mask(sample_mask_BxK, shape)
  z_valid_B = jnp.isfinite(log_z_B)
  safe_log_z_B = jnp.where(z_valid_B, log_z_B, 0.0)
  in_support_BxK = lP_BxK > -jnp.inf
  used_BxK = real_BxK & z_valid_B[:, None]
  if outside_support == "mask":
    used_BxK &= in_support_BxK
  # Unused entries get harmless stand-ins (their values never reach the loss or the metrics).
  safe_lpi_BxK = jnp.where(real_BxK, lpi_BxK, 0.0)
  log_w_BxK = jnp.where(real_BxK, lpi_BxK - lq_BxK, 0.0)
  ell_BxK = safe_lpi_BxK - (lP_BxK - safe_log_z_B[:, None])  # +inf outside the support.
  ell_BxK = jnp.where(used_BxK, ell_BxK, 0.0)
  if clip_log_ratio is not None:
    ell_BxK = jnp.where(
      jnp.isfinite(ell_BxK), jnp.clip(ell_BxK, -clip_log_ratio, clip_log_ratio), ell_BxK
    )
  reward_BxK = pseudo_reward(ell_BxK, divergence, alpha=alpha)
  if divergence == "forward_kl":
    weighted_reward_BxK = jnp.exp(log_w_BxK - ell_BxK)  # w·p/π = p̂/q, 0 outside the support.
  else:
    weighted_reward_BxK = jnp.exp(log_w_BxK) * reward_BxK
  weighted_adv_BxK = weighted_reward_BxK - jnp.exp(log_w_BxK) * baseline_B[:, None]
  coef_BxK = sg(jnp.where(used_BxK, weighted_adv_BxK, 0.0))
  n_B = jnp.maximum(jnp.sum(real_BxK, axis=-1), 1).astype(lpi_BxK.dtype)
  loss_B = -jnp.sum(jnp.where(used_BxK, coef_BxK * logp_BxK, 0.0), axis=-1) / n_B

  reward_BxK = jnp.where(used_BxK, reward_BxK, 0.0)
  w_BxK = jnp.exp(log_w_BxK)
  n_real_B = jnp.sum(real_BxK, axis=-1)
  masked_log_w_BxK = jnp.where(real_BxK, log_w_BxK, -jnp.inf)
  log_ess_B = (
    2.0 * jax.nn.logsumexp(masked_log_w_BxK, axis=-1)
    - jax.nn.logsumexp(2.0 * masked_log_w_BxK, axis=-1)
    - jnp.log(jnp.maximum(n_real_B, 1))
  )
  estimates = _is_estimates(
    safe_lpi_BxK, jnp.where(real_BxK, lq_BxK, 0.0), lP_BxK, safe_log_z_B, real_BxK
  )
  metrics = {
    "pseudo_reward": _masked_mean_BxK(reward_BxK, used_BxK),
    "importance_weight": _masked_mean_BxK(w_BxK, real_BxK),
    "ess_fraction": jnp.where(n_real_B > 0, jnp.exp(log_ess_B), 0.0),
    "support_fraction": _masked_mean_BxK(in_support_BxK.astype(lpi_BxK.dtype), real_BxK),
    "z_valid": z_valid_B.astype(lpi_BxK.dtype),
    **{k: jnp.where(z_valid_B, v, 0.0) for k, v in estimates.items()},
  }
  return loss_B, metrics, {"pseudo_reward_BxK": reward_BxK, "used_BxK": used_BxK}


def update_log_z(
  log_z_X: jax.Array,
  count_X: jax.Array,
  prompt_B: jax.Array,
  log_ratio_BxK: jax.Array,
  sample_mask_BxK: jax.Array | None = None,
):
  r"""Per-context running estimate of the partition function Z_x = E_q[P/q] (ALGORITHMS.md §1.3).

  Ẑ_x is the count-weighted mean of exp(log P − log q) over every sample of context x seen so far
  (naver/disco's cumulative `MovingAverage`; each term is unbiased even though q changes), kept in
  log space:

  .. math::
    \log\hat Z'_x = \log\big(c_x \hat Z_x + \textstyle\sum_{i \in x} e^{\log P_i - \log q_i}\big)
                    - \log(c_x + n_x),\qquad c'_x = c_x + n_x

  Several rows of the batch may share a context. Start from log Ẑ = −inf, c = 0 (keep both in the
  train state). A context with no sample in the support yet stays at −inf; `fdpg` skips prompts
  whose `log_z_B` is −inf (`jnp.isfinite(log_z_X)` says which contexts are usable).

  Args:
    log_z_X: current log Ẑ of each of the X contexts.
    count_X: how many samples each estimate averages (float).
    prompt_B: context index in [0, X) of each row of the batch.
    log_ratio_BxK: log P − log q of each sample (−inf outside the support; no gradient).
    sample_mask_BxK: 1 for real samples, 0 for padding (None: all real).

  Returns:
    (new log_z_X, new count_X).

  Examples:
    >>> a, P = jnp.array([0.4, 0.3, 0.2, 0.1]), jnp.array([1.087313, 0.3, 1.477811, 0.036788])
    >>> x = jnp.array([0, 2, 2, 3, 1])
    >>> log_z, count = update_log_z(jnp.full(1, -jnp.inf), jnp.zeros(1), jnp.zeros(1, int),
    ...                             jnp.log(P / a)[x][None])
    >>> print(f"{jnp.exp(log_z[0]):.5f} {count[0]:.0f}")   # batch Ẑ = mean(P/q), ALGORITHMS.md §7.1
    3.77285 5
  """
  sg = jax.lax.stop_gradient
  log_ratio_BxK = sg(log_ratio_BxK)
  num_x = log_z_X.shape[0]
  real_BxK = _real_mask(sample_mask_BxK, log_ratio_BxK.shape)
  row_lse_B = jax.nn.logsumexp(jnp.where(real_BxK, log_ratio_BxK, -jnp.inf), axis=-1)
  n_X = jax.ops.segment_sum(jnp.sum(real_BxK, axis=-1).astype(count_X.dtype), prompt_B, num_x)
  # Segment logsumexp: shift by the per-context max (0 where a context has no finite term).
  max_X = jax.ops.segment_max(row_lse_B, prompt_B, num_x)
  safe_max_X = jnp.where(jnp.isfinite(max_X), max_X, 0.0)
  sum_X = jax.ops.segment_sum(jnp.exp(row_lse_B - safe_max_X[prompt_B]), prompt_B, num_x)
  batch_lse_X = jnp.where(
    sum_X > 0, safe_max_X + jnp.log(jnp.where(sum_X > 0, sum_X, 1.0)), -jnp.inf
  )
  new_count_X = count_X + n_X
  old_X = jnp.where(count_X > 0, log_z_X + jnp.log(jnp.where(count_X > 0, count_X, 1.0)), -jnp.inf)
  total_X = jnp.logaddexp(old_X, batch_lse_X)
  new_log_z_X = jnp.where(
    new_count_X > 0, total_X - jnp.log(jnp.where(new_count_X > 0, new_count_X, 1.0)), log_z_X
  )
  return new_log_z_X.astype(log_z_X.dtype), new_count_X


def baseline_window_init(size: int, dtype=jnp.float32) -> dict:
  """An empty window of the last `size` pseudo-rewards (disco: 1024) for the f-DPG baseline.

  A fixed-size ring buffer {"values_W", "count"} (count = values pushed so far, int32), so it lives
  in the jitted train state and is checkpointed with it.
  """
  if size < 1:
    raise ConfigError(f"baseline window size must be >= 1; got {size}")
  return {"values_W": jnp.zeros((size,), dtype), "count": jnp.zeros((), jnp.int32)}


def baseline_window_mean(window: dict):
  r"""The baseline B: mean of the pseudo-rewards in the window, from previous calls only.

  naver/disco's `FDivergenceLoss` baseline (ALGORITHMS.md §1.5): the current batch is pushed only
  after its advantages are computed (so B does not depend on the samples it multiplies), there is no
  baseline on the very first call, and one window is shared by all contexts of a step.

  Args:
    window: from `baseline_window_init` / `baseline_window_push`.

  Returns:
    (B, has_baseline): the mean of the min(count, W) stored values, and count > 0; B = 0 if empty.

  Examples:
    >>> w = baseline_window_push(baseline_window_init(4), jnp.array([[1., 2., 3.]]))
    >>> w = baseline_window_push(w, jnp.array([[4., 5.]]))
    >>> print(baseline_window_mean(w)[0])   # FIFO: [2, 3, 4, 5]
    3.5
  """
  values_W = window["values_W"]
  filled = jnp.minimum(window["count"], values_W.shape[0])
  valid_W = jnp.arange(values_W.shape[0]) < filled
  total = jnp.sum(jnp.where(valid_W, values_W, 0.0))
  return total / jnp.maximum(filled, 1).astype(values_W.dtype), window["count"] > 0


def baseline_window_push(
  window: dict, values_BxK: jax.Array, mask_BxK: jax.Array | None = None
) -> dict:
  """Appends the masked-in values (row-major order) to the ring, dropping the oldest beyond W.

  Call it after `fdpg` with its `pseudo_reward_BxK` and `used_BxK`. If one push holds more than W
  values, only its last W remain. jit-friendly: the number of values may depend on the mask.

  Args:
    window: from `baseline_window_init`.
    values_BxK: pseudo-rewards of this batch (any shape; flattened; no gradient).
    mask_BxK: which values to append (None: all).

  Returns:
    The new window.
  """
  values_W = window["values_W"]
  size = values_W.shape[0]
  values_N = jax.lax.stop_gradient(jnp.ravel(values_BxK)).astype(values_W.dtype)
  mask_N = (
    jnp.ones(values_N.shape, bool) if mask_BxK is None else jnp.ravel(jnp.asarray(mask_BxK)) > 0
  )
  rank_N = jnp.cumsum(mask_N) - 1  # Position among this push's values.
  n = jnp.sum(mask_N)
  keep_N = mask_N & (rank_N >= n - size)  # Only the last W of this push survive.
  slot_N = jnp.where(keep_N, (window["count"] + rank_N) % size, size)  # Out of range: dropped.
  values_W = values_W.at[slot_N].set(values_N, mode="drop")
  return {"values_W": values_W, "count": window["count"] + n.astype(jnp.int32)}


def proposal_should_update(
  logp_BxK: jax.Array,
  proposal_logp_BxK: jax.Array,
  target_logp_BxK: jax.Array,
  log_z_B: jax.Array,
  *,
  criterion: str = "kl",
  sample_mask_BxK: jax.Array | None = None,
  prompt_mask_B: jax.Array | None = None,
) -> jax.Array:
  r"""The offline proposal update q ← π_θ of ALGORITHMS.md §1.6: is the policy closer to p than q?

  From samples of the proposal q, compares the IS estimates (§1.8, each prompt with its own Ẑ,
  averaged over the valid prompts) of D(p‖π_θ) and D(p‖q):

  .. math::
    \widehat{KL}(p\|\rho) = \frac{1}{\hat Z}\,\mathrm{mean}_i\big[e^{\log P_i - \log q_i}
                            (\log P_i - \log\rho_i)\big] - \log\hat Z, \qquad
    \widehat{TV}(p,\rho) = \tfrac12\,\mathrm{mean}_i\big|e^{\log\rho_i - \log q_i}
                           - e^{\log P_i - \log q_i}/\hat Z\big|

  for ρ ∈ {π_θ, q}; naver/disco (every 16 steps, KL, a rolling window of 256 samples) and naver/gdc
  (every 10 steps, KL or TV) [R]. The schedule and the copy of the parameters are the trainer's.

  Args:
    logp_BxK: log π_θ of the proposal's samples.
    proposal_logp_BxK: log q of the same samples (q sampled them).
    target_logp_BxK: unnormalised log P (−inf outside the support).
    log_z_B: log Ẑ per prompt (a scalar broadcasts); prompts with −inf are ignored.
    criterion: "kl" (forward KL D(p‖·)) or "tv".
    sample_mask_BxK: 1 for real samples, 0 for padding (None: all real).
    prompt_mask_B: 1 for real prompts, 0 for padding (None: all real).

  Returns:
    A bool scalar array: True iff the estimate for π_θ is strictly smaller than for q.

  Examples:
    >>> lq = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    >>> log_P = lq + jnp.array([[1., 0., 2., -1.]])
    >>> log_z = jax.nn.logsumexp(log_P)
    >>> print(proposal_should_update(log_P - log_z, lq, log_P, log_z))   # π = p, §7.1 target
    True
  """
  if criterion not in PROPOSAL_CRITERIA:
    raise ConfigError(f"criterion must be one of {PROPOSAL_CRITERIA}; got {criterion!r}")
  sg = jax.lax.stop_gradient
  lpi_BxK, lq_BxK, lP_BxK = sg(logp_BxK), sg(proposal_logp_BxK), sg(target_logp_BxK)
  log_z_B = jnp.broadcast_to(sg(jnp.asarray(log_z_B, lpi_BxK.dtype)), lpi_BxK.shape[:1])
  real_BxK = _real_mask(sample_mask_BxK, lpi_BxK.shape)
  valid_B = jnp.isfinite(log_z_B)
  if prompt_mask_B is not None:
    valid_B &= jnp.asarray(prompt_mask_B) > 0
  safe_log_z_B = jnp.where(valid_B, log_z_B, 0.0)
  lq_BxK = jnp.where(real_BxK, lq_BxK, 0.0)
  key = "kl_target_policy" if criterion == "kl" else "tv"
  policy_B = _is_estimates(
    jnp.where(real_BxK, lpi_BxK, 0.0), lq_BxK, lP_BxK, safe_log_z_B, real_BxK
  )[key]
  proposal_B = _is_estimates(lq_BxK, lq_BxK, lP_BxK, safe_log_z_B, real_BxK)[key]
  num_valid = jnp.maximum(jnp.sum(valid_B), 1)
  policy = jnp.sum(jnp.where(valid_B, policy_B, 0.0)) / num_valid
  proposal = jnp.sum(jnp.where(valid_B, proposal_B, 0.0)) / num_valid
  return policy < proposal


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# The batch comes from `align_jax.rollout`: samples of the proposal the rollout used, with
# sample_logp_BxK (log q), target_logp_BxK (log P) and prompt_index_B (each row's context).


def _baseline(stats: dict, baseline: str, divergence: str):
  """The baseline B of this step: the window's mean, forward KL's exact 1, or 0."""
  if baseline == "window":
    return baseline_window_mean(stats["window"])[0]
  if baseline == "exact":
    if divergence != "forward_kl":
      raise ConfigError(f"loss.baseline=exact (B = 1) is forward KL's; divergence is {divergence}")
    return FORWARD_KL_BASELINE
  if baseline == "none":
    return 0.0
  raise ConfigError(f"loss.baseline {baseline!r} is unknown; use window, exact or none")


def fdpg_objective(
  logp_BxK: jax.Array,
  batch: dict,
  stats: dict,
  *,
  divergence: str,
  alpha: float,
  outside_support: str,
  baseline: str,
  clip_log_ratio: float,
  baseline_window: int,
  proposal_criterion: str,
):
  """`fdpg` on a rollout batch, in the order of the module docstring: a per-prompt running Ẑ
  (`update_log_z`), a baseline (`baseline`: "window" of past pseudo-rewards, "exact" forward-KL
  one, or "none"), the loss, then the window push; all kept in `stats`. `alpha` is used by
  "amari" only and `clip_log_ratio` = 0 means no clipping. `stats["q_update"]` says whether π is
  now closer to p than the offline proposal q (`proposal_should_update`, §1.6; the anchor update
  acts on it every rollout.anchor_every steps when rollout.anchor = proposal)."""
  del baseline_window  # Its size is fixed when the statistics are created.
  lq_BxK, lP_BxK, x_B = batch["sample_logp_BxK"], batch["target_logp_BxK"], batch["prompt_index_B"]
  log_z_X, count_X = update_log_z(stats["log_z_X"], stats["count_X"], x_B, lP_BxK - lq_BxK)
  b = _baseline(stats, baseline, divergence)
  loss_B, metrics, used = fdpg(
    logp_BxK,
    lq_BxK,
    lP_BxK,
    log_z_X[x_B],
    b,
    divergence=divergence,
    alpha=alpha if divergence == "amari" else None,
    outside_support=outside_support,
    clip_log_ratio=clip_log_ratio or None,
  )
  window = baseline_window_push(stats["window"], used["pseudo_reward_BxK"], used["used_BxK"])
  q_update = proposal_should_update(
    logp_BxK, lq_BxK, lP_BxK, log_z_X[x_B], criterion=proposal_criterion
  )
  return (
    loss_B,
    metrics,
    {"log_z_X": log_z_X, "count_X": count_X, "window": window, "q_update": q_update},
  )


def fdpg_init_stats(num_contexts: int, loss_cfg: dict) -> dict:
  """f-DPG's initial statistics: log Ẑ = −inf and no count for each context, an empty baseline
  window of `loss_cfg["baseline_window"]` values, and no proposal update."""
  return {
    "log_z_X": jnp.full((num_contexts,), -jnp.inf, jnp.float32),
    "count_X": jnp.zeros((num_contexts,), jnp.float32),
    "window": baseline_window_init(loss_cfg["baseline_window"]),
    "q_update": jnp.zeros((), bool),
  }
