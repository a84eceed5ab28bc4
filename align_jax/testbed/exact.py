"""Exact metrics between conditional policies given as full log-prob tables.

A conditional policy on the testbed is a table `logp_XxY` of log π(y|x) over
ALL responses y of every prompt x (rows normalised; -inf marks zero
probability), and the prompt distribution is `prompt_logw_X` (log-weights,
summing to one in probability space). Divergences are prompt-weighted averages
of per-prompt conditional divergences, in nats:
  D(π‖ρ) = Σ_x w_x D(π(·|x) ‖ ρ(·|x)).
Zero probabilities follow the conventions 0·log 0 = 0 and p·log(p/0) = +inf;
every `jnp.where` is applied to safe inputs so that gradients stay finite
wherever the value is finite. All functions are dtype-generic and jit-able.

`prefix_logps` builds such a table from any autoregressive model with a single
forward pass over the V**(T-1) response prefixes of every prompt.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.objectives import fdpg
from align_jax.errors import ConfigError

Array = jax.Array


def _safe_prob(logp):
  """(p, p > 0) with p = exp(logp); underflowed entries count as zero mass."""
  p = jnp.exp(logp)
  return p, p > 0


def _plog_ratio(logp, logq):
  """Elementwise p·(log p − log q): 0 where p = 0, +inf where q = 0 < p."""
  p, support = _safe_prob(logp)
  safe_logp = jnp.where(support, logp, 0.0)
  safe_logq = jnp.where(support, logq, 0.0)
  return jnp.where(support, p * (safe_logp - safe_logq), 0.0)


def _prompt_mean(values_X, prompt_logw_X):
  """Σ_x w_x v_x, ignoring prompts of zero weight (so 0·inf = 0)."""
  w_X, support = _safe_prob(prompt_logw_X)
  return jnp.sum(jnp.where(support, w_X * jnp.where(support, values_X, 0.0), 0.0))


def _kl_X(logp_XxY, logq_XxY):
  """Per-prompt KL(p(·|x) ‖ q(·|x))."""
  return jnp.sum(_plog_ratio(logp_XxY, logq_XxY), axis=-1)


def kl(logp_XxY: Array, logq_XxY: Array, prompt_logw_X: Array) -> Array:
  """KL(p‖q) = Σ_x w_x Σ_y p(y|x) (log p(y|x) − log q(y|x)).

  Args:
    logp_XxY: log-probs of p over all responses of each prompt.
    logq_XxY: log-probs of q, same layout.
    prompt_logw_X: log prompt weights.

  Returns:
    Scalar; +inf if q(y|x) = 0 < p(y|x) for a prompt of positive weight.
  """
  return _prompt_mean(_kl_X(logp_XxY, logq_XxY), prompt_logw_X)


def tv(logp_XxY: Array, logq_XxY: Array, prompt_logw_X: Array) -> Array:
  """Total variation Σ_x w_x ½ Σ_y |p(y|x) − q(y|x)|, in [0, 1]."""
  diff_XxY = jnp.abs(jnp.exp(logp_XxY) - jnp.exp(logq_XxY))
  return _prompt_mean(0.5 * jnp.sum(diff_XxY, axis=-1), prompt_logw_X)


def _log_mixture(logp, logq):
  """log((p + q) / 2); -inf where both are zero, with finite gradients."""
  both_zero = (logp == -jnp.inf) & (logq == -jnp.inf)
  safe_p = jnp.where(both_zero, 0.0, logp)
  safe_q = jnp.where(both_zero, 0.0, logq)
  logm = jnp.logaddexp(safe_p, safe_q) - math.log(2.0)
  return jnp.where(both_zero, -jnp.inf, logm)


def js(logp_XxY: Array, logq_XxY: Array, prompt_logw_X: Array) -> Array:
  """Jensen–Shannon ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2; in [0, log 2]."""
  logm_XxY = _log_mixture(logp_XxY, logq_XxY)
  js_X = 0.5 * (_kl_X(logp_XxY, logm_XxY) + _kl_X(logq_XxY, logm_XxY))
  return _prompt_mean(js_X, prompt_logw_X)


def _safe_log_ratio(logpi_XxY, logp_XxY):
  """(log(π/p) where both are > 0 and 0 elsewhere, π > 0, p > 0); finite, with finite gradients."""
  pi_pos, p_pos = jnp.exp(logpi_XxY) > 0, jnp.exp(logp_XxY) > 0
  both = pi_pos & p_pos
  ell_XxY = jnp.where(both, jnp.where(both, logpi_XxY, 0.0) - jnp.where(both, logp_XxY, 0.0), 0.0)
  return ell_XxY, pi_pos, p_pos


def f_divergence(
  logpi_XxY: Array,
  logp_XxY: Array,
  prompt_logw_X: Array,
  divergence: str,
  *,
  alpha: float | None = None,
) -> Array:
  r"""Exact D_f(π‖p) = Σ_x w_x E_{p(·|x)}[f(π(y|x)/p(y|x))] by enumeration over a testbed table.

  The f-divergence convention of ALGORITHMS.md §0 for the divergences f-DPG trains on
  (`objectives.fdpg.DIVERGENCES`), averaged over prompts like the rest of this module, whose KL, TV
  and JS it calls (forward KL is kl(p, π), reverse KL kl(π, p)). The others in closed form, with
  0·f(0/0) = 0 and the +∞ limits where a mass has nothing to be compared with:

  .. math::
    D_\alpha = \frac{\sum_y \pi^\alpha p^{1-\alpha} - 1}{\alpha(\alpha - 1)},\qquad
    \chi^2(\pi\|p) = E_\pi[\pi/p] - 1,\qquad \chi^2(p\|\pi) = E_p[p/\pi] - 1

  Differentiable in both tables (gradients are finite wherever the value is), so that tests compare
  `jax.grad` of it with the expected f-DPG gradient (ALGORITHMS.md §1.11).

  Args:
    logpi_XxY: log π(y|x) of the policy over all responses of every prompt (rows normalised).
    logp_XxY: log p(y|x) of the normalised target, same layout (−inf outside its support).
    prompt_logw_X: log prompt weights (summing to one in probability space).
    divergence: one of `objectives.fdpg.DIVERGENCES`.
    alpha: the Amari order (only for "amari").

  Returns:
    The scalar divergence in nats; +inf where it is infinite (e.g. reverse KL with π > 0 = p).

  Examples:
    >>> logpi = jax.nn.log_softmax(jnp.array([[0., 0.5, -0.5, 1.]]))
    >>> log_a, r = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]])), jnp.array([1., 0, 2, -1])
    >>> logp = jax.nn.log_softmax(log_a + r)
    >>> d = [f_divergence(logpi, logp, jnp.zeros(1), k)
    ...      for k in ("forward_kl", "reverse_kl", "tv", "js")]
    >>> print(jnp.stack(d).round(4))   # 0.976155 1.601807 0.615001 0.247983, ALGORITHMS.md §7.1
    [0.9762 1.6018 0.615  0.248 ]
    >>> print(f"{f_divergence(logpi, logp, jnp.zeros(1), 'amari', alpha=0.5):.5f}")
    1.10915
  """
  fdpg.check_divergence(divergence, alpha)
  if divergence == "forward_kl":
    return kl(logp_XxY, logpi_XxY, prompt_logw_X)
  if divergence == "reverse_kl":
    return kl(logpi_XxY, logp_XxY, prompt_logw_X)
  if divergence == "tv":
    return tv(logpi_XxY, logp_XxY, prompt_logw_X)
  if divergence == "js":
    return js(logpi_XxY, logp_XxY, prompt_logw_X)
  ell_XxY, pi_pos, p_pos = _safe_log_ratio(logpi_XxY, logp_XxY)
  if divergence == "pearson":  # E_π[t] − 1; t = +inf where p = 0 < π.
    t_XxY = jnp.where(p_pos, jnp.exp(ell_XxY), jnp.inf)
    return expectation(logpi_XxY, t_XxY, prompt_logw_X) - 1.0
  if divergence == "neyman":  # E_p[1/t] − 1; 1/t = +inf where π = 0 < p.
    inv_t_XxY = jnp.where(pi_pos, jnp.exp(-ell_XxY), jnp.inf)
    return expectation(logp_XxY, inv_t_XxY, prompt_logw_X) - 1.0
  # Amari: Σ π^α p^{1−α} = E_π[t^{α−1}] for α > 0 (π = 0 adds 0), E_p[t^α] for α < 0 (p = 0 adds 0).
  # A mass of the measure where the other distribution is 0 adds +inf for α > 1 or α < 0, else 0.
  off_support = jnp.inf if (alpha > 1.0 or alpha < 0.0) else 0.0
  if alpha > 0:
    term_XxY = jnp.where(p_pos, jnp.exp((alpha - 1.0) * ell_XxY), off_support)
    mass = expectation(logpi_XxY, term_XxY, prompt_logw_X)
  else:
    term_XxY = jnp.where(pi_pos, jnp.exp(alpha * ell_XxY), off_support)
    mass = expectation(logp_XxY, term_XxY, prompt_logw_X)
  return (mass - 1.0) / (alpha * (alpha - 1.0))


def entropy(logp_XxY: Array, prompt_logw_X: Array) -> Array:
  """Mean conditional entropy Σ_x w_x (−Σ_y p(y|x) log p(y|x))."""
  ent_X = -jnp.sum(_plog_ratio(logp_XxY, jnp.zeros_like(logp_XxY)), axis=-1)
  return _prompt_mean(ent_X, prompt_logw_X)


def expected_distinct(
  logp_XxY: Array,
  responses_YxT: np.ndarray,
  prompt_logw_X: Array,
  *,
  num_samples: int,
  vocab: int,
  orders=(1, 2),
) -> dict[str, Array]:
  """Expected Distinct-n of `num_samples` i.i.d. responses per prompt, exactly (no sampling).

  Distinct-n = #distinct n-grams / #n-grams in the M = num_samples responses of a prompt; the
  denominator M·(T − n + 1) is fixed, and an n-gram g is among the samples with probability
  1 − (1 − P_π(g ∈ y | x))^M, so E[#distinct] = Σ_g 1 − (1 − P(g ∈ y))^M with P(g ∈ y) enumerated
  (ABLATIONS.md §2.3). "seq" treats whole responses as the items: the expected share of distinct
  responses among the M. Prompt-weighted like every metric here.

  Args:
    logp_XxY: the policy π over all responses (lexicographic, as `responses_YxT`).
    responses_YxT: every response's tokens (numpy: the n-gram tables are built at trace time).
    prompt_logw_X: log prompt weights.
    num_samples: M ≥ 1 responses per prompt.
    vocab: tokens range over 0..vocab−1.
    orders: the n of each Distinct-n, each ≤ T.

  Returns:
    {"exact/distinct_<n>": ... for n in orders, "exact/distinct_seq": ...}, each in [0, 1].
  """
  num_y, length = responses_YxT.shape
  p_XxY = jnp.exp(logp_XxY)
  out = {}
  for n in orders:
    if not 1 <= n <= length:
      raise ConfigError(f"expected_distinct: order {n} is not in 1..{length}")
    gram_YxW = sum(
      responses_YxT[:, i : i + length - n + 1].astype(np.int64) * vocab ** (n - 1 - i)
      for i in range(n)
    )  # Each window's n-gram as one integer id.
    occurs_YxG = np.zeros((num_y, vocab**n), np.float32)
    occurs_YxG[np.arange(num_y)[:, None], gram_YxW] = 1.0
    hit_XxG = jnp.clip(p_XxY @ occurs_YxG.astype(p_XxY.dtype), 0.0, 1.0)
    count_X = jnp.sum(-jnp.expm1(num_samples * jnp.log1p(-hit_XxG)), axis=-1)
    out[f"exact/distinct_{n}"] = _prompt_mean(count_X, prompt_logw_X) / (
      num_samples * (length - n + 1)
    )
  seq_X = jnp.sum(-jnp.expm1(num_samples * jnp.log1p(-jnp.clip(p_XxY, 0.0, 1.0))), axis=-1)
  out["exact/distinct_seq"] = _prompt_mean(seq_X, prompt_logw_X) / num_samples
  return out


def expectation(logp_XxY: Array, values_XxY: Array, prompt_logw_X: Array) -> Array:
  """E[v] = Σ_x w_x Σ_y p(y|x) v(x, y); values where p = 0 are ignored."""
  p_XxY, support = _safe_prob(logp_XxY)
  values_XxY = jnp.broadcast_to(values_XxY, p_XxY.shape).astype(p_XxY.dtype)
  safe_v = jnp.where(support, values_XxY, 0.0)
  mean_X = jnp.sum(jnp.where(support, p_XxY * safe_v, 0.0), axis=-1)
  return _prompt_mean(mean_X, prompt_logw_X)


def normalize(logits_XxY: Array) -> Array:
  """Row-wise log-softmax: logits − logsumexp(logits) per prompt."""
  return logits_XxY - jax.nn.logsumexp(logits_XxY, axis=-1, keepdims=True)


def win_rate(
  logp_XxY: Array, ref_logp_XxY: Array, reward_XxY: Array, prompt_logw_X: Array
) -> Array:
  """P(r(x, y) > r(x, y')) + ½ P(r(x, y) = r(x, y')), x ∼ w, y ∼ π(·|x), y' ∼ ρ(·|x) independent.

  The exact win rate of π against ρ (the reference) under the reward, ties counted ½: per prompt
  the responses are sorted by reward once, so with F⁻ / F⁺ the ρ-mass of rewards below / at most
  r(x, y), Σ_y π(y|x) ½(F⁻ + F⁺) is the sum over all Y² pairs. π = ρ gives exactly ½.
  """
  p_XxY, support = _safe_prob(logp_XxY)
  q_XxY = jnp.exp(ref_logp_XxY)
  reward_XxY = jnp.broadcast_to(reward_XxY, p_XxY.shape).astype(p_XxY.dtype)

  def beaten_Y(reward_Y, q_Y):  # ½(F⁻ + F⁺) at each response's reward.
    order_Y = jnp.argsort(reward_Y)
    sorted_Y = reward_Y[order_Y]
    cdf_Y1 = jnp.concatenate([jnp.zeros(1, q_Y.dtype), jnp.cumsum(q_Y[order_Y])])
    below_Y = cdf_Y1[jnp.searchsorted(sorted_Y, reward_Y, side="left")]
    at_most_Y = cdf_Y1[jnp.searchsorted(sorted_Y, reward_Y, side="right")]
    return 0.5 * (below_Y + at_most_Y)

  beaten_XxY = jax.vmap(beaten_Y)(reward_XxY, q_XxY)
  win_X = jnp.sum(jnp.where(support, p_XxY * beaten_XxY, 0.0), axis=-1)
  return _prompt_mean(win_X, prompt_logw_X)


def dominance(u_N: Array, v_N: Array, num_quantiles: int = 99) -> dict[str, Array]:
  """First-order stochastic dominance diagnostics of the sample u over the sample v (AOT).

  Empirical quantile functions Q_u, Q_v (linear interpolation) on the grid t = i/(num_quantiles+1),
  i = 1..num_quantiles: "violation" is the share of t with Q_u(t) < Q_v(t) (0: u dominates v on
  the grid), "margin" the mean of Q_u(t) − Q_v(t), "margin_q05" Q_u(0.05) − Q_v(0.05).
  """
  t_T = jnp.arange(1, num_quantiles + 1, dtype=u_N.dtype) / (num_quantiles + 1)
  diff_T = jnp.quantile(u_N, t_T) - jnp.quantile(v_N, t_T)
  low = jnp.quantile(u_N, 0.05) - jnp.quantile(v_N, 0.05)
  return {
    "violation": jnp.mean((diff_T < 0).astype(u_N.dtype)),
    "margin": jnp.mean(diff_T),
    "margin_q05": low,
  }


def policy_metrics(
  logp_XxY: Array,
  ref_logp_XxY: Array,
  reward_XxY: Array,
  prompt_logw_X: Array,
  target_logp_XxY: Array | None = None,
) -> dict[str, Array]:
  """The exact testbed metrics of a policy π against its reference and target.

  Args:
    logp_XxY: the policy π.
    ref_logp_XxY: the reference π_ref.
    reward_XxY: reward of every (prompt, response).
    prompt_logw_X: log prompt weights.
    target_logp_XxY: optional target p; adds the divergences to it.

  Returns:
    Scalars keyed "exact/kl_policy_ref", "exact/reward", "exact/win_rate" (against π_ref, ties
    ½), "exact/entropy" and, with a target, "exact/kl_target_policy" (KL(p‖π)),
    "exact/kl_policy_target" (KL(π‖p)), "exact/tv", "exact/js".
  """
  metrics = {
    "exact/kl_policy_ref": kl(logp_XxY, ref_logp_XxY, prompt_logw_X),
    "exact/reward": expectation(logp_XxY, reward_XxY, prompt_logw_X),
    "exact/win_rate": win_rate(logp_XxY, ref_logp_XxY, reward_XxY, prompt_logw_X),
    "exact/entropy": entropy(logp_XxY, prompt_logw_X),
  }
  if target_logp_XxY is not None:
    p_XxY, pi_XxY, w_X = target_logp_XxY, logp_XxY, prompt_logw_X
    metrics["exact/kl_target_policy"] = kl(p_XxY, pi_XxY, w_X)
    metrics["exact/kl_policy_target"] = kl(pi_XxY, p_XxY, w_X)
    metrics["exact/tv"] = tv(pi_XxY, p_XxY, w_X)
    metrics["exact/js"] = js(pi_XxY, p_XxY, w_X)
  return metrics


def ranking_accuracy(logp_XxY: Array, prompt_N: Array, chosen_N: Array, rejected_N: Array) -> Array:
  """Share of labelled pairs whose chosen response the policy finds more likely (ties count ½).

  The ranking accuracy of Chen et al. 2024 ("Preference Learning Algorithms Do Not Learn
  Preference Rankings"); with the run's target as the policy it is their idealized accuracy.
  """
  diff_N = logp_XxY[prompt_N, chosen_N] - logp_XxY[prompt_N, rejected_N]
  return jnp.mean(jnp.where(diff_N > 0, 1.0, jnp.where(diff_N == 0, 0.5, 0.0)))


def _lexicographic(vocab: int, length: int) -> np.ndarray:
  """int32[vocab**length, length], first position most significant."""
  grid = np.indices((vocab,) * length, dtype=np.int32)
  return grid.reshape(length, vocab**length).T


def _chunked(fn, tokens_RxS, chunk):
  """fn over row chunks of one size (last padded) by lax.map: one trace."""
  rows, seq = tokens_RxS.shape
  if chunk is None or chunk >= rows:
    return fn(tokens_RxS)
  pad = -rows % chunk
  padded_RxS = jnp.concatenate([tokens_RxS, tokens_RxS[:pad]], axis=0)
  chunks_out = jax.lax.map(fn, padded_RxS.reshape(-1, chunk, seq))
  return chunks_out.reshape(rows + pad, *chunks_out.shape[2:])[:rows]


def prefix_logps(
  next_logprobs_fn: Callable[[Array], Array],
  prompts_XxP: Array,
  response_len: int,
  vocab: int,
  bos: int | None = None,
  chunk: int | None = None,
) -> Array:
  """log π(y|x) of every response y of every prompt x, in one forward pass.

  Runs the model on the V**(T−1)·X prefixes [BOS?, x, y_0 … y_{T−2}] only:
  the position before y_t holds π(·|x, y_<t) for t < T, so the prefix's own
  tokens give Σ_{t<T−1} log π(y_t|x, y_<t) by a gather, and its last position
  scores all `vocab` final tokens at once — `vocab` times fewer rows than
  scoring the X·Y full sequences. Model mass on tokens ≥ vocab (e.g. BOS) is
  ignored, not renormalised away.

  Args:
    next_logprobs_fn: tokens_RxS -> logprobs_RxSxV' (V' ≥ vocab), the model's
      next-token log-softmax; position s scores the token at s + 1.
    prompts_XxP: int prompt tokens.
    response_len: T ≥ 1 response tokens.
    vocab: response tokens range over 0..vocab−1.
    bos: a token prepended to every sequence, or None (then P ≥ 1).
    chunk: optional rows per model call; chunks run sequentially under
      `jax.lax.map` (fn is traced once; the last chunk is padded).

  Returns:
    logp_XxY with Y = vocab**T in lexicographic response order.
  """
  prompts_XxP = jnp.asarray(prompts_XxP, jnp.int32)
  num_x, prompt_len = prompts_XxP.shape
  prefix_ZxS = jnp.asarray(_lexicographic(vocab, response_len - 1))
  num_z = prefix_ZxS.shape[0]
  start = prompt_len + (bos is not None)  # Index of y_0 in a row.
  if start < 1:
    raise ConfigError("prefix_logps needs a BOS token or a prompt of at least one token")
  parts = [jnp.full((num_x * num_z, 1), bos, jnp.int32)] if bos is not None else []
  tokens_RxS = jnp.concatenate(
    [
      *parts,
      jnp.repeat(prompts_XxP, num_z, axis=0),  # Row r = x * Z + z.
      jnp.tile(prefix_ZxS, (num_x, 1)),
    ],
    axis=1,
  )
  logprobs_RxSxV = _chunked(next_logprobs_fn, tokens_RxS, chunk)
  resp_RxTxV = logprobs_RxSxV[:, start - 1 : start - 1 + response_len, :vocab]
  taken_RxT1 = jnp.take_along_axis(resp_RxTxV[:, :-1, :], tokens_RxS[:, start:, None], axis=-1)
  prefix_logp_R = jnp.sum(taken_RxT1[..., 0], axis=-1)
  logp_RxV = prefix_logp_R[:, None] + resp_RxTxV[:, -1, :]
  return logp_RxV.reshape(num_x, num_z * vocab)  # y = z * vocab + y_last.
