"""BOND and J-BOND: distil the Best-of-N distribution (Sessa et al. 2024, arXiv 2407.14622).

Two parts (ALGORITHMS.md §2):

* Exact Best-of-N on enumerated tables [X, Y] (prompts × all responses, log-probs, -inf for zero
  mass), for the testbed's exact evaluation: reference quantiles p≤ and p< with ties, log π_BoN,
  the Jeffreys divergence and the quantile reached by a policy.
* Per-batch losses on sampled responses. One [B, K] layout for BOND and J-BOND: per prompt,
  columns [0, M) are M samples y_j ∼ π_θ (the policy) and columns [M, K) are k samples
  y'_m ∼ π_anchor (the reference for plain BOND, a moving anchor for iterative BOND and J-BOND), so
  a caller concatenates [policy | anchor] along K and computes log π_θ, log π_anchor and rewards
  of all K responses at once.
"""

import math

import jax
import jax.numpy as jnp

from align_jax.objectives import policy_gradient
from align_jax.testbed import exact

_BASELINES = ("mean_loo", "none")

# -------------------------------------------------------------------------------------------------
# Exact Best-of-N on [X, Y] tables.


def _row_levels(ref_logp_Y, reward_Y):
  """Per response: log p≤, log p< and the log reference mass of its level set {y': r(y') = r(y)}."""
  num = reward_Y.shape[0]
  order_Y = jnp.argsort(reward_Y, stable=True)
  reward_sorted_Y = reward_Y[order_Y]
  logp_sorted_Y = ref_logp_Y[order_Y]
  starts_Y = jnp.concatenate([jnp.ones(1, bool), reward_sorted_Y[1:] != reward_sorted_Y[:-1]])
  level_sorted_Y = jnp.cumsum(starts_Y) - 1  # Level index (rank of the distinct reward).
  # Arrays indexed by level (at most Y levels; unused ones hold -inf mass). The log mass of each
  # level is a segment logsumexp: exact for tiny levels (no differences of cumulative sums).
  top_by_level = jax.ops.segment_max(logp_sorted_Y, level_sorted_Y, num_segments=num)
  top_by_level = jnp.where(jnp.isfinite(top_by_level), top_by_level, 0.0)
  mass_by_level = jax.ops.segment_sum(jnp.exp(logp_sorted_Y - top_by_level[level_sorted_Y]),
                                      level_sorted_Y, num_segments=num)
  log_mass_by_level = jnp.log(mass_by_level) + top_by_level  # -inf for zero mass.
  log_le_by_level = jax.lax.cumlogsumexp(log_mass_by_level)
  log_lt_by_level = jnp.concatenate([jnp.full((1,), -jnp.inf, log_le_by_level.dtype),
                                     log_le_by_level[:-1]])
  level_Y = jnp.zeros_like(level_sorted_Y).at[order_Y].set(level_sorted_Y)
  return log_le_by_level[level_Y], log_lt_by_level[level_Y], log_mass_by_level[level_Y]


@jax.jit
def _levels(ref_logp_XxY, reward_XxY):
  """`_row_levels` of every prompt; jitted, as eager dispatch of its many small ops is slow."""
  reward_XxY = jnp.broadcast_to(reward_XxY, ref_logp_XxY.shape)
  return jax.vmap(_row_levels)(jax.lax.stop_gradient(ref_logp_XxY),
                               jax.lax.stop_gradient(reward_XxY))


def quantiles(ref_logp_XxY: jax.Array, reward_XxY: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Reference reward quantiles of every response, with ties, per prompt.

  .. math:: p_\le(y) = P_{y'\sim\pi_{\rm ref}}[r(y') \le r(y)], \qquad
            p_<(y) = P_{y'\sim\pi_{\rm ref}}[r(y') < r(y)]

  Sorts each prompt's rewards, sums the reference mass of each level set of equal rewards (a
  segment logsumexp) and accumulates the levels in log space, so tiny quantiles keep their relative
  precision (ALGORITHMS.md §2.1). No gradient flows into the inputs.

  Args:
    ref_logp_XxY: reference log-probs of all responses of each prompt.
    reward_XxY: reward of every (prompt, response); ties allowed.

  Returns:
    (log p≤, log p<), each [X, Y]; log p< = −inf for the responses of the lowest reward.

  Examples:
    >>> ref = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    >>> log_le, log_lt = quantiles(ref, jnp.array([[0., 1., 1., 2.]]))
    >>> print(jnp.round(jnp.exp(log_le), 6), jnp.round(jnp.exp(log_lt), 6))   # ALGORITHMS.md §7.2
    [[0.1 0.6 0.6 1. ]] [[0.  0.1 0.1 0.6]]
  """
  log_le_XxY, log_lt_XxY, _ = _levels(ref_logp_XxY, reward_XxY)
  return log_le_XxY, log_lt_XxY


def bon_logp(ref_logp_XxY: jax.Array, reward_XxY: jax.Array, n: int) -> jax.Array:
  r"""log π_BoN: the law of the best of n i.i.d. reference samples (the first index wins ties).

  .. math::
    \pi_{\rm BoN}(y) = \frac{\pi_{\rm ref}(y)}{\pi_{\rm ref}(L(y))}\big(p_\le(y)^n - p_<(y)^n\big)
                     = \pi_{\rm ref}(y)\,p_\le(y)^{n-1}\,C_n(y), \quad
    C_n = \frac{1 - q^n}{1 - q},\ q = \frac{p_<}{p_\le}

  Sessa et al. 2024, Theorem 1 (ALGORITHMS.md §2.1); L(y) is the level set of r(y). Both
  log-diff-exps of the level-set form, log(p≤^n − p<^n) = n log p≤ + log(−expm1(n log q)) and
  log π_ref(L(y)) = log p≤ + log(−expm1(log q)), share log p≤; log q = −softplus(log π_ref(L) −
  log p<) comes from the level's own mass, so neither difference cancels catastrophically, even
  for near-continuous rewards (C_n → n). Responses of zero reference mass get −inf. n = 1 returns
  the reference; BoN_n(BoN_m) = BoN_nm.

  Args:
    ref_logp_XxY: reference log-probs of all responses of each prompt (the anchor, for iterative
      BOND).
    reward_XxY: reward of every (prompt, response); ties allowed.
    n: number of reference samples N ≥ 1.

  Returns:
    log π_BoN [X, Y] (rows normalised).

  Examples:
    >>> ref = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    >>> print(jnp.round(jnp.exp(bon_logp(ref, jnp.array([[0., 1., 1., 2.]]), 3)), 6))
    [[0.001 0.086 0.129 0.784]]
  """
  if n < 1:
    raise ValueError(f"bon_logp needs n >= 1; got {n}")
  ref_logp_XxY = jax.lax.stop_gradient(ref_logp_XxY)
  return _bon_logp(ref_logp_XxY, reward_XxY, jnp.asarray(n, ref_logp_XxY.dtype))


@jax.jit
def _bon_logp(ref_logp_XxY, reward_XxY, n):
  """`bon_logp` for n ≥ 1; n is traced, so one compilation serves every n."""
  log_le_XxY, log_lt_XxY, log_level_XxY = _levels(ref_logp_XxY, reward_XxY)
  valid_XxY = ref_logp_XxY > -jnp.inf  # Then the level and p≤ are positive too.
  log_q_XxY = -jax.nn.softplus(jnp.where(valid_XxY, log_level_XxY - log_lt_XxY, 0.0))
  # log q = 0 only when the level's mass underflows next to p<: the continuous limit C_n = n.
  tiny_XxY = log_q_XxY == 0
  safe_q_XxY = jnp.where(tiny_XxY, -1.0, log_q_XxY)
  log_c_XxY = jnp.where(tiny_XxY, jnp.log(n),
                        jnp.log(-jnp.expm1(n * safe_q_XxY)) - jnp.log(-jnp.expm1(safe_q_XxY)))
  safe_le_XxY = jnp.where(valid_XxY, log_le_XxY, 0.0)
  logp_XxY = ref_logp_XxY + (n - 1) * safe_le_XxY + log_c_XxY
  return jnp.where(valid_XxY, logp_XxY, -jnp.inf)


def jeffreys(logpi_XxY: jax.Array, logbon_XxY: jax.Array, prompt_logw_X: jax.Array,
             beta) -> jax.Array:
  r"""Jeffreys divergence of BOND (Sessa et al. 2024, eq. 11; ALGORITHMS.md §2.2).

  .. math:: J_\beta(\pi, \pi_{\rm BoN}) = (1-\beta)\,\mathrm{KL}(\pi_{\rm BoN}\,\|\,\pi)
                                          + \beta\,\mathrm{KL}(\pi\,\|\,\pi_{\rm BoN})

  Both KLs are the prompt-weighted exact ones of `testbed.exact.kl`; differentiable in `logpi_XxY`.

  Args:
    logpi_XxY: the policy π.
    logbon_XxY: the target π_BoN (from `bon_logp`).
    prompt_logw_X: log prompt weights.
    beta: mix β ∈ [0, 1]: 0 = forward KL only, 1 = backward KL only.

  Returns:
    Scalar J_β in nats.

  Examples:
    >>> ref = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    >>> bon = bon_logp(ref, jnp.array([[0., 1., 1., 2.]]), 3)
    >>> pi = jnp.log(jnp.array([[0.05, 0.15, 0.3, 0.5]]))
    >>> print(f"{jeffreys(pi, bon, jnp.zeros(1), 0.5):.5f}")   # 0.249677, ALGORITHMS.md §7.2
    0.24968
  """
  forward = exact.kl(logbon_XxY, logpi_XxY, prompt_logw_X)
  backward = exact.kl(logpi_XxY, logbon_XxY, prompt_logw_X)
  return (1.0 - beta) * forward + beta * backward


def bon_quantile(logpi_XxY: jax.Array, ref_logp_XxY: jax.Array, reward_XxY: jax.Array,
                 prompt_logw_X: jax.Array, *, log: bool = False) -> jax.Array:
  r"""The reference quantile a policy reaches: E_π[p≤(y)] (or E_π[log p≤(y)] with `log=True`).

  p≤ is under the reference (`quantiles`). π_ref itself scores E[p≤] = (1 + Σ_levels m_L²)/2 ≥ ½,
  and BoN_N scores E_BoN[log p≤] ≈ −1/N for continuous rewards; log p≤ is BOND's reward
  (ALGORITHMS.md §2.4; the E_π[log p≤] column of ABLATIONS.md §4.3). Differentiable in `logpi_XxY`.

  Args:
    logpi_XxY: the policy π.
    ref_logp_XxY: the reference the quantiles are taken under.
    reward_XxY: reward of every (prompt, response).
    prompt_logw_X: log prompt weights.
    log: average log p≤ instead of p≤.

  Returns:
    Scalar prompt-weighted expectation.

  Examples:
    >>> ref = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    >>> pi = jnp.log(jnp.array([[0.05, 0.15, 0.3, 0.5]]))
    >>> print(f"{bon_quantile(pi, ref, jnp.array([[0., 1., 1., 2.]]), jnp.zeros(1)):.3f}")
    0.775
  """
  log_le_XxY, _ = quantiles(ref_logp_XxY, reward_XxY)
  values_XxY = log_le_XxY if log else jnp.exp(log_le_XxY)
  return exact.expectation(logpi_XxY, values_XxY, prompt_logw_X)


# -------------------------------------------------------------------------------------------------
# Per-batch estimators on [B, K] = [policy samples | anchor samples].


def mc_quantile(reward_BxM: jax.Array, anchor_reward_BxN: jax.Array) -> jax.Array:
  r"""Monte-Carlo quantile p̂≤(y_j) = (1/k) Σ_m 1[r(y'_m) ≤ r(y_j)] against k anchor samples.

  An unbiased estimate of p≤(y_j) under the anchor (ALGORITHMS.md §2.4); its log is biased low
  for small k. No gradient (an indicator).

  Args:
    reward_BxM: rewards of M policy samples per prompt.
    anchor_reward_BxN: rewards of k anchor samples of the same prompt.

  Returns:
    p̂≤ [B, M] in {0, 1/k, ..., 1}.

  Examples:
    >>> print(mc_quantile(jnp.array([[1.]]), jnp.array([[0., 2., 1., 1.]])))   # ALGORITHMS.md §7.2
    [[0.75]]
  """
  reward_BxM, anchor_reward_BxN = jax.lax.stop_gradient((reward_BxM, anchor_reward_BxN))
  beaten_BxMxN = anchor_reward_BxN[:, None, :] <= reward_BxM[:, :, None]
  dtype = jnp.result_type(reward_BxM.dtype, anchor_reward_BxN.dtype, float)
  return jnp.mean(beaten_BxMxN.astype(dtype), axis=-1)


def bond_forward(logp_BxN: jax.Array, reward_BxN: jax.Array, *, n: int):
  r"""Forward-KL term: negative log-likelihood of the best of n anchor samples.

  .. math:: \ell_{\rm FW} = -\frac{1}{G}\sum_{g=1}^{G}\log\pi_\theta(y'_{\rm best}(g)),\quad
            y'_{\rm best}(g) = \arg\max_{m \in g} r(y'_m)

  The k = G·n anchor samples are split into G consecutive groups of n; the best of each group
  (first index on ties) is an exact sample of BoN_n(π_anchor), so E[∇ℓ_FW] = ∇KL(π_BoN‖π_θ)
  (ALGORITHMS.md §2.3).

  Args:
    logp_BxN: policy log-probs of the k anchor samples (differentiated).
    reward_BxN: their rewards (no gradient).
    n: N of the Best-of-N; k must be a multiple of n.

  Returns:
    (loss_B, best_B): the mean NLL of the G best samples and the column (in [0, k)) of the first
    group's best.

  Examples:
    >>> loss, best = bond_forward(jnp.array([[-1., -4., -2., -3.]]), jnp.array([[0., 2., 1., 1.]]),
    ...                           n=2)
    >>> print(f"{loss[0]:.1f} {best[0]}")   # groups [0, 2] and [1, 1] pick columns 1 and 2
    3.0 1
  """
  num = logp_BxN.shape[-1]
  if n < 1 or num % n:
    raise ValueError(f"bond needs k = {num} anchor samples to be a positive multiple of n = {n}")
  reward_BxGxN = jax.lax.stop_gradient(reward_BxN).reshape(*reward_BxN.shape[:-1], -1, n)
  logp_BxGxN = logp_BxN.reshape(*logp_BxN.shape[:-1], -1, n)
  best_BxG = jnp.argmax(reward_BxGxN, axis=-1)  # First index among ties.
  best_logp_BxG = jnp.take_along_axis(logp_BxGxN, best_BxG[..., None], axis=-1)[..., 0]
  return -jnp.mean(best_logp_BxG, axis=-1), best_BxG[..., 0]


def bond_backward(logp_BxM: jax.Array, anchor_logp_BxM: jax.Array, log_quantile_BxM: jax.Array, *,
                  n: int, baseline: str = "mean_loo"):
  r"""Backward-KL term: policy gradient with BOND's quantile reward (ALGORITHMS.md §2.4).

  .. math::
    R_j = (n-1)\log p_\le(y_j) - (\log\pi_\theta(y_j) - \log\pi_{\rm anchor}(y_j)), \quad
    \ell_{\rm BW} = -\frac{1}{M}\sum_j \mathrm{sg}[R_j - b_j]\,\log\pi_\theta(y_j)

  All of R_j is detached. Since log π_BoN = log π_anchor + (n−1) log p≤ + log C_n exactly,
  E[∇ℓ_BW] = ∇KL(π_θ‖π_BoN) + E_π[log C_n·∇log π_θ] with the exact quantile; the dropped log C_n
  is ≈ log n, a constant with no expected gradient, for near-continuous rewards. b_j is the mean of
  the other samples' R (`"mean_loo"`, M ≥ 2; unbiased) or 0 (`"none"`).

  Args:
    logp_BxM: policy log-probs of M policy samples per prompt (differentiated).
    anchor_logp_BxM: their anchor log-probs (no gradient).
    log_quantile_BxM: log p≤ (or log p̂≤, clipped) of each policy sample (no gradient).
    n: N of the Best-of-N target.
    baseline: "mean_loo" or "none".

  Returns:
    (loss_B, return_BxM): the surrogate and the returns R.

  Examples:
    >>> pi = jnp.log(jnp.array([[0.05, 0.15, 0.3, 0.5]]))   # The four outcomes as M = 4 samples.
    >>> ref = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    >>> log_le = jnp.log(jnp.array([[0.1, 0.6, 0.6, 1.0]]))
    >>> _, ret = bond_backward(pi, ref, log_le, n=3, baseline="none")
    >>> print(" ".join(f"{r:.4f}" for r in ret[0]))   # BOND reward row, ALGORITHMS.md §7.2
    -3.9120 -0.7340 -1.0217 -0.2231
  """
  if baseline not in _BASELINES:
    raise ValueError(f"bond baseline must be one of {_BASELINES}; got {baseline!r}")
  log_ratio_BxM = jax.lax.stop_gradient(logp_BxM - anchor_logp_BxM)
  return_BxM = (n - 1) * jax.lax.stop_gradient(log_quantile_BxM) - log_ratio_BxM
  advantage_BxM = return_BxM
  if baseline == "mean_loo":
    advantage_BxM = return_BxM - policy_gradient.leave_one_out_mean(return_BxM)
  loss_B = -jnp.mean(jax.lax.stop_gradient(advantage_BxM) * logp_BxM, axis=-1)
  return loss_B, return_BxM


def bond(logp_BxK: jax.Array, anchor_logp_BxK: jax.Array, reward_BxK: jax.Array, *,
         num_policy: int, n: int, beta: float, quantile_clip: float | None = None,
         baseline: str = "mean_loo"):
  r"""BOND: Jeffreys-divergence Best-of-N distillation (Sessa et al. 2024; ALGORITHMS.md §2.3–2.5).

  .. math::
    \ell = (1-\beta)\,\ell_{\rm FW} + \beta\,\ell_{\rm BW}, \qquad
    R_j = (n-1)\log\max(\hat p_\le(y_j), c) - (\log\pi_\theta(y_j) - \log\pi_{\rm anchor}(y_j))

  Layout of K: columns [0, M) are M = `num_policy` samples y_j ∼ π_θ, columns [M, K) are
  k = K − M samples y'_m ∼ π_anchor (k a multiple of n). ℓ_FW (`bond_forward`) is the NLL of the
  best anchor sample of each group of n; ℓ_BW (`bond_backward`) is the policy gradient with return
  R_j, where p̂≤ (`mc_quantile`) counts the k anchor samples with r(y'_m) ≤ r(y_j) and is clipped
  at c = 1/(2k) by default (third-party code, [3P]). Its expected gradient approximates
  ∇J_β(π_θ, BoN_n(π_anchor)): exactly for the forward part, up to the log C_n term and the Jensen
  bias of log p̂≤ for the backward one. Plain BOND uses the reference as the anchor; iterative BOND
  moves it (`ema`, or a hard copy).

  Args:
    logp_BxK: sequence log-probs of all K responses under the policy (differentiated).
    anchor_logp_BxK: the same under π_anchor (no gradient); only the policy columns are read.
    reward_BxK: rewards of all K responses (no gradient).
    num_policy: M ≥ 1 (≥ 2 with the leave-one-out baseline).
    n: N of the Best-of-N target.
    beta: Jeffreys mix β ∈ [0, 1]: 0 = forward only, 1 = backward only.
    quantile_clip: c, the floor of p̂≤ (None: 1/(2k)); must be > 0.
    baseline: "mean_loo" (mean of the other policy samples' R) or "none".

  Returns:
    loss_B and per-prompt metrics: mean p̂≤ before clipping (`quantile`), mean R (`return`), the
    forward NLL (`forward_nll`), the fraction of policy samples clipped (`clipped`) and the mean
    log π_θ − log π_anchor of the policy samples (`log_ratio`).

  Examples:
    >>> logp = jnp.array([[-3., -2., -4., -1., -5.]])   # [y | y'_1..y'_4]
    >>> loss, m = bond(logp, jnp.full((1, 5), -3.), jnp.array([[1., 0., 2., 1., 1.]]),
    ...                num_policy=1, n=4, beta=0.5, baseline="none")
    >>> print(f"{m['quantile'][0]:.2f} {m['forward_nll'][0]:.1f}")   # §7.2 p̂≤; best is y'_2
    0.75 4.0
  """
  num_anchor = logp_BxK.shape[-1] - num_policy
  if num_policy < 1 or num_anchor < 1:
    raise ValueError(f"bond needs 1 <= num_policy < K; got {num_policy} of {logp_BxK.shape[-1]}")
  clip = 1.0 / (2 * num_anchor) if quantile_clip is None else quantile_clip
  if not clip > 0:
    raise ValueError(f"bond quantile_clip must be > 0; got {clip}")
  reward_BxK = jax.lax.stop_gradient(reward_BxK)
  forward_B, _ = bond_forward(logp_BxK[:, num_policy:], reward_BxK[:, num_policy:], n=n)
  quantile_BxM = mc_quantile(reward_BxK[:, :num_policy], reward_BxK[:, num_policy:])
  log_quantile_BxM = jnp.log(jnp.maximum(quantile_BxM, clip))
  logp_BxM = logp_BxK[:, :num_policy]
  anchor_logp_BxM = jax.lax.stop_gradient(anchor_logp_BxK[:, :num_policy])
  backward_B, return_BxM = bond_backward(logp_BxM, anchor_logp_BxM, log_quantile_BxM, n=n,
                                         baseline=baseline)
  metrics = {
      "quantile": jnp.mean(quantile_BxM, axis=-1),
      "return": jnp.mean(return_BxM, axis=-1),
      "forward_nll": jax.lax.stop_gradient(forward_B),
      "clipped": jnp.mean((quantile_BxM < clip).astype(quantile_BxM.dtype), axis=-1),
      "log_ratio": jnp.mean(jax.lax.stop_gradient(logp_BxM - anchor_logp_BxM), axis=-1),
  }
  return (1.0 - beta) * forward_B + beta * backward_B, metrics


def jbond(logp_Bx3: jax.Array, anchor_logp_Bx3: jax.Array, reward_Bx3: jax.Array, *, beta: float,
          gamma: float, log_penalty: float = -math.log(16.0), kl_in_backward: bool = False):
  r"""J-BOND: one policy sample, two anchor samples and a KL-to-anchor term (ALGORITHMS.md §2.6).

  .. math::
    \ell = -(1-\beta)\log\pi_\theta(y'_{\rm best})
           - \beta\,\mathrm{sg}[r_J(y) - \kappa\rho(y)]\log\pi_\theta(y)
           + \gamma\,\mathrm{sg}[\rho(y)]\log\pi_\theta(y)

  with ρ = log π_θ − log π_anchor, r_J(y) = `log_penalty` (−log 16) if r(y) < min(r(y'_1), r(y'_2))
  else 0 (Sessa et al. 2024, eq. 17 per [3P]), y'_best the better anchor sample (first on ties) and
  κ = 1 if `kl_in_backward` else 0. The γ term's expected gradient is ∇KL(π_θ‖π_anchor). Whether the
  paper's backward return also carries −ρ is ambiguous (third-party code does); the default keeps
  r_J alone and lets γ control the anchor KL, as §2.6 recommends. Move the anchor with `ema`.

  Args:
    logp_Bx3: policy log-probs of [y, y'_1, y'_2]: one policy sample, two anchor samples.
    anchor_logp_Bx3: the same under π_anchor (no gradient); only column 0 is read.
    reward_Bx3: their rewards (no gradient).
    beta: Jeffreys mix β ∈ [0, 1].
    gamma: weight γ of the KL-to-anchor regulariser.
    log_penalty: r_J of a policy sample worse than both anchor samples.
    kl_in_backward: also subtract ρ inside the backward return.

  Returns:
    loss_B and per-prompt metrics: the backward return (`return`), 1[r_J < 0] (`penalised`), the
    forward NLL (`forward_nll`) and ρ (`log_ratio`, a one-sample estimate of KL(π_θ‖π_anchor)).

  Examples:
    >>> loss, m = jbond(jnp.full((2, 3), -2.), jnp.full((2, 3), -2.),
    ...                 jnp.array([[0.5, 1., 2.], [0.5, 0.2, 2.]]), beta=0.5, gamma=0.0)
    >>> print(f"{m['return'][0]:.6f} {m['return'][1]:.1f}")   # −log 16 and 0, ALGORITHMS.md §7.2
    -2.772589 0.0
  """
  if logp_Bx3.shape[-1] != 3:
    raise ValueError(f"jbond needs K = 3 ([policy, anchor, anchor]); got {logp_Bx3.shape[-1]}")
  reward_Bx3 = jax.lax.stop_gradient(reward_Bx3)
  forward_B, _ = bond_forward(logp_Bx3[:, 1:], reward_Bx3[:, 1:], n=2)
  logp_B = logp_Bx3[:, 0]
  log_ratio_B = jax.lax.stop_gradient(logp_B - anchor_logp_Bx3[:, 0])
  penalised_B = reward_Bx3[:, 0] < jnp.min(reward_Bx3[:, 1:], axis=-1)
  return_B = jnp.where(penalised_B, log_penalty, 0.0).astype(log_ratio_B.dtype)
  if kl_in_backward:
    return_B = return_B - log_ratio_B
  backward_B = -return_B * logp_B
  regulariser_B = log_ratio_B * logp_B
  metrics = {
      "return": return_B,
      "penalised": penalised_B.astype(log_ratio_B.dtype),
      "forward_nll": jax.lax.stop_gradient(forward_B),
      "log_ratio": log_ratio_B,
  }
  return (1.0 - beta) * forward_B + beta * backward_B + gamma * regulariser_B, metrics


def ema(anchor_params, params, eta):
  r"""Moving anchor: θ_anchor ← (1 − η)·θ_anchor + η·θ, leaf by leaf (J-BOND, eq. 18 per [3P]).

  Args:
    anchor_params: the anchor pytree.
    params: the policy pytree (same structure).
    eta: EMA rate η ∈ [0, 1] (≈ 0.02 in the paper [3P]); 1 is a hard anchor copy.

  Returns:
    The new anchor pytree.

  Examples:
    >>> print(ema({"w": jnp.array([1., 0.])}, {"w": jnp.array([3., 4.])}, 0.25)["w"])
    [1.5 1. ]
  """
  return jax.tree.map(lambda a, p: (1.0 - eta) * a + eta * p, anchor_params,
                      jax.lax.stop_gradient(params))
