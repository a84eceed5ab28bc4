"""BOND and J-BOND: distil the Best-of-N distribution (Sessa et al. 2024, arXiv 2407.14622).

Per-batch losses on sampled responses (ALGORITHMS.md §2). One [B, K] layout for BOND and J-BOND:
per prompt, columns [0, M) are M samples y_j ∼ π_θ (the policy) and columns [M, K) are k samples
y'_m ∼ π_anchor (the reference for plain BOND, a moving anchor for iterative BOND and J-BOND), so a
caller concatenates [policy | anchor] along K and computes log π_θ, log π_anchor and rewards of all
K responses at once. The exact Best-of-N of enumerated tables (π_BoN, quantiles with ties, the
Jeffreys divergence) is the testbed's, `align_jax.testbed.bon`; the moving anchor is
`align_jax.rollout.ema`.
"""

import math

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError
from align_jax.objectives import policy_gradient

_BASELINES = ("mean_loo", "none")

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
    raise ConfigError(f"bond needs k = {num} anchor samples to be a positive multiple of n = {n}")
  reward_BxGxN = jax.lax.stop_gradient(reward_BxN).reshape(*reward_BxN.shape[:-1], -1, n)
  logp_BxGxN = logp_BxN.reshape(*logp_BxN.shape[:-1], -1, n)
  best_BxG = jnp.argmax(reward_BxGxN, axis=-1)  # First index among ties.
  best_logp_BxG = jnp.take_along_axis(logp_BxGxN, best_BxG[..., None], axis=-1)[..., 0]
  return -jnp.mean(best_logp_BxG, axis=-1), best_BxG[..., 0]


def bond_backward(
  logp_BxM: jax.Array,
  anchor_logp_BxM: jax.Array,
  log_quantile_BxM: jax.Array,
  *,
  n: int,
  baseline: str = "mean_loo",
):
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
    raise ConfigError(f"bond baseline must be one of {_BASELINES}; got {baseline!r}")
  log_ratio_BxM = jax.lax.stop_gradient(logp_BxM - anchor_logp_BxM)
  return_BxM = (n - 1) * jax.lax.stop_gradient(log_quantile_BxM) - log_ratio_BxM
  advantage_BxM = return_BxM
  if baseline == "mean_loo":
    advantage_BxM = return_BxM - policy_gradient.leave_one_out_mean(return_BxM)
  loss_B = -jnp.mean(jax.lax.stop_gradient(advantage_BxM) * logp_BxM, axis=-1)
  return loss_B, return_BxM


def bond(
  logp_BxK: jax.Array,
  anchor_logp_BxK: jax.Array,
  reward_BxK: jax.Array,
  *,
  num_policy: int,
  n: int,
  beta: float,
  quantile_clip: float | None = None,
  baseline: str = "mean_loo",
):
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
  moves it (`rollout.ema`, or a hard copy).

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
    raise ConfigError(f"bond needs 1 <= num_policy < K; got {num_policy} of {logp_BxK.shape[-1]}")
  clip = 1.0 / (2 * num_anchor) if quantile_clip is None else quantile_clip
  if not clip > 0:
    raise ConfigError(f"bond quantile_clip must be > 0; got {clip}")
  reward_BxK = jax.lax.stop_gradient(reward_BxK)
  forward_B, _ = bond_forward(logp_BxK[:, num_policy:], reward_BxK[:, num_policy:], n=n)
  quantile_BxM = mc_quantile(reward_BxK[:, :num_policy], reward_BxK[:, num_policy:])
  log_quantile_BxM = jnp.log(jnp.maximum(quantile_BxM, clip))
  logp_BxM = logp_BxK[:, :num_policy]
  anchor_logp_BxM = jax.lax.stop_gradient(anchor_logp_BxK[:, :num_policy])
  backward_B, return_BxM = bond_backward(
    logp_BxM, anchor_logp_BxM, log_quantile_BxM, n=n, baseline=baseline
  )
  metrics = {
    "quantile": jnp.mean(quantile_BxM, axis=-1),
    "return": jnp.mean(return_BxM, axis=-1),
    "forward_nll": jax.lax.stop_gradient(forward_B),
    "clipped": jnp.mean((quantile_BxM < clip).astype(quantile_BxM.dtype), axis=-1),
    "log_ratio": jnp.mean(jax.lax.stop_gradient(logp_BxM - anchor_logp_BxM), axis=-1),
  }
  return (1.0 - beta) * forward_B + beta * backward_B, metrics


def jbond(
  logp_Bx3: jax.Array,
  anchor_logp_Bx3: jax.Array,
  reward_Bx3: jax.Array,
  *,
  beta: float,
  gamma: float,
  log_penalty: float = -math.log(16.0),
  kl_in_backward: bool = False,
):
  r"""J-BOND: one policy sample, two anchor samples and a KL-to-anchor term (ALGORITHMS.md §2.6).

  .. math::
    \ell = -(1-\beta)\log\pi_\theta(y'_{\rm best})
           - \beta\,\mathrm{sg}[r_J(y) - \kappa\rho(y)]\log\pi_\theta(y)
           + \gamma\,\mathrm{sg}[\rho(y)]\log\pi_\theta(y)

  with ρ = log π_θ − log π_anchor, r_J(y) = `log_penalty` (−log 16) if r(y) < min(r(y'_1), r(y'_2))
  else 0 (Sessa et al. 2024, eq. 17 per [3P]), y'_best the better anchor sample (first on ties) and
  κ = 1 if `kl_in_backward` else 0. The γ term's expected gradient is ∇KL(π_θ‖π_anchor). Move the
  anchor with `rollout.anchor = "ema"`.

  Convention (differs from the paper's form, not from its gradient): the paper's backward return is
  r_J − ρ, the KL-to-anchor term inside the return, with γ an additional regulariser that its Fig. 5
  runs set to 0 (ABLATIONS.md §1.2, [3P]); that is `kl_in_backward=True`. The −ρ in the return
  adds β·ρ·∇log π_θ(y), the very estimator the γ term uses, so (κ = 1, γ) and (κ = 0, γ + β) give
  the same loss and gradient (tested). κ defaults to 0 so that γ alone is the anchor-KL weight (one knob
  instead of β + γ through two fields); the paper's form is γ = β with κ = 0 — configs/jbond.py's
  β = γ = 0.5 — and only the reported `return` metric differs.

  Args:
    logp_Bx3: policy log-probs of [y, y'_1, y'_2]: one policy sample, two anchor samples.
    anchor_logp_Bx3: the same under π_anchor (no gradient); only column 0 is read.
    reward_Bx3: their rewards (no gradient).
    beta: Jeffreys mix β ∈ [0, 1].
    gamma: weight γ of the KL-to-anchor regulariser.
    log_penalty: r_J of a policy sample worse than both anchor samples.
    kl_in_backward: also subtract ρ inside the backward return (the paper's form).

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
    raise ConfigError(f"jbond needs K = 3 ([policy, anchor, anchor]); got {logp_Bx3.shape[-1]}")
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


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# The batch comes from `align_jax.rollout`: K = the policy's samples, then the anchor's, with
# reward_BxK and anchor_logp_BxK.


def bond_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`bond` on a rollout batch; `cfg` is its keyword arguments (num_policy, n, beta, ...)."""
  return (*bond(logp_BxK, batch["anchor_logp_BxK"], batch["reward_BxK"], **cfg), stats)


def jbond_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`jbond` on a rollout batch; `cfg` is its keyword arguments (beta, gamma, ...)."""
  return (*jbond(logp_BxK, batch["anchor_logp_BxK"], batch["reward_BxK"], **cfg), stats)
