"""Exact Best-of-N of enumerated tables (Sessa et al. 2024, arXiv 2407.14622; ALGORITHMS.md §2).

Tables are [X, Y]: prompts × all responses, log-probs with -inf for zero mass, as in
`align_jax.testbed.exact`. The reference quantiles p≤ and p< with ties, the law log π_BoN of the
best of n reference samples, the Jeffreys divergence BOND minimises and the quantile a policy
reaches: the exact evaluation of BOND runs (its training losses are `objectives.bond`).
"""

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError
from align_jax.testbed import exact


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
  mass_by_level = jax.ops.segment_sum(
    jnp.exp(logp_sorted_Y - top_by_level[level_sorted_Y]), level_sorted_Y, num_segments=num
  )
  log_mass_by_level = jnp.log(mass_by_level) + top_by_level  # -inf for zero mass.
  log_le_by_level = jax.lax.cumlogsumexp(log_mass_by_level)
  log_lt_by_level = jnp.concatenate(
    [jnp.full((1,), -jnp.inf, log_le_by_level.dtype), log_le_by_level[:-1]]
  )
  level_Y = jnp.zeros_like(level_sorted_Y).at[order_Y].set(level_sorted_Y)
  return log_le_by_level[level_Y], log_lt_by_level[level_Y], log_mass_by_level[level_Y]


@jax.jit
def _levels(ref_logp_XxY, reward_XxY):
  """`_row_levels` of every prompt; jitted, as eager dispatch of its many small ops is slow."""
  reward_XxY = jnp.broadcast_to(reward_XxY, ref_logp_XxY.shape)
  return jax.vmap(_row_levels)(
    jax.lax.stop_gradient(ref_logp_XxY), jax.lax.stop_gradient(reward_XxY)
  )


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
    raise ConfigError(f"bon_logp needs n >= 1; got {n}")
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
  log_c_XxY = jnp.where(
    tiny_XxY, jnp.log(n), jnp.log(-jnp.expm1(n * safe_q_XxY)) - jnp.log(-jnp.expm1(safe_q_XxY))
  )
  safe_le_XxY = jnp.where(valid_XxY, log_le_XxY, 0.0)
  logp_XxY = ref_logp_XxY + (n - 1) * safe_le_XxY + log_c_XxY
  return jnp.where(valid_XxY, logp_XxY, -jnp.inf)


def jeffreys(
  logpi_XxY: jax.Array, logbon_XxY: jax.Array, prompt_logw_X: jax.Array, beta
) -> jax.Array:
  r"""Jeffreys divergence of BOND (Sessa et al. 2024, eq. 11; ALGORITHMS.md §2.2).

  .. math:: J_\beta(\pi, \pi_{\rm BoN}) = (1-\beta)\,\mathrm{KL}(\pi_{\rm BoN}\,\|\,\pi)
                                          + \beta\,\mathrm{KL}(\pi\,\|\,\pi_{\rm BoN})

  Both KLs are the prompt-weighted exact ones of `exact.kl`; differentiable in `logpi_XxY`.

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


def bon_quantile(
  logpi_XxY: jax.Array,
  ref_logp_XxY: jax.Array,
  reward_XxY: jax.Array,
  prompt_logw_X: jax.Array,
  *,
  log: bool = False,
) -> jax.Array:
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
