"""Listwise objectives on [B, K] lists: LiPO's losses (ALGORITHMS.md §3) and PRO (§5.9).

Each prompt comes with K responses and a real-valued label ψ_k per response (higher = better). Every
function takes `mask_BxK` (1 = real response, 0 = padding) so lists of different lengths share one K; a
masked entry behaves exactly as if it were removed from its list, whatever values it holds (garbage
such as ±1e9, ±inf or NaN is replaced before any arithmetic, so it reaches neither the loss nor the
gradient). Losses are sums over a list's pairs or positions, not reduced over the batch; pairs with
equal labels contribute nothing, so a list with one real response, or with all labels equal, has loss 0
and gradient 0.

Per-prompt metrics shared by every objective, over the labelled pairs ψ_i > ψ_j of a list:
  num_pairs                    how many there are (weight accuracies by it when reducing);
  accuracy                     fraction ordered correctly by the objective's score s (s_i > s_j);
  ranking_accuracy_likelihood  fraction ordered correctly by the raw sequence log-likelihood log π
                               (Chen et al. 2024, "Preference Learning Algorithms Do Not Learn
                               Preference Rankings");
  margin                       mean s_i − s_j.
Accuracies and the margin are 0 for a list without labelled pairs.
"""

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.errors import ConfigError, DataError
from align_jax.objectives.likelihood import num_tokens

_DISCOUNTS = {"log2": jnp.log2, "ln": jnp.log}


def _as_float(x: jax.Array) -> jax.Array:
  """At least float32 (bfloat16 / integer inputs are promoted; float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _valid(mask_BxK: jax.Array | None, like_BxK: jax.Array) -> jax.Array:
  """Boolean [B, K] mask of real entries (all real when None)."""
  if mask_BxK is None:
    return jnp.ones(jnp.shape(like_BxK), bool)
  return jnp.asarray(mask_BxK).astype(bool)


def _clean(x_BxK: jax.Array, valid_BxK: jax.Array) -> jax.Array:
  """x in float, with masked entries replaced by 0 (so garbage reaches no loss and no gradient)."""
  return jnp.where(valid_BxK, _as_float(x_BxK), 0.0)


def _labelled_pairs(score_BxK: jax.Array, valid_BxK: jax.Array) -> jax.Array:
  """[B, K, K] boolean: entry (i, j) is a real pair with ψ_i > ψ_j."""
  both_BxKxK = valid_BxK[:, :, None] & valid_BxK[:, None, :]
  return both_BxKxK & (score_BxK[:, :, None] > score_BxK[:, None, :])


def _implicit_scores(logp_BxK, ref_logp_BxK, valid_BxK, beta):
  """s = β·(log π − sg(log π_ref)) on real entries, 0 on padding."""
  ref_BxK = jax.lax.stop_gradient(_clean(ref_logp_BxK, valid_BxK))
  return beta * (_clean(logp_BxK, valid_BxK) - ref_BxK)


def _differences(x_BxK: jax.Array) -> jax.Array:
  """[B, K, K] with entry (i, j) = x_i − x_j."""
  return x_BxK[:, :, None] - x_BxK[:, None, :]


def _pair_mean(x_BxKxK: jax.Array, pairs_BxKxK: jax.Array) -> jax.Array:
  """Mean of x over the labelled pairs of each list; 0 for a list without pairs."""
  n_B = jnp.sum(pairs_BxKxK, axis=(1, 2))
  total_B = jnp.sum(jnp.where(pairs_BxKxK, x_BxKxK, 0.0), axis=(1, 2))
  return total_B / jnp.maximum(n_B, 1)


def _ranking_metrics(s_BxK, logp_BxK, pairs_BxKxK) -> dict[str, jax.Array]:
  """num_pairs, accuracy (by s), ranking_accuracy_likelihood (by log π) and the mean margin of s."""
  s_BxK, logp_BxK = jax.lax.stop_gradient((s_BxK, logp_BxK))
  ds_BxKxK = _differences(s_BxK)
  correct = lambda d: (d > 0).astype(s_BxK.dtype)
  return {
    "num_pairs": jnp.sum(pairs_BxKxK, axis=(1, 2)).astype(s_BxK.dtype),
    "accuracy": _pair_mean(correct(ds_BxKxK), pairs_BxKxK),
    "ranking_accuracy_likelihood": _pair_mean(correct(_differences(logp_BxK)), pairs_BxKxK),
    "margin": _pair_mean(ds_BxKxK, pairs_BxKxK),
  }


def _masked_logsumexp(x: jax.Array, member: jax.Array) -> jax.Array:
  """log Σ exp(x) over the last axis restricted to `member`; 0 where no entry is a member.

  Non-members never enter an exp (they are replaced by the max first), so neither their values nor
  their gradients can overflow.
  """
  any_member = jnp.any(member, axis=-1, keepdims=True)
  top = jnp.max(jnp.where(member, x, -jnp.inf), axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(any_member, top, 0.0))
  shifted = jnp.where(member, x, top) - top
  total = jnp.sum(jnp.where(member, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
  out = top + jnp.log(jnp.where(any_member, total, 1.0))
  return jnp.squeeze(out, axis=-1)


def _contrasts(x_BxKxK: jax.Array, own_BxK: jax.Array) -> jax.Array:
  """Row k of x minus own_k, with the diagonal exactly 0.

  log Σ_i exp(x_ki) − own_k is computed as the log-sum-exp of these contrasts, so a response that only
  competes with itself gives exactly 0 (however XLA fuses the two copies of own_k), and a small
  contrast stays accurate when own_k is large.
  """
  eye_KxK = jnp.eye(x_BxKxK.shape[-1], dtype=bool)
  return jnp.where(eye_KxK[None], 0.0, x_BxKxK - own_BxK[:, :, None])


def _pairwise_loss(
  loss_of_difference, logp_BxK, ref_logp_BxK, score_BxK, beta, mask_BxK, weight_fn=None
):
  """Σ over labelled pairs ψ_i > ψ_j of w_ij · f(s_i − s_j), with the common metrics."""
  valid_BxK = _valid(mask_BxK, logp_BxK)
  psi_BxK = jax.lax.stop_gradient(_clean(score_BxK, valid_BxK))
  pairs_BxKxK = _labelled_pairs(psi_BxK, valid_BxK)
  s_BxK = _implicit_scores(logp_BxK, ref_logp_BxK, valid_BxK, beta)
  terms_BxKxK = loss_of_difference(_differences(s_BxK))
  metrics = _ranking_metrics(s_BxK, _clean(logp_BxK, valid_BxK), pairs_BxKxK)
  if weight_fn is not None:
    weight_BxKxK = weight_fn(s_BxK, psi_BxK, valid_BxK)
    terms_BxKxK = weight_BxKxK * terms_BxKxK
    metrics["lambda_weight"] = _pair_mean(weight_BxKxK, pairs_BxKxK)
  loss_B = jnp.sum(jnp.where(pairs_BxKxK, terms_BxKxK, 0.0), axis=(1, 2))
  return loss_B, metrics


def lambda_weights(
  s_BxK: jax.Array,
  score_BxK: jax.Array,
  *,
  mask_BxK: jax.Array | None = None,
  discount: str = "log2",
) -> jax.Array:
  r"""LiPO-λ's Lambda weights Δ_ij (LambdaLoss / |ΔNDCG| without the ideal-DCG normaliser).

  .. math:: \Delta_{ij} = |G_i - G_j|\,\left|\frac{1}{D(\tau_i)} - \frac{1}{D(\tau_j)}\right|,\quad
            G = 2^{\psi} - 1,\quad D(\tau) = \log_2(1 + \tau)

  τ_i is the rank (1 = best) of response i when the real entries of the list are sorted by the
  current scores sg(s) in decreasing order, with a stable sort: equal scores keep their list order
  (the earlier position gets the better rank). Everything is under stop-gradient (ALGORITHMS.md
  §3.2, §3.4). Δ_ij is non-zero only for real pairs with ψ_i > ψ_j.

  Args:
    s_BxK: current implicit scores β·log(π/π_ref) (only their order is used).
    score_BxK: labels ψ (higher = better).
    mask_BxK: 1 for real responses, 0 for padding (None: all real).
    discount: "log2" (LambdaRank / TF-Ranking, the default) or "ln"; the natural log multiplies
      every weight by 1/ln 2.

  Returns:
    Δ_BxKxK with entry (i, j) the weight of the pair (i better than j).

  Examples:
    >>> w = lambda_weights(jnp.array([[0.2, -0.1]]), jnp.array([[1.0, 0.0]]))
    >>> print(f"{w[0, 0, 1]:.6f} {w[0, 1, 0]:.6f}")   # 1 − 1/log2(3), ALGORITHMS.md §7.3
    0.369070 0.000000
  """
  if discount not in _DISCOUNTS:
    raise ConfigError(f"discount must be one of {sorted(_DISCOUNTS)}; got {discount!r}")
  valid_BxK = _valid(mask_BxK, s_BxK)
  s_BxK = jax.lax.stop_gradient(_clean(s_BxK, valid_BxK))
  psi_BxK = jax.lax.stop_gradient(_clean(score_BxK, valid_BxK))
  # Response j is ranked ahead of response i if it scores higher, or equal and earlier in the list.
  k = jnp.arange(s_BxK.shape[-1])
  s_i, s_j = s_BxK[:, :, None], s_BxK[:, None, :]
  ahead_BxKxK = valid_BxK[:, None, :] & ((s_j > s_i) | ((s_j == s_i) & (k[None, :] < k[:, None])))
  rank_BxK = 1.0 + jnp.sum(ahead_BxKxK, axis=-1).astype(s_BxK.dtype)
  inverse_discount_BxK = 1.0 / _DISCOUNTS[discount](1.0 + rank_BxK)
  gain_BxK = jnp.exp2(psi_BxK) - 1.0
  weight_BxKxK = jnp.abs(_differences(gain_BxK)) * jnp.abs(_differences(inverse_discount_BxK))
  return jnp.where(_labelled_pairs(psi_BxK, valid_BxK), weight_BxKxK, 0.0)


def lipo_lambda(
  logp_BxK: jax.Array,
  ref_logp_BxK: jax.Array,
  score_BxK: jax.Array,
  *,
  beta: float,
  mask_BxK: jax.Array | None = None,
  discount: str = "log2",
):
  r"""LiPO-λ: Lambda-weighted pairwise logistic loss over a ranked list (Liu et al. 2024, arXiv 2402.01878).

  .. math:: \ell = \sum_{\psi_i > \psi_j} \Delta_{ij}\,\mathrm{softplus}(-(s_i - s_j)),\quad
            s = \beta\,(\log\pi - \mathrm{sg}(\log\pi_{ref}))

  with the stop-gradient Lambda weights Δ of `lambda_weights` (gain 2^ψ − 1, discount 1/D of the rank
  under the current scores; equal scores are ranked in list order). ALGORITHMS.md §3.2. At K = 2 with
  ψ = (1, 0) this is (1 − 1/log2 3) × DPO for either order of s (§3.5).

  Args:
    logp_BxK: sequence log-probs of the K responses under the policy.
    ref_logp_BxK: the same under the frozen reference (no gradient flows into it).
    score_BxK: labels ψ (higher = better), e.g. average win rates.
    beta: inverse temperature of the implicit reward.
    mask_BxK: 1 for real responses, 0 for padding (None: all real).
    discount: rank discount D, "log2" (default) or "ln".

  Returns:
    loss_B and per-prompt metrics: num_pairs, accuracy, ranking_accuracy_likelihood, margin and
    lambda_weight (mean Δ over the labelled pairs).

  Examples:
    >>> logp = jnp.array([[-5.0, -6.5, -5.5, -7.0]])
    >>> ref = jnp.array([[-5.5, -6.2, -5.8, -6.6]])
    >>> psi = jnp.array([[0.9, 0.1, 0.6, 0.3]])
    >>> loss, m = lipo_lambda(logp, ref, psi, beta=1.0)
    >>> print(f"{loss[0]:.6f} {m['num_pairs'][0]:.0f}")   # ALGORITHMS.md §7.3
    0.404671 6
  """
  if discount not in _DISCOUNTS:
    raise ConfigError(f"discount must be one of {sorted(_DISCOUNTS)}; got {discount!r}")
  weight_fn = lambda s, psi, valid: lambda_weights(s, psi, mask_BxK=valid, discount=discount)
  return _pairwise_loss(
    lambda d: jax.nn.softplus(-d), logp_BxK, ref_logp_BxK, score_BxK, beta, mask_BxK, weight_fn
  )


def list_pair_logistic(
  logp_BxK: jax.Array,
  ref_logp_BxK: jax.Array,
  score_BxK: jax.Array,
  *,
  beta: float,
  mask_BxK: jax.Array | None = None,
):
  r"""LiPO pair-logistic loss: DPO summed over every labelled pair of the list (Liu et al. 2024).

  .. math:: \ell = \sum_{\psi_i > \psi_j} \mathrm{softplus}(-(s_i - s_j)),\quad
            s = \beta\,(\log\pi - \mathrm{sg}(\log\pi_{ref}))

  DPO_BT at K = 2 (ALGORITHMS.md §3.2).

  Args:
    logp_BxK: sequence log-probs of the K responses under the policy.
    ref_logp_BxK: the same under the frozen reference (no gradient flows into it).
    score_BxK: labels ψ (higher = better).
    beta: inverse temperature of the implicit reward.
    mask_BxK: 1 for real responses, 0 for padding (None: all real).

  Returns:
    loss_B and per-prompt metrics: num_pairs, accuracy, ranking_accuracy_likelihood, margin.

  Examples:
    >>> logp = jnp.array([[-5.0, -6.5, -5.5, -7.0]])
    >>> ref = jnp.array([[-5.5, -6.2, -5.8, -6.6]])
    >>> loss, _ = list_pair_logistic(logp, ref, jnp.array([[0.9, 0.1, 0.6, 0.3]]), beta=1.0)
    >>> print(f"{loss[0]:.6f}")   # ALGORITHMS.md §7.3
    2.895464
  """
  return _pairwise_loss(
    lambda d: jax.nn.softplus(-d), logp_BxK, ref_logp_BxK, score_BxK, beta, mask_BxK
  )


def list_pair_hinge(
  logp_BxK: jax.Array,
  ref_logp_BxK: jax.Array,
  score_BxK: jax.Array,
  *,
  beta: float,
  delta: float = 1.0,
  mask_BxK: jax.Array | None = None,
):
  r"""LiPO pair-hinge loss: the reference-normalised SLiC hinge over every labelled pair (Liu et al. 2024).

  .. math:: \ell = \sum_{\psi_i > \psi_j} \max(0,\ \delta - (s_i - s_j)),\quad
            s = \beta\,(\log\pi - \mathrm{sg}(\log\pi_{ref}))

  `pairwise.slic_hinge` at K = 2 (ALGORITHMS.md §3.2, §5.4). A pair stops contributing loss and
  gradient once s_i − s_j ≥ δ.

  Args:
    logp_BxK: sequence log-probs of the K responses under the policy.
    ref_logp_BxK: the same under the frozen reference (no gradient flows into it).
    score_BxK: labels ψ (higher = better).
    beta: inverse temperature of the implicit reward.
    delta: the hinge margin δ (1 in LiPO / TRL / RSO).
    mask_BxK: 1 for real responses, 0 for padding (None: all real).

  Returns:
    loss_B and per-prompt metrics: num_pairs, accuracy, ranking_accuracy_likelihood, margin.

  Examples:
    >>> logp = jnp.array([[-5.0, -6.5, -5.5, -7.0]])
    >>> ref = jnp.array([[-5.5, -6.2, -5.8, -6.6]])
    >>> loss, _ = list_pair_hinge(logp, ref, jnp.array([[0.9, 0.1, 0.6, 0.3]]), beta=1.0)
    >>> print(f"{loss[0]:.5f}")   # 2.9, ALGORITHMS.md §7.3 (float32 here: 2.899999)
    2.90000
  """
  return _pairwise_loss(
    lambda d: jax.nn.relu(delta - d), logp_BxK, ref_logp_BxK, score_BxK, beta, mask_BxK
  )


def listmle(
  logp_BxK: jax.Array,
  ref_logp_BxK: jax.Array,
  score_BxK: jax.Array,
  *,
  beta: float,
  mask_BxK: jax.Array | None = None,
):
  r"""ListMLE: Plackett–Luce negative log-likelihood of the label order ("DPO_PL"; Liu et al. 2024).

  .. math:: \ell = \sum_{i} \Big[\log\!\sum_{j \in C_i} e^{s_j} - s_i\Big],\quad
            C_i = \{i\} \cup \{j : \psi_j < \psi_i\},\quad
            s = \beta\,(\log\pi - \mathrm{sg}(\log\pi_{ref}))

  With distinct labels, C_i is the set of responses ranked at or below i, so this is the
  Plackett–Luce likelihood −Σ_k [s_σ(k) − logsumexp(s_σ(k), …, s_σ(K))] of the order σ sorting ψ
  decreasingly (ALGORITHMS.md §3.2). Tie rule: responses with equal labels do not compete with each
  other (each is chosen ahead of the strictly worse ones only). This keeps the loss invariant to the
  list order even with ties, gives exactly 0 (and gradient 0) when all labels are equal, and is 0 for
  a tied pair, as for the pairwise losses. DPO at K = 2 (§3.5).

  Convention with ties: the loss is then a Plackett–Luce likelihood — of the partial ranking, every
  order of the tied responses summed — only when all ties are in the lowest label group (their
  terms are 0 and the orders of the tail sum to 1). Ties higher up, e.g. ψ = [2, 2, 1, 0], give a
  tie-aware surrogate that is no Plackett–Luce likelihood (tested against brute force); the
  implementations that break ties by list position instead are not invariant to the list order.

  Args:
    logp_BxK: sequence log-probs of the K responses under the policy.
    ref_logp_BxK: the same under the frozen reference (no gradient flows into it).
    score_BxK: labels ψ (higher = better).
    beta: inverse temperature of the implicit reward.
    mask_BxK: 1 for real responses, 0 for padding (None: all real).

  Returns:
    loss_B and per-prompt metrics: num_pairs, accuracy, ranking_accuracy_likelihood, margin.

  Examples:
    >>> logp = jnp.array([[-5.0, -6.5, -5.5, -7.0]])
    >>> ref = jnp.array([[-5.5, -6.2, -5.8, -6.6]])
    >>> loss, _ = listmle(logp, ref, jnp.array([[0.9, 0.1, 0.6, 0.3]]), beta=1.0)
    >>> print(f"{loss[0]:.6f}")   # label order [0, 2, 3, 1], ALGORITHMS.md §7.3
    2.443799
  """
  valid_BxK = _valid(mask_BxK, logp_BxK)
  psi_BxK = jax.lax.stop_gradient(_clean(score_BxK, valid_BxK))
  pairs_BxKxK = _labelled_pairs(psi_BxK, valid_BxK)
  s_BxK = _implicit_scores(logp_BxK, ref_logp_BxK, valid_BxK, beta)
  # Row i of `choice_set` is C_i: i itself and the real responses labelled strictly worse.
  eye_KxK = jnp.eye(s_BxK.shape[-1], dtype=bool)
  choice_set_BxKxK = pairs_BxKxK | (eye_KxK[None] & valid_BxK[:, :, None])
  s_rows_BxKxK = jnp.broadcast_to(s_BxK[:, None, :], choice_set_BxKxK.shape)
  terms_BxK = _masked_logsumexp(_contrasts(s_rows_BxKxK, s_BxK), choice_set_BxKxK)
  loss_B = jnp.sum(jnp.where(valid_BxK, terms_BxK, 0.0), axis=-1)
  return loss_B, _ranking_metrics(s_BxK, _clean(logp_BxK, valid_BxK), pairs_BxKxK)


def _check_nonnegative(name: str, score_BxK: jax.Array, valid_BxK: jax.Array):
  """Raises on a negative real label when the labels are concrete; no-op under tracing."""
  try:
    labels = np.asarray(jnp.where(valid_BxK, score_BxK, 0.0))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if np.any(labels < 0):
    raise DataError(f"{name} needs labels ψ ≥ 0 (the target is ψ/Σψ); got min {labels.min()}")


def list_softmax(
  logp_BxK: jax.Array,
  ref_logp_BxK: jax.Array,
  score_BxK: jax.Array,
  *,
  beta: float,
  mask_BxK: jax.Array | None = None,
):
  r"""ListNet softmax cross-entropy against the normalised labels (Liu et al. 2024, LiPO "softmax").

  .. math:: \ell = -\sum_i \frac{\psi_i}{\sum_j \psi_j}\,\log\mathrm{softmax}(s)_i,\quad
            s = \beta\,(\log\pi - \mathrm{sg}(\log\pi_{ref}))

  Requires ψ ≥ 0 (ALGORITHMS.md §3.2): called eagerly, a negative real label raises DataError; under
  `jit` the labels are not inspected and ψ/Σψ is used as written. A list without a labelled pair
  (one real response, or all labels equal, including all 0 where ψ/Σψ is undefined) carries no
  ranking information and contributes loss 0 and gradient 0, like the other losses of this module;
  lists whose label sum is not positive (possible only with negative labels) also contribute 0.

  Args:
    logp_BxK: sequence log-probs of the K responses under the policy.
    ref_logp_BxK: the same under the frozen reference (no gradient flows into it).
    score_BxK: labels ψ ≥ 0 (higher = better).
    beta: inverse temperature of the implicit reward.
    mask_BxK: 1 for real responses, 0 for padding (None: all real).

  Returns:
    loss_B and per-prompt metrics: num_pairs, accuracy, ranking_accuracy_likelihood, margin.

  Examples:
    >>> logp = jnp.array([[-5.0, -6.5, -5.5, -7.0]])
    >>> ref = jnp.array([[-5.5, -6.2, -5.8, -6.6]])
    >>> loss, _ = list_softmax(logp, ref, jnp.array([[0.9, 0.1, 0.6, 0.3]]), beta=1.0)
    >>> print(f"{loss[0]:.6f}")   # ALGORITHMS.md §7.3
    1.231179
  """
  valid_BxK = _valid(mask_BxK, logp_BxK)
  _check_nonnegative("list_softmax", score_BxK, valid_BxK)
  psi_BxK = jax.lax.stop_gradient(_clean(score_BxK, valid_BxK))
  pairs_BxKxK = _labelled_pairs(psi_BxK, valid_BxK)
  s_BxK = _implicit_scores(logp_BxK, ref_logp_BxK, valid_BxK, beta)
  total_B = jnp.sum(psi_BxK, axis=-1)
  used_B = jnp.any(pairs_BxKxK, axis=(1, 2)) & (total_B > 0)
  target_BxK = psi_BxK / jnp.where(used_B, total_B, 1.0)[:, None]
  s_rows_BxKxK = jnp.broadcast_to(s_BxK[:, None, :], pairs_BxKxK.shape)
  log_softmax_BxK = -_masked_logsumexp(
    _contrasts(s_rows_BxKxK, s_BxK), jnp.broadcast_to(valid_BxK[:, None, :], pairs_BxKxK.shape)
  )
  cross_entropy_B = -jnp.sum(jnp.where(valid_BxK, target_BxK * log_softmax_BxK, 0.0), axis=-1)
  loss_B = jnp.where(used_B, cross_entropy_B, 0.0)
  return loss_B, _ranking_metrics(s_BxK, _clean(logp_BxK, valid_BxK), pairs_BxKxK)


def pro(
  logp_BxK: jax.Array,
  score_BxK: jax.Array,
  num_tokens_BxK: jax.Array,
  *,
  sft_weight: float = 0.05,
  temperature: bool = True,
  mask_BxK: jax.Array | None = None,
):
  r"""PRO, Preference Ranking Optimization (Song et al. 2023, arXiv 2306.17492; AAAI 2024).

  Reference-free. Scores are length-averaged log-likelihoods s_k = log π(y_k)/|y_k|; with the
  responses ranked by their reward r, each response k is contrasted with the strictly worse ones W_k:

  .. math::
    L_k = \log\Big(e^{s_k T_k} + \sum_{i \in W_k} e^{s_i T_i^k}\Big) - s_k T_k,\quad
    T_i^k = r_k - r_i,\quad T_k = \max_{i \in W_k} T_i^k

  .. math:: \ell = \sum_k L_k + w\,(n - 1)^2\,\big(-\log\pi(y^{\rm top})\big)

  with n the number of real responses and y^top the best-rewarded one (sequence-sum NLL; ties for
  the best reward share the term equally, as the mean NLL of the tied responses). `temperature=False`
  uses T ≡ 1. Convention with ties: responses with equal rewards are left out of each other's
  contrast (W_k holds the strictly worse ones only), where the paper's formula, over the list in
  ranked order, would contrast a tied response placed later (in the official code with T = 0); a
  response without a strictly worse one has L_k = 0. The
  official code adds 1e-10 inside a log; this uses logsumexp (ALGORITHMS.md §5.9). With n = 2 and
  T ≡ 1 the ranking part is softplus(s_2 − s_1).

  Args:
    logp_BxK: sequence log-probs of the K responses under the policy (sums over tokens).
    score_BxK: reward-model scores r (higher = better); only their order and gaps are used.
    num_tokens_BxK: completion lengths |y| (clamped to ≥ 1; no gradient).
    sft_weight: w, weight of the SFT term (0.05 in the official scripts).
    temperature: use the reward-gap temperatures T (True) or T ≡ 1 (False).
    mask_BxK: 1 for real responses, 0 for padding (None: all real).

  Returns:
    loss_B and per-prompt metrics: num_pairs, accuracy and margin (by the length-averaged s),
    ranking_accuracy_likelihood (by the sequence log π), ranking_loss Σ_k L_k, and sft_nll
    −log π(y^top).

  Examples:
    >>> loss, m = pro(jnp.array([[-30.0, -12.0, -15.0]]), jnp.array([[2.0, 1.0, 0.0]]),
    ...               jnp.array([[30.0, 10.0, 10.0]]))   # s = [−1.0, −1.2, −1.5]
    >>> print(f"{m['ranking_loss'][0]:.6f} {loss[0]:.6f}")   # + 0.05·(3−1)²·30, ALGORITHMS.md §7.7
    1.833460 7.833460
  """
  valid_BxK = _valid(mask_BxK, logp_BxK)
  r_BxK = jax.lax.stop_gradient(_clean(score_BxK, valid_BxK))
  logp_BxK = _clean(logp_BxK, valid_BxK)
  length_BxK = jnp.maximum(jax.lax.stop_gradient(_clean(num_tokens_BxK, valid_BxK)), 1.0)
  s_BxK = logp_BxK / length_BxK
  # worse[k, i]: response i is real and has a strictly lower reward than real response k.
  worse_BxKxK = _labelled_pairs(r_BxK, valid_BxK)
  if temperature:
    gap_BxKxK = jnp.where(worse_BxKxK, _differences(r_BxK), 0.0)
  else:
    gap_BxKxK = worse_BxKxK.astype(s_BxK.dtype)
  own_temperature_BxK = jnp.max(gap_BxKxK, axis=-1)
  eye_KxK = jnp.eye(s_BxK.shape[-1], dtype=bool)
  temperature_BxKxK = jnp.where(eye_KxK[None], own_temperature_BxK[:, :, None], gap_BxKxK)
  logits_BxKxK = s_BxK[:, None, :] * temperature_BxKxK  # row k: s_k T_k on the diagonal, s_i T_i^k
  own_logit_BxK = s_BxK * own_temperature_BxK
  stage_BxK = _masked_logsumexp(
    _contrasts(logits_BxKxK, own_logit_BxK), worse_BxKxK | eye_KxK[None]
  )
  ranking_B = jnp.sum(jnp.where(jnp.any(worse_BxKxK, axis=-1), stage_BxK, 0.0), axis=-1)

  best_r_B = jnp.max(jnp.where(valid_BxK, r_BxK, -jnp.inf), axis=-1)
  top_BxK = valid_BxK & (r_BxK == best_r_B[:, None])
  sft_nll_B = -jnp.sum(jnp.where(top_BxK, logp_BxK, 0.0), axis=-1) / jnp.maximum(
    jnp.sum(top_BxK, axis=-1), 1
  )
  n_B = jnp.sum(valid_BxK, axis=-1).astype(s_BxK.dtype)
  loss_B = ranking_B + sft_weight * jnp.square(jnp.maximum(n_B - 1.0, 0.0)) * sft_nll_B

  metrics = _ranking_metrics(s_BxK, logp_BxK, worse_BxKxK)
  metrics["ranking_loss"] = ranking_B
  metrics["sft_nll"] = sft_nll_B
  return loss_B, metrics


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# K = list size; batch["score_BxK"] holds the labels ψ and batch["response_mask_BxK"] the real
# entries of each list. `cfg` is the loss's keyword arguments (beta, and discount / delta).


def lipo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`lipo_lambda` on a lists batch."""
  return (
    *lipo_lambda(
      logp_BxK,
      batch["ref_logp_BxK"],
      batch["score_BxK"],
      mask_BxK=batch["response_mask_BxK"],
      **cfg,
    ),
    stats,
  )


def listmle_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`listmle` on a lists batch."""
  return (
    *listmle(
      logp_BxK,
      batch["ref_logp_BxK"],
      batch["score_BxK"],
      mask_BxK=batch["response_mask_BxK"],
      **cfg,
    ),
    stats,
  )


def list_softmax_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`list_softmax` on a lists batch."""
  return (
    *list_softmax(
      logp_BxK,
      batch["ref_logp_BxK"],
      batch["score_BxK"],
      mask_BxK=batch["response_mask_BxK"],
      **cfg,
    ),
    stats,
  )


def list_pair_logistic_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`list_pair_logistic` on a lists batch."""
  return (
    *list_pair_logistic(
      logp_BxK,
      batch["ref_logp_BxK"],
      batch["score_BxK"],
      mask_BxK=batch["response_mask_BxK"],
      **cfg,
    ),
    stats,
  )


def list_pair_hinge_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`list_pair_hinge` on a lists batch."""
  return (
    *list_pair_hinge(
      logp_BxK,
      batch["ref_logp_BxK"],
      batch["score_BxK"],
      mask_BxK=batch["response_mask_BxK"],
      **cfg,
    ),
    stats,
  )


def pro_objective(
  logp_BxK: jax.Array, batch: dict, stats: dict, *, sft_weight: float, temperature: bool
):
  """`pro` on a lists batch (no reference), lengths from its loss mask."""
  return (
    *pro(
      logp_BxK,
      batch["score_BxK"],
      num_tokens(batch),
      sft_weight=sft_weight,
      temperature=temperature,
      mask_BxK=batch["response_mask_BxK"],
    ),
    stats,
  )
