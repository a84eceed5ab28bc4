"""Listwise objectives (ALGORITHMS.md §3 LiPO, §5.9 PRO): §7.3 / §7.7 vectors, special cases, masking,
permutation invariance, gradients and extreme inputs."""

import doctest
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from align_jax.objectives import listwise, pairwise

# ALGORITHMS.md §7.3 (K = 4, β = 1): s = [0.5, −0.3, 0.3, −0.4], ψ = [0.9, 0.1, 0.6, 0.3].
LOGP = [[-5.0, -6.5, -5.5, -7.0]]
REF = [[-5.5, -6.2, -5.8, -6.6]]
PSI = [[0.9, 0.1, 0.6, 0.3]]


def _softplus(x):
  return np.logaddexp(0.0, x)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _random_lists(seed: int, batch: int = 8, k: int = 6, tied_labels: bool = False):
  """(logp, ref, labels ψ ≥ 0, lengths) as float64 numpy [B, K]; log-ratios spread over both signs."""
  rng = np.random.default_rng(seed)
  ref = -20.0 + rng.standard_normal((batch, k))
  logp = ref + 2.0 * rng.standard_normal((batch, k))
  psi = rng.uniform(0.0, 1.0, (batch, k))
  if tied_labels:
    psi = np.round(psi * 3) / 3  # four levels: many ties
  lengths = rng.integers(1, 30, (batch, k)).astype(np.float64)
  return logp, ref, psi, lengths


def _x64(*arrays):
  return tuple(jnp.asarray(a, jnp.float64) for a in arrays)


BETA = 0.7

# name -> fn(logp, ref, score, num_tokens, mask) -> (loss_B, metrics).
OBJECTIVES = {
  "lipo_lambda": lambda lp, rf, sc, n, m: listwise.lipo_lambda(lp, rf, sc, beta=BETA, mask_BxK=m),
  "lipo_lambda_ln": lambda lp, rf, sc, n, m: listwise.lipo_lambda(
    lp, rf, sc, beta=BETA, mask_BxK=m, discount="ln"
  ),
  "list_pair_logistic": lambda lp, rf, sc, n, m: listwise.list_pair_logistic(
    lp, rf, sc, beta=BETA, mask_BxK=m
  ),
  "list_pair_hinge": lambda lp, rf, sc, n, m: listwise.list_pair_hinge(
    lp, rf, sc, beta=BETA, mask_BxK=m
  ),
  "listmle": lambda lp, rf, sc, n, m: listwise.listmle(lp, rf, sc, beta=BETA, mask_BxK=m),
  "list_softmax": lambda lp, rf, sc, n, m: listwise.list_softmax(lp, rf, sc, beta=BETA, mask_BxK=m),
  "pro": lambda lp, rf, sc, n, m: listwise.pro(lp, sc, n, mask_BxK=m),
  "pro_no_temperature": lambda lp, rf, sc, n, m: listwise.pro(
    lp, sc, n, temperature=False, mask_BxK=m
  ),
}
# PRO's ranking part alone: all-equal rewards leave only the SFT term, which is tested separately.
PRO_WITHOUT_SFT = {
  "pro": lambda lp, rf, sc, n, m: listwise.pro(lp, sc, n, sft_weight=0.0, mask_BxK=m),
  "pro_no_temperature": lambda lp, rf, sc, n, m: listwise.pro(
    lp, sc, n, sft_weight=0.0, temperature=False, mask_BxK=m
  ),
}


@functools.cache
def _jitted(name, without_sft=False):
  """jit of (∂/∂(logp, ref, score, num_tokens) of Σ_B loss, (loss_B, metrics)); one compile per shape."""
  fn = PRO_WITHOUT_SFT[name] if without_sft else OBJECTIVES[name]

  def total(lp, rf, sc, nt, m):
    loss_B, metrics = fn(lp, rf, sc, nt, m)
    return loss_B.sum(), (loss_B, metrics)

  return jax.jit(jax.grad(total, argnums=(0, 1, 2, 3), has_aux=True))


def _loss_and_grads(name, logp, ref, score, n, mask=None, without_sft=False):
  """(loss_B, metrics, (∂/∂logp, ∂/∂ref, ∂/∂score, ∂/∂num_tokens)) of Σ_B loss."""
  grads, (loss, metrics) = _jitted(name, without_sft)(logp, ref, score, n, mask)
  return loss, metrics, grads


# -------------------------------------------------------------------------------------------------
# §7.3 and §7.7 vectors, in float64 so the 6-decimal values are checked to 1e-6.

VECTORS_7_3 = {
  "lipo_lambda_log2": (lambda lp, rf, sc: listwise.lipo_lambda(lp, rf, sc, beta=1.0), 0.404671),
  "lipo_lambda_ln": (
    lambda lp, rf, sc: listwise.lipo_lambda(lp, rf, sc, beta=1.0, discount="ln"),
    0.583817,
  ),
  "pair_logistic": (lambda lp, rf, sc: listwise.list_pair_logistic(lp, rf, sc, beta=1.0), 2.895464),
  "pair_hinge": (lambda lp, rf, sc: listwise.list_pair_hinge(lp, rf, sc, beta=1.0), 2.9),
  "listmle": (lambda lp, rf, sc: listwise.listmle(lp, rf, sc, beta=1.0), 2.443799),
  "softmax_cross_entropy": (
    lambda lp, rf, sc: listwise.list_softmax(lp, rf, sc, beta=1.0),
    1.231179,
  ),
}


@pytest.mark.parametrize("name", sorted(VECTORS_7_3))
def test_section_7_3_losses(name):
  fn, expected = VECTORS_7_3[name]
  with jax.enable_x64(True):
    loss, metrics = fn(*_x64(LOGP, REF, PSI))
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, [expected], atol=1e-6, rtol=0)
    # Six labelled pairs; by s only (3, 1) is misordered, and by log π too (−7.0 < −6.5).
    np.testing.assert_allclose(metrics["num_pairs"], [6.0])
    np.testing.assert_allclose(metrics["accuracy"], [5 / 6], atol=1e-12)
    np.testing.assert_allclose(metrics["ranking_accuracy_likelihood"], [5 / 6], atol=1e-12)


def test_section_7_3_lambda_weights():
  expected = {
    (0, 1): 0.397146,
    (0, 2): 0.129304,
    (0, 3): 0.361476,
    (2, 1): 0.058125,
    (2, 3): 0.056986,
    (3, 1): 0.011048,
  }
  with jax.enable_x64(True):
    logp, ref, psi = _x64(LOGP, REF, PSI)
    weights = listwise.lambda_weights(logp - ref, psi)[0]
    dense = np.zeros((4, 4))
    for (i, j), value in expected.items():
      dense[i, j] = value
    np.testing.assert_allclose(weights, dense, atol=1e-6, rtol=0)
    assert np.count_nonzero(np.asarray(weights)) == 6
    # The natural-log discount multiplies every weight by 1/ln 2.
    weights_ln = listwise.lambda_weights(logp - ref, psi, discount="ln")[0]
    np.testing.assert_allclose(weights_ln * np.log(2.0), weights, rtol=1e-12)
    _, metrics = listwise.lipo_lambda(logp, ref, psi, beta=1.0)
    np.testing.assert_allclose(metrics["lambda_weight"], [sum(expected.values()) / 6], atol=1e-6)


@pytest.mark.parametrize("s", [[0.2, -0.1], [-0.1, 0.2]])
def test_section_7_3_two_responses(s):
  """K = 2, ψ = (1, 0): DPO 0.554355 and LiPO-λ 0.204596 = 0.369070 × DPO, for either order of s."""
  with jax.enable_x64(True):
    logp, ref, psi = _x64([s], [[0.0, 0.0]], [[1.0, 0.0]])
    logistic, _ = listwise.list_pair_logistic(logp, ref, psi, beta=1.0)
    lipo, m = listwise.lipo_lambda(logp, ref, psi, beta=1.0)
    weight = 1.0 - 1.0 / np.log2(3.0)
    np.testing.assert_allclose(weight, 0.369070, atol=1e-6)
    np.testing.assert_allclose(m["lambda_weight"], [weight], rtol=1e-12)
    np.testing.assert_allclose(lipo, weight * logistic, rtol=1e-12)
    if s[0] > s[1]:
      np.testing.assert_allclose(logistic, [0.554355], atol=1e-6)
      np.testing.assert_allclose(lipo, [0.204596], atol=1e-6)


def test_section_7_7_pro():
  """n = 3, s = [−1.0, −1.2, −1.5], r = [2, 1, 0], log π(y^1) = −30, w = 0.05."""
  with jax.enable_x64(True):
    logp, reward, lengths = _x64([[-30.0, -12.0, -15.0]], [[2.0, 1.0, 0.0]], [[30.0, 10.0, 10.0]])
    loss, m = listwise.pro(logp, reward, lengths)
    np.testing.assert_allclose(m["ranking_loss"], [1.833460], atol=1e-6)
    np.testing.assert_allclose(m["sft_nll"], [30.0], atol=1e-12)
    np.testing.assert_allclose(loss, [7.833460], atol=1e-6)  # + 0.05·(3−1)²·30 = 6
    # L_2 is the loss of the list without its best response; L_1 is the rest.
    _, m_tail = listwise.pro(logp, reward, lengths, mask_BxK=jnp.array([[0, 1, 1]]))
    np.testing.assert_allclose(m_tail["ranking_loss"], [0.554355], atol=1e-6)
    np.testing.assert_allclose(m["ranking_loss"] - m_tail["ranking_loss"], [1.279104], atol=1e-6)
    _, m_flat = listwise.pro(logp, reward, lengths, temperature=False)
    np.testing.assert_allclose(m_flat["ranking_loss"], [1.440295], atol=1e-6)
    loss_no_sft, _ = listwise.pro(logp, reward, lengths, sft_weight=0.0)
    np.testing.assert_allclose(loss_no_sft, [1.833460], atol=1e-6)


def test_docstring_examples():
  result = doctest.testmod(listwise, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted >= 7 and result.failed == 0


# -------------------------------------------------------------------------------------------------
# Special cases at K = 2.


@pytest.mark.parametrize("chosen_first", [True, False])
def test_two_responses_reduce_to_pairwise_dpo_and_slic_hinge(chosen_first):
  with jax.enable_x64(True):
    logp, ref, _, _ = _random_lists(0, batch=16, k=2)
    logp, ref = _x64(logp, ref)
    psi = jnp.array([[1.0, 0.0]] * 16) if chosen_first else jnp.array([[0.0, 1.0]] * 16)
    flip = (lambda x: x) if chosen_first else (lambda x: x[:, ::-1])
    beta, delta = 0.3, 0.8
    dpo = lambda lp: pairwise.dpo(flip(lp), flip(ref), beta=beta)[0]
    hinge = lambda lp: pairwise.slic_hinge(flip(lp), flip(ref), beta=beta, delta=delta)[0]
    cases = [
      (lambda lp: listwise.list_pair_logistic(lp, ref, psi, beta=beta)[0], dpo),
      (lambda lp: listwise.listmle(lp, ref, psi, beta=beta)[0], dpo),
      (lambda lp: listwise.list_pair_hinge(lp, ref, psi, beta=beta, delta=delta)[0], hinge),
    ]
    for ours, theirs in cases:
      value_and_grad = lambda f: jax.jit(jax.value_and_grad(lambda lp: f(lp).sum()))(logp)
      np.testing.assert_allclose(jax.jit(ours)(logp), jax.jit(theirs)(logp), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(
        value_and_grad(ours)[1], value_and_grad(theirs)[1], rtol=1e-12, atol=1e-12
      )
    h = np.asarray(flip(logp) - flip(ref))
    h = h[:, 0] - h[:, 1]
    assert np.any(beta * h > delta) and np.any(beta * h < delta)  # both hinge regimes exercised
    # A tied pair contributes nothing to any of them.
    for fn in (
      listwise.list_pair_logistic,
      listwise.listmle,
      listwise.list_pair_hinge,
      listwise.lipo_lambda,
    ):
      np.testing.assert_array_equal(fn(logp, ref, jnp.ones((16, 2)), beta=beta)[0], 0.0)


def test_pro_two_responses_is_reference_free_length_normalised_dpo():
  with jax.enable_x64(True):
    logp, _, _, lengths = _random_lists(1, batch=16, k=2)
    logp, lengths = _x64(logp, lengths)
    reward = jnp.asarray(np.stack([np.linspace(1.0, 3.0, 16), np.zeros(16)], -1))  # gaps T = 1 .. 3
    s = np.asarray(logp / lengths)
    loss, m = listwise.pro(logp, reward, lengths, sft_weight=0.0, temperature=False)
    np.testing.assert_allclose(loss, _softplus(s[:, 1] - s[:, 0]), rtol=1e-12)
    np.testing.assert_allclose(m["accuracy"], (s[:, 0] > s[:, 1]).astype(float))
    # With temperatures both logits are scaled by the single reward gap T = r_1 − r_2.
    loss_t, _ = listwise.pro(logp, reward, lengths, sft_weight=0.0)
    gap = np.asarray(reward[:, 0] - reward[:, 1])
    np.testing.assert_allclose(loss_t, _softplus(gap * (s[:, 1] - s[:, 0])), rtol=1e-10)
    # The SFT term: w·(n − 1)²·(−log π) of the better-rewarded response, swapped order included.
    full, _ = listwise.pro(logp, reward[:, ::-1], lengths, sft_weight=0.5, temperature=False)
    np.testing.assert_allclose(
      full, _softplus(s[:, 0] - s[:, 1]) - 0.5 * np.asarray(logp[:, 1]), rtol=1e-12
    )


# -------------------------------------------------------------------------------------------------
# Permutation invariance and masking.


def _permute(x, perm_BxK):
  return np.take_along_axis(np.asarray(x), perm_BxK, axis=-1)


@pytest.mark.parametrize("tied_labels", [False, True])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_invariant_to_permuting_the_list(name, tied_labels):
  with jax.enable_x64(True):
    arrays = _random_lists(2, tied_labels=tied_labels)
    rng = np.random.default_rng(3)
    perm = np.stack([rng.permutation(6) for _ in range(8)])
    assert np.any(perm != np.arange(6))
    loss, metrics = OBJECTIVES[name](*_x64(*arrays), None)
    loss_p, metrics_p = OBJECTIVES[name](*_x64(*(_permute(a, perm) for a in arrays)), None)
    assert np.all(np.asarray(loss) > 0)
    np.testing.assert_allclose(loss_p, loss, rtol=1e-12)
    for key in metrics:
      np.testing.assert_allclose(metrics_p[key], metrics[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_lambda_weights_permute_with_the_list():
  with jax.enable_x64(True):
    logp, ref, psi, _ = _random_lists(4)
    rng = np.random.default_rng(5)
    perm = np.stack([rng.permutation(6) for _ in range(8)])
    weights = np.asarray(listwise.lambda_weights(*_x64(BETA * (logp - ref), psi)))
    weights_p = np.asarray(
      listwise.lambda_weights(*_x64(_permute(BETA * (logp - ref), perm), _permute(psi, perm)))
    )
    rows = np.arange(8)[:, None, None]
    np.testing.assert_allclose(
      weights_p, weights[rows, perm[:, :, None], perm[:, None, :]], rtol=1e-12
    )
    assert np.count_nonzero(weights) == 8 * 15  # distinct labels: every one of the 15 pairs


def test_lambda_weights_rank_equal_scores_in_list_order():
  """Stable ranking: with equal s the ranks are the list positions 1, 2, 3."""
  psi = jnp.array([[0.0, 1.0, 2.0]])
  weights = listwise.lambda_weights(jnp.zeros((1, 3)), psi)[0]
  inverse_discount = 1.0 / np.log2(1.0 + np.array([1.0, 2.0, 3.0]))
  gain = 2.0 ** np.array([0.0, 1.0, 2.0]) - 1.0
  expected = np.abs(gain[:, None] - gain[None]) * np.abs(
    inverse_discount[:, None] - inverse_discount[None]
  )
  expected *= np.asarray(psi[0][:, None] > psi[0][None])
  np.testing.assert_allclose(weights, expected, rtol=1e-6)
  # A masked entry takes no rank: masking position 0 makes positions 1, 2 ranks 1, 2.
  masked = listwise.lambda_weights(jnp.zeros((1, 3)), psi, mask_BxK=jnp.array([[0, 1, 1]]))[0]
  np.testing.assert_allclose(masked[2, 1], (3.0 - 1.0) * (1.0 - 1.0 / np.log2(3.0)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(masked)[0], 0.0)
  np.testing.assert_array_equal(np.asarray(masked)[:, 0], 0.0)


# Ragged lists padded to K = 6; padding holds garbage that must not reach losses or gradients.
MASK = np.array(
  [
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0, 0],
    [0, 1, 0, 1, 1, 0],
    [1, 0, 1, 1, 0, 1],
    [0, 0, 0, 1, 0, 0],
    [1, 1, 0, 0, 0, 0],
  ],
  bool,
)


def _with_garbage(x, values):
  garbage = np.resize(np.asarray(values, np.float64), x.shape)
  return np.where(MASK, x, garbage)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_masked_equals_sliced(name):
  with jax.enable_x64(True):
    logp, ref, psi, lengths = _random_lists(6, batch=6, tied_labels=True)
    padded = (
      _with_garbage(logp, [-1e9, np.inf, np.nan, 1e9]),
      _with_garbage(ref, [np.nan, -np.inf, 1e9, -1e9]),
      _with_garbage(psi, [np.inf, -1e9, np.nan, 5.0]),
      _with_garbage(lengths, [np.nan, 0.0, -5.0, np.inf]),
    )
    loss, metrics, grads = _loss_and_grads(name, *_x64(*padded), jnp.asarray(MASK))
    assert np.all(np.isfinite(loss))
    for g in grads:
      assert np.all(np.isfinite(g))
      np.testing.assert_array_equal(np.asarray(g)[~MASK], 0.0)
    for b in range(len(MASK)):
      row = lambda x: x[b][MASK[b]][None]
      loss_b, metrics_b, grads_b = _loss_and_grads(
        name, *_x64(row(logp), row(ref), row(psi), row(lengths))
      )
      np.testing.assert_allclose(loss[b], loss_b[0], rtol=1e-12, atol=1e-12)
      for key in metrics:
        np.testing.assert_allclose(
          metrics[key][b], metrics_b[key][0], rtol=1e-12, atol=1e-12, err_msg=key
        )
      np.testing.assert_allclose(
        np.asarray(grads[0])[b][MASK[b]], grads_b[0][0], rtol=1e-12, atol=1e-12
      )
    # The one-entry list (row 4) has no pair and no loss.
    assert loss[4] == 0.0 and metrics["num_pairs"][4] == 0.0


# -------------------------------------------------------------------------------------------------
# Gradients.


def _np_lambda_weights(s, psi, log=np.log2):
  order = np.argsort(-s, axis=-1, kind="stable")
  rank = np.empty_like(s)
  np.put_along_axis(rank, order, np.arange(1, s.shape[-1] + 1, dtype=float)[None], axis=-1)
  inverse_discount = 1.0 / log(1.0 + rank)
  gain = 2.0**psi - 1.0
  weights = np.abs(gain[:, :, None] - gain[:, None, :]) * np.abs(
    inverse_discount[:, :, None] - inverse_discount[:, None, :]
  )
  return weights * (psi[:, :, None] > psi[:, None, :])


def _pair_gradient(term_derivative_BxKxK):
  """∂/∂s_m of Σ_{ij} f_ij(s_i − s_j) from the matrix of f'_ij (zero outside the labelled pairs)."""
  return term_derivative_BxKxK.sum(-1) - term_derivative_BxKxK.sum(-2)


@pytest.mark.parametrize(
  "name", ["lipo_lambda", "lipo_lambda_ln", "list_pair_logistic", "list_pair_hinge"]
)
def test_pairwise_gradient_closed_form(name):
  with jax.enable_x64(True):
    logp, ref, psi, n = _random_lists(7, tied_labels=True)
    _, _, (g_logp, g_ref, g_psi, _) = _loss_and_grads(name, *_x64(logp, ref, psi, n))
    s = BETA * (logp - ref)
    d = s[:, :, None] - s[:, None, :]
    pairs = psi[:, :, None] > psi[:, None, :]
    if name == "list_pair_hinge":
      assert np.any(pairs & (d > 1.0)) and np.any(pairs & (d < 1.0))
      derivative = -1.0 * ((d < 1.0) & pairs)
    else:
      derivative = -_sigmoid(-d) * pairs
      if name.startswith("lipo"):
        derivative *= _np_lambda_weights(s, psi, np.log if name.endswith("ln") else np.log2)
    np.testing.assert_allclose(g_logp, BETA * _pair_gradient(derivative), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(g_ref, 0.0)
    np.testing.assert_array_equal(g_psi, 0.0)  # the labels (and with them Δ) get no gradient


def test_listmle_gradient_closed_form():
  with jax.enable_x64(True):
    logp, ref, psi, n = _random_lists(8, tied_labels=True)
    _, _, (g_logp, g_ref, g_psi, _) = _loss_and_grads("listmle", *_x64(logp, ref, psi, n))
    s = BETA * (logp - ref)
    k = s.shape[-1]
    expected = np.zeros_like(s)
    for b in range(s.shape[0]):
      for i in range(k):
        choice = (psi[b] < psi[b, i]) | (np.arange(k) == i)  # C_i: i and the strictly worse
        p = np.where(choice, np.exp(s[b] - s[b][choice].max()), 0.0)
        expected[b] += p / p.sum()
        expected[b, i] -= 1.0
    np.testing.assert_allclose(g_logp, BETA * expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(g_ref, 0.0)
    np.testing.assert_array_equal(g_psi, 0.0)


def _plackett_luce_nll_of_partial_order(s, psi) -> float:
  """−log Σ over every order consistent with ψ (decreasing, tied responses in any order) of the
  Plackett–Luce probability Π_k e^{s_σ(k)} / Σ_{j ≥ k} e^{s_σ(j)}: brute force."""
  total = 0.0
  for order in itertools.permutations(range(len(s))):
    if all(psi[order[i]] >= psi[order[i + 1]] for i in range(len(s) - 1)):
      e = np.exp(np.asarray(s)[list(order)])
      total += np.prod(e / np.cumsum(e[::-1])[::-1])
  return -np.log(total)


@pytest.mark.parametrize(
  "psi, equal",
  [
    ([4.0, 3.0, 2.0, 1.0], True),  # no ties: the Plackett–Luce likelihood of the order
    ([3.0, 2.0, 1.0, 1.0], True),  # ties in the lowest group only
    ([3.0, 1.0, 1.0, 1.0], True),
    ([2.0, 2.0, 1.0, 0.0], False),  # ties above the lowest group: a tie-aware surrogate
    ([3.0, 2.0, 2.0, 1.0], False),
  ],
)
def test_listmle_with_ties_is_plackett_luce_only_when_ties_are_lowest(psi, equal):
  """The docstring's convention: tied responses do not compete, which equals the likelihood of the
  partial ranking (all orders of the tied responses summed) only for ties in the lowest group."""
  with jax.enable_x64(True):
    s = np.array([-0.3, 1.1, 0.4, -0.8])
    loss, _ = listwise.listmle(jnp.asarray([s]), jnp.zeros((1, 4)), jnp.asarray([psi]), beta=1.0)
    expected = _plackett_luce_nll_of_partial_order(s, psi)
    assert np.isclose(float(loss[0]), expected, rtol=1e-12) == equal
    if not equal:  # Not a rounding difference: here the surrogate charges visibly more.
      assert float(loss[0]) > expected + 0.05


def test_list_softmax_gradient_closed_form():
  with jax.enable_x64(True):
    logp, ref, psi, n = _random_lists(9)
    _, _, (g_logp, g_ref, g_psi, _) = _loss_and_grads("list_softmax", *_x64(logp, ref, psi, n))
    s = BETA * (logp - ref)
    softmax = np.exp(s - s.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(
      g_logp, BETA * (softmax - psi / psi.sum(-1, keepdims=True)), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_array_equal(g_ref, 0.0)
    np.testing.assert_array_equal(g_psi, 0.0)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradient_matches_finite_differences(name):
  with jax.enable_x64(True):
    logp, ref, psi, n = _x64(*_random_lists(10, batch=3, k=5, tied_labels=True))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 1, 1, 1, 1]], bool)
    fn = lambda lp: OBJECTIVES[name](lp, ref, psi, n, mask)[0].sum()
    check_grads(fn, (logp,), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_pro_gets_no_gradient_through_rewards_or_lengths():
  with jax.enable_x64(True):
    for name in ("pro", "pro_no_temperature"):
      _, _, (g_logp, _, g_reward, g_lengths) = _loss_and_grads(name, *_x64(*_random_lists(11)))
      assert np.any(np.asarray(g_logp) != 0.0)
      np.testing.assert_array_equal(g_reward, 0.0)
      np.testing.assert_array_equal(g_lengths, 0.0)


def test_lambda_weights_get_no_gradient():
  s, psi = jnp.array([[0.5, -0.3, 0.3, -0.4]]), jnp.array(PSI)
  g_s, g_psi = jax.grad(lambda s, p: listwise.lambda_weights(s, p).sum(), argnums=(0, 1))(s, psi)
  np.testing.assert_array_equal(g_s, 0.0)
  np.testing.assert_array_equal(g_psi, 0.0)


# -------------------------------------------------------------------------------------------------
# Metrics, validation, and finiteness on extreme inputs (float32, as in training).


def test_accuracy_by_implicit_score_and_by_likelihood_differ():
  # s = β(log π − log π_ref) orders the pair correctly; the raw log-likelihood does not.
  logp, ref, psi = jnp.array([[-10.0, -5.0]]), jnp.array([[-20.0, 0.0]]), jnp.array([[1.0, 0.0]])
  _, m = listwise.list_pair_logistic(logp, ref, psi, beta=0.1)
  np.testing.assert_allclose([m["accuracy"][0], m["ranking_accuracy_likelihood"][0]], [1.0, 0.0])
  np.testing.assert_allclose(m["margin"], [1.5], rtol=1e-6)
  _, m = listwise.list_pair_logistic(logp, ref, psi[:, ::-1], beta=0.1)
  np.testing.assert_allclose([m["accuracy"][0], m["ranking_accuracy_likelihood"][0]], [0.0, 1.0])
  _, m = listwise.pro(logp, psi, jnp.array([[1.0, 10.0]]))  # s = [−10, −0.5]
  np.testing.assert_allclose([m["accuracy"][0], m["ranking_accuracy_likelihood"][0]], [0.0, 0.0])
  _, m = listwise.listmle(logp, ref, jnp.ones((1, 2)), beta=0.1)
  np.testing.assert_array_equal([m["num_pairs"][0], m["accuracy"][0]], [0.0, 0.0])


def test_validation():
  logp, ref = jnp.array(LOGP), jnp.array(REF)
  with pytest.raises(ValueError, match="ψ ≥ 0"):
    listwise.list_softmax(logp, ref, jnp.array([[0.9, -0.1, 0.6, 0.3]]), beta=1.0)
  # A negative label on a masked entry is padding, not a label.
  listwise.list_softmax(
    logp, ref, jnp.array([[0.9, -0.1, 0.6, 0.3]]), beta=1.0, mask_BxK=jnp.array([[1, 0, 1, 1]])
  )
  with pytest.raises(ValueError, match="discount"):
    listwise.lipo_lambda(logp, ref, jnp.array(PSI), beta=1.0, discount="log10")
  # Under jit the labels cannot be inspected: no error, and a finite result.
  loss = jax.jit(lambda p: listwise.list_softmax(logp, ref, p, beta=1.0)[0])(
    jnp.array([[0.9, -0.1, 0.6, 0.3]])
  )
  assert np.all(np.isfinite(loss))


EXTREMES = {
  "log_ratio_+-1e4": (jnp.array([[1e4, -1e4, 1e4, -1e4]]), jnp.zeros((1, 4))),
  "reference_+-1e4": (jnp.zeros((1, 4)), jnp.array([[1e4, -1e4, -1e4, 1e4]])),
  "policy_and_reference_-1e4": (jnp.full((1, 4), -1e4), jnp.array([[-1e4, 0.0, -2e4, 0.0]])),
  "equal_scores": (jnp.full((1, 4), -7.0), jnp.full((1, 4), -7.0)),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_finite_on_extreme_inputs(name, case):
  logp, ref = EXTREMES[case]
  psi, n = jnp.array(PSI), jnp.full((1, 4), 3.0)
  loss, metrics, grads = _loss_and_grads(name, logp, ref, psi, n)
  assert loss.dtype == jnp.float32
  assert np.all(np.isfinite(loss)), loss
  assert all(np.all(np.isfinite(g)) for g in grads)
  # PRO's SFT term −log π is negative for the (invalid) positive log-probs; its ranking part is not.
  assert np.all(np.asarray(metrics.get("ranking_loss", loss)) >= 0)
  if case == "equal_scores":  # every labelled pair sits at margin 0
    assert np.all(np.asarray(loss) > 0)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_uninformative_lists_have_zero_loss_and_gradient(name):
  """All labels equal, K = 1, or one real entry among padding: exactly 0 (PRO: no SFT weight)."""
  logp, ref, _, n = (jnp.asarray(a, jnp.float32) for a in _random_lists(12, batch=3, k=4))
  equal_labels = jnp.array([[0.0] * 4, [0.5] * 4, [3.0] * 4])
  one_real = jnp.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
  garbage_logp = jnp.where(one_real == 1, logp, -1e9)
  cases = [
    (logp, ref, equal_labels, n, None),
    (logp[:, :1], ref[:, :1], equal_labels[:, :1] + jnp.arange(3.0)[:, None], n[:, :1], None),
    (garbage_logp, ref, jnp.array(np.random.default_rng(0).uniform(size=(3, 4))), n, one_real),
  ]
  for logp_c, ref_c, psi_c, n_c, mask_c in cases:
    without_sft = name.startswith("pro") and mask_c is None and logp_c.shape[-1] > 1
    loss, metrics, grads = _loss_and_grads(name, logp_c, ref_c, psi_c, n_c, mask_c, without_sft)
    np.testing.assert_array_equal(loss, 0.0)
    np.testing.assert_array_equal(grads[0], 0.0)
    np.testing.assert_array_equal(metrics["num_pairs"], 0.0)
    np.testing.assert_array_equal(metrics["accuracy"], 0.0)


def test_pro_equal_rewards_keep_only_the_sft_term():
  logp, lengths = jnp.array([[-12.0, -20.0, -9.0]]), jnp.array([[4.0, 5.0, 3.0]])
  loss, m = listwise.pro(logp, jnp.full((1, 3), 0.4), lengths, sft_weight=0.1)
  np.testing.assert_array_equal(m["ranking_loss"], 0.0)
  # Every response shares the best reward: the SFT term is the mean NLL, times w·(n − 1)².
  np.testing.assert_allclose(m["sft_nll"], [41.0 / 3], rtol=1e-6)
  np.testing.assert_allclose(loss, [0.1 * 4 * 41.0 / 3], rtol=1e-6)
  g = jax.grad(
    lambda lp: listwise.pro(lp, jnp.full((1, 3), 0.4), lengths, sft_weight=0.1)[0].sum()
  )(logp)
  np.testing.assert_allclose(g, [[-0.4 / 3] * 3], rtol=1e-6)
