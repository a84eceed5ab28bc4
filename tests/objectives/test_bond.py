"""BOND / J-BOND (ALGORITHMS.md §2): §7.2 vectors, exact Best-of-N with ties, estimator means."""

import doctest
import fractions
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.objectives import bond
from align_jax.testbed import bon as best_of_n
from align_jax.testbed import exact

# ALGORITHMS.md §7.2: π_ref, rewards (outcomes 1 and 2 tie), N = 3 and a policy π.
REF = [[0.1, 0.2, 0.3, 0.4]]
REWARD = [[0.0, 1.0, 1.0, 2.0]]
PI = [[0.05, 0.15, 0.3, 0.5]]


@pytest.fixture(autouse=True)
def x64():
  """float64 inside each test: 1e-6 checks of the 6-decimal vectors, 1e-12 identities."""
  with jax.enable_x64(True):
    yield


def _section_7_2():
  """(log π_ref, rewards, log π) of §7.2, float64."""
  ref, reward, pi = (jnp.asarray(v, jnp.float64) for v in (REF, REWARD, PI))
  return jnp.log(ref), reward, jnp.log(pi)


def _log(p):
  with np.errstate(divide="ignore"):
    return np.log(np.asarray(p, np.float64))


def _tied_table(seed, x=3, y=5, levels=3):
  """Random [X, Y] reference log-probs (one zero) and integer rewards with ties in every row."""
  rng = np.random.default_rng(seed)
  p_XxY = rng.dirichlet(np.ones(y), size=x)
  p_XxY[0, 1] = 0.0
  p_XxY /= p_XxY.sum(-1, keepdims=True)
  reward_XxY = rng.integers(0, levels, size=(x, y)).astype(np.float64)
  reward_XxY[:, -1] = reward_XxY[:, 0]
  return _log(p_XxY), reward_XxY


def _brute_force_bon(p_Y, reward_Y, n):
  """Law of the winner over all n-tuples of reference draws, first index winning ties."""
  tuples_TxN = np.array(list(itertools.product(range(len(p_Y)), repeat=n)))
  prob_T = np.prod(p_Y[tuples_TxN], axis=1)
  winner_T = tuples_TxN[np.arange(len(tuples_TxN)), np.argmax(reward_Y[tuples_TxN], axis=1)]
  out_Y = np.zeros(len(p_Y))
  np.add.at(out_Y, winner_T, prob_T)
  return out_Y


def _log_c(ref_logp, reward, n):
  """log C_n = log π_BoN − log π_ref − (n − 1) log p≤."""
  log_le, _ = best_of_n.quantiles(ref_logp, reward)
  return best_of_n.bon_logp(ref_logp, reward, n) - ref_logp - (n - 1) * log_le


# -------------------------------------------------------------------------------------------------
# §7.2 vectors.


def test_section_7_2_quantiles_and_bon():
  ref, reward, _ = _section_7_2()
  log_le, log_lt = best_of_n.quantiles(ref, reward)
  np.testing.assert_allclose(jnp.exp(log_le), [[0.1, 0.6, 0.6, 1.0]], atol=1e-12, rtol=0)
  np.testing.assert_allclose(jnp.exp(log_lt), [[0.0, 0.1, 0.1, 0.6]], atol=1e-12, rtol=0)
  np.testing.assert_allclose(
    jnp.exp(_log_c(ref, reward, 3)), [[1.0, 1.194444, 1.194444, 1.96]], atol=1e-6, rtol=0
  )
  bon = best_of_n.bon_logp(ref, reward, 3)
  np.testing.assert_allclose(jnp.exp(bon), [[0.001, 0.086, 0.129, 0.784]], atol=1e-12, rtol=0)
  kl = exact.kl(bon, ref, jnp.zeros(1))
  np.testing.assert_allclose(kl, 0.341530, atol=1e-6, rtol=0)
  assert kl <= math.log(3) - 2 / 3
  np.testing.assert_allclose(math.log(3) - 2 / 3, 0.431946, atol=1e-6)


def test_section_7_2_divergences_and_decomposition():
  ref, reward, pi = _section_7_2()
  w = jnp.zeros(1)
  bon = best_of_n.bon_logp(ref, reward, 3)
  forward, backward = exact.kl(bon, pi, w), exact.kl(pi, bon, w)
  np.testing.assert_allclose([forward, backward], [0.192019, 0.307335], atol=1e-6, rtol=0)
  np.testing.assert_allclose(best_of_n.jeffreys(pi, bon, w, 0.5), 0.249677, atol=1e-6, rtol=0)
  np.testing.assert_allclose(best_of_n.jeffreys(pi, bon, w, 0.0), forward, rtol=1e-14)
  np.testing.assert_allclose(best_of_n.jeffreys(pi, bon, w, 1.0), backward, rtol=1e-14)
  # KL(π‖π_BoN) = KL(π‖π_ref) − (N−1) E_π[log p≤] − E_π[log C_N], exactly (§2.8.2).
  decomposition = (
    exact.kl(pi, ref, w)
    - 2 * best_of_n.bon_quantile(pi, ref, reward, w, log=True)
    - exact.expectation(pi, _log_c(ref, reward, 3), w)
  )
  np.testing.assert_allclose(decomposition, 0.307335, atol=1e-6, rtol=0)
  np.testing.assert_allclose(decomposition, backward, atol=1e-14, rtol=0)
  np.testing.assert_allclose(best_of_n.bon_quantile(pi, ref, reward, w), 0.775, atol=1e-14)


def test_section_7_2_backward_rewards():
  ref, reward, pi = _section_7_2()
  bon = best_of_n.bon_logp(ref, reward, 3)
  np.testing.assert_allclose(
    bon - pi, [[-3.912023, -0.556288, -0.843970, 0.449801]], atol=1e-6, rtol=0
  )
  # BOND's return with the exact quantile: the four outcomes as M = 4 policy samples of one prompt.
  log_le, _ = best_of_n.quantiles(ref, reward)
  _, return_1x4 = bond.bond_backward(pi, ref, log_le, n=3, baseline="none")
  np.testing.assert_allclose(
    return_1x4, [[-3.912023, -0.733969, -1.021651, -0.223144]], atol=1e-6, rtol=0
  )
  np.testing.assert_allclose(
    bon - pi - return_1x4, [[0.0, 0.177681, 0.177681, 0.672944]], atol=1e-6, rtol=0
  )
  np.testing.assert_allclose(bon - pi - return_1x4, _log_c(ref, reward, 3), atol=1e-14)


def test_section_7_2_logit_gradients():
  ref, reward, pi = _section_7_2()
  bon = best_of_n.bon_logp(ref, reward, 3)
  theta = pi  # softmax(log π) = π.
  jeffreys_grad = jax.jit(
    jax.grad(lambda t, beta: best_of_n.jeffreys(exact.normalize(t), bon, jnp.zeros(1), beta))
  )
  grad = lambda beta: jeffreys_grad(theta, beta)
  np.testing.assert_allclose(
    grad(1.0), [[0.180234, 0.037343, 0.160991, -0.378568]], atol=1e-6, rtol=0
  )
  p, q = np.exp(pi), np.exp(bon)
  np.testing.assert_allclose(grad(1.0), p * (np.log(p / q) - np.sum(p * np.log(p / q))), atol=1e-14)
  np.testing.assert_allclose(grad(0.0), [[0.049, 0.064, 0.171, -0.284]], atol=1e-12, rtol=0)
  np.testing.assert_allclose(grad(0.5), 0.5 * (grad(0.0) + grad(1.0)), atol=1e-14)


def test_section_7_2_composition_and_sample_rewards():
  ref, reward, _ = _section_7_2()
  bon2 = best_of_n.bon_logp(ref, reward, 2)
  np.testing.assert_allclose(jnp.exp(bon2), [[0.01, 0.14, 0.21, 0.64]], atol=1e-12, rtol=0)
  expected = [[0.0001, 0.0518, 0.0777, 0.8704]]
  np.testing.assert_allclose(
    jnp.exp(best_of_n.bon_logp(bon2, reward, 2)), expected, atol=1e-12, rtol=0
  )
  np.testing.assert_allclose(
    jnp.exp(best_of_n.bon_logp(ref, reward, 4)), expected, atol=1e-12, rtol=0
  )
  # MC quantile: r(y) = 1 against anchor rewards [0, 2, 1, 1].
  quantile = bond.mc_quantile(jnp.array([[1.0]]), jnp.array([[0.0, 2.0, 1.0, 1.0]]))
  np.testing.assert_allclose(quantile, [[0.75]], rtol=0)
  _, m = bond.bond(
    jnp.full((1, 5), -2.0),
    jnp.full((1, 5), -2.0),
    jnp.array([[1.0, 0.0, 2.0, 1.0, 1.0]]),
    num_policy=1,
    n=4,
    beta=0.5,
    baseline="none",
  )
  np.testing.assert_allclose(m["quantile"], [0.75], rtol=0)
  np.testing.assert_allclose(m["return"], [3 * math.log(0.75)], atol=1e-14)
  # J-BOND: policy reward 0.5 against anchors [1, 2] is penalised, against [0.2, 2] it is not.
  _, m = bond.jbond(
    jnp.full((2, 3), -2.0),
    jnp.full((2, 3), -2.0),
    jnp.array([[0.5, 1.0, 2.0], [0.5, 0.2, 2.0]]),
    beta=0.5,
    gamma=1.0,
  )
  np.testing.assert_allclose(m["return"], [-2.772589, 0.0], atol=1e-6, rtol=0)
  np.testing.assert_allclose(m["return"][0], -math.log(16), atol=1e-15)
  np.testing.assert_array_equal(m["penalised"], [1.0, 0.0])


def test_docstring_examples():
  from align_jax.objectives import policy_gradient

  with jax.enable_x64(False):
    for module in (bond, policy_gradient, best_of_n):
      result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
      assert result.attempted > 0 and result.failed == 0, module.__name__


# -------------------------------------------------------------------------------------------------
# Exact Best-of-N: enumeration, composition, the KL bound, conditional tables, precision.


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bon_formula_equals_enumeration_with_ties(n):
  ref_XxY, reward_XxY = _tied_table(n)
  assert all(len(set(row)) < len(row) for row in reward_XxY)  # Ties in every prompt.
  bon_XxY = np.asarray(best_of_n.bon_logp(jnp.asarray(ref_XxY), jnp.asarray(reward_XxY), n))
  for x in range(len(ref_XxY)):
    np.testing.assert_allclose(
      np.exp(bon_XxY[x]), _brute_force_bon(np.exp(ref_XxY[x]), reward_XxY[x], n), atol=1e-14, rtol=0
    )
  assert bon_XxY[0, 1] == -np.inf  # Zero reference mass stays zero.
  np.testing.assert_allclose(np.exp(bon_XxY).sum(-1), 1.0, atol=1e-14)
  if n == 1:
    np.testing.assert_allclose(bon_XxY, ref_XxY, atol=1e-15)


@pytest.mark.parametrize("n,m", [(2, 2), (2, 3), (3, 2)])
def test_bon_composition_with_ties(n, m):
  ref_XxY, reward_XxY = (jnp.asarray(a) for a in _tied_table(10 + n + m, y=6))
  twice = best_of_n.bon_logp(best_of_n.bon_logp(ref_XxY, reward_XxY, m), reward_XxY, n)
  np.testing.assert_allclose(
    jnp.exp(twice), jnp.exp(best_of_n.bon_logp(ref_XxY, reward_XxY, n * m)), atol=1e-14, rtol=0
  )
  assert not np.allclose(
    jnp.exp(twice), jnp.exp(best_of_n.bon_logp(ref_XxY, reward_XxY, n * m + 1))
  )


@pytest.mark.parametrize("n", [2, 4, 8])
def test_kl_to_reference_below_bound_with_gap_shrinking(n):
  rng = np.random.default_rng(n)
  bound = math.log(n) - (n - 1) / n
  gaps = []
  for size in (10, 100, 1000):
    p_Y = 1.0 + 0.5 * rng.random(size)
    ref = jnp.asarray(np.log(p_Y / p_Y.sum()))[None]
    reward = jnp.asarray(rng.permutation(size), jnp.float64)[None]  # Distinct rewards.
    gaps.append(bound - float(exact.kl(best_of_n.bon_logp(ref, reward, n), ref, jnp.zeros(1))))
  assert all(g > 0 for g in gaps), gaps
  assert gaps[0] > gaps[1] > gaps[2], gaps
  assert gaps[2] < 1e-5, gaps
  # Ties only lower the KL.
  ref, reward = (jnp.asarray(a) for a in _tied_table(n, x=4, y=6))
  bon = best_of_n.bon_logp(ref, reward, n)
  per_prompt = [exact.kl(bon[i : i + 1], ref[i : i + 1], jnp.zeros(1)) for i in range(4)]
  assert max(per_prompt) < bound


def test_conditional_tables_are_per_prompt():
  rng = np.random.default_rng(3)
  x, y = 3, 7
  ref_XxY = np.log(rng.dirichlet(np.ones(y), size=x))
  # Different reward scales per prompt, ties included: quantiles must not mix prompts.
  reward_XxY = rng.integers(0, 4, size=(x, y)) * np.array([[1.0], [10.0], [-0.5]])
  pi_XxY = np.log(rng.dirichlet(np.ones(y), size=x))
  logw_X = np.log(np.array([0.2, 0.5, 0.3]))
  log_le, log_lt = (
    np.asarray(a) for a in best_of_n.quantiles(jnp.asarray(ref_XxY), jnp.asarray(reward_XxY))
  )
  p_XxY = np.exp(ref_XxY)
  le = np.einsum("xj,xij->xi", p_XxY, reward_XxY[:, None, :] <= reward_XxY[:, :, None])
  lt = np.einsum("xj,xij->xi", p_XxY, reward_XxY[:, None, :] < reward_XxY[:, :, None])
  np.testing.assert_allclose(np.exp(log_le), le, atol=1e-14)
  np.testing.assert_allclose(np.exp(log_lt), lt, atol=1e-14)
  # Permuting responses permutes the outputs.
  perm = rng.permutation(y)
  permuted = best_of_n.bon_logp(jnp.asarray(ref_XxY[:, perm]), jnp.asarray(reward_XxY[:, perm]), 3)
  bon_XxY = best_of_n.bon_logp(jnp.asarray(ref_XxY), jnp.asarray(reward_XxY), 3)
  np.testing.assert_allclose(permuted, bon_XxY[:, perm], atol=1e-14)
  # Weighted scalars are Σ_x w_x (per-prompt value).
  args = (jnp.asarray(pi_XxY), bon_XxY)
  rows = [
    best_of_n.jeffreys(args[0][i : i + 1], args[1][i : i + 1], jnp.zeros(1), 0.3) for i in range(x)
  ]
  np.testing.assert_allclose(
    best_of_n.jeffreys(*args, jnp.asarray(logw_X), 0.3), np.dot(np.exp(logw_X), rows), atol=1e-14
  )
  np.testing.assert_allclose(
    best_of_n.bon_quantile(
      jnp.asarray(pi_XxY), jnp.asarray(ref_XxY), jnp.asarray(reward_XxY), jnp.asarray(logw_X)
    ),
    np.sum(np.exp(logw_X) * np.sum(np.exp(pi_XxY) * le, -1)),
    atol=1e-14,
  )


@pytest.mark.parametrize("tiny", [1e-9, 1e-20])
def test_tiny_level_set_keeps_precision(tiny):
  """A tiny-mass response between two big ones: p≤ − p< cancels in float64, its level mass not."""
  probs = [0.3, tiny, 0.7 - tiny]
  frac = [fractions.Fraction(p) for p in probs]
  n = 4
  p_lt, p_le = frac[0], frac[0] + frac[1]
  exact_bon = (
    frac[1] * sum(p_lt ** (i - 1) * p_le ** (n - i) for i in range(1, n + 1)) / sum(frac) ** n
  )
  bon = best_of_n.bon_logp(jnp.log(jnp.asarray([probs])), jnp.asarray([[0.0, 1.0, 2.0]]), n)
  np.testing.assert_allclose(bon[0, 1], math.log(exact_bon), rtol=1e-13)


def test_underflowing_quantiles_stay_in_log_space():
  """Quantiles of e^−1000 (0 as floats) keep their logs: log p≤ and log π_BoN of the worst ones."""
  ref = jnp.array([[-1000.0, -1001.0, 0.0]])
  log_le, log_lt = best_of_n.quantiles(ref, jnp.array([[0.0, 1.0, 2.0]]))
  np.testing.assert_allclose(log_le[0, :2], [-1000.0, np.logaddexp(-1000.0, -1001.0)], rtol=1e-15)
  np.testing.assert_allclose(log_lt[0, 1], -1000.0, rtol=1e-15)
  bon = best_of_n.bon_logp(ref, jnp.array([[0.0, 1.0, 2.0]]), 3)
  np.testing.assert_allclose(bon[0, 0], -3000.0, rtol=1e-15)  # π(y)·p≤(y)², C = 1.


# -------------------------------------------------------------------------------------------------
# Per-batch estimators: exact expectations by enumeration.


def _policy_table(seed, y=4):
  rng = np.random.default_rng(seed)
  theta_Y = jnp.asarray(rng.normal(size=y))
  anchor_Y = jnp.asarray(np.log(rng.dirichlet(np.ones(y))))
  reward_Y = jnp.asarray([0.0, 1.0, 1.0, 2.0, 0.5, 3.0][:y])  # Outcomes 1 and 2 tie.
  return theta_Y, anchor_Y, reward_Y


@pytest.mark.parametrize("k,n", [(3, 3), (4, 2)])
def test_forward_term_expected_gradient_is_forward_kl_gradient(k, n):
  """E over anchor k-tuples of ∇ℓ_FW = ∇KL(BoN_n(π_anchor)‖π_θ), exactly, with ties."""
  theta_Y, anchor_Y, reward_Y = _policy_table(k)
  tuples_TxK = np.array(list(itertools.product(range(len(theta_Y)), repeat=k)))
  cols_TxK1 = np.concatenate([np.zeros((len(tuples_TxK), 1), int), tuples_TxK], axis=1)
  weight_T = jnp.exp(jnp.sum(anchor_Y[tuples_TxK], axis=1))

  def expected_loss(theta):
    logp_Y = jax.nn.log_softmax(theta)
    loss_T, _ = bond.bond(
      logp_Y[cols_TxK1],
      anchor_Y[cols_TxK1],
      reward_Y[cols_TxK1],
      num_policy=1,
      n=n,
      beta=0.0,
      baseline="none",
    )
    return jnp.sum(weight_T * loss_T)

  bon = best_of_n.bon_logp(anchor_Y[None], reward_Y[None], n)
  kl_grad = jax.jit(
    jax.grad(lambda t, target: exact.kl(target, exact.normalize(t[None]), jnp.zeros(1)))
  )
  kl_grad = functools.partial(kl_grad, theta_Y)
  np.testing.assert_allclose(jax.jit(jax.grad(expected_loss))(theta_Y), kl_grad(bon), atol=1e-13)
  assert not np.allclose(kl_grad(bon), kl_grad(anchor_Y[None]))


@pytest.mark.parametrize("n", [2, 4])
def test_backward_term_expected_gradient_is_backward_kl_up_to_log_c(n):
  """With the exact quantile, E_π[∇ℓ_BW] = ∇KL(π_θ‖π_BoN) + ∇_θ E_{π_θ}[log C_n], exactly."""
  theta_Y, anchor_Y, reward_Y = _policy_table(n, y=6)
  w = jnp.zeros(1)
  log_le_Y = best_of_n.quantiles(anchor_Y[None], reward_Y[None])[0][0]
  bon = best_of_n.bon_logp(anchor_Y[None], reward_Y[None], n)
  log_c = _log_c(anchor_Y[None], reward_Y[None], n)

  def expected_surrogate(theta, log_quantile_Y):
    logp_Y = jax.nn.log_softmax(theta)
    loss_Y, _ = bond.bond_backward(
      logp_Y[:, None], anchor_Y[:, None], log_quantile_Y[:, None], n=n, baseline="none"
    )  # Row y: the policy sample is y.
    return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp_Y)) * loss_Y)

  kl_grad = jax.jit(jax.grad(lambda t: exact.kl(exact.normalize(t[None]), bon, w)))(theta_Y)
  c_grad = jax.jit(jax.grad(lambda t: exact.expectation(exact.normalize(t[None]), log_c, w)))(
    theta_Y
  )
  surrogate_grad = jax.jit(jax.grad(expected_surrogate))
  np.testing.assert_allclose(surrogate_grad(theta_Y, log_le_Y), kl_grad + c_grad, atol=1e-13)
  assert np.max(np.abs(c_grad)) > 1e-3  # log C_n is not constant here: the term matters.
  # The exact return log π_BoN − log π_θ = R + log C_n, from a quantile q with
  # (n−1)·log q = log(π_BoN/π_anchor): its expected gradient is ∇KL(π_θ‖π_BoN) itself.
  exact_quantile_Y = (bon[0] - anchor_Y) / (n - 1)
  np.testing.assert_allclose(surrogate_grad(theta_Y, exact_quantile_Y), kl_grad, atol=1e-13)


def test_backward_term_near_continuous_rewards():
  """Distinct rewards on ever finer categoricals: C_n → n, and BOND's gradient → ∇KL(π‖π_BoN)."""
  rng = np.random.default_rng(0)
  n = 4
  errors, median_log_c = [], []
  for size in (10, 100, 1000):
    p_Y = 1.0 + 0.5 * rng.random(size)
    anchor_Y = jnp.asarray(np.log(p_Y / p_Y.sum()))
    reward_Y = jnp.asarray(rng.permutation(size), jnp.float64)
    theta_Y = 2.0 * reward_Y / size + 0.3 * jnp.asarray(rng.normal(size=size))  # Tilted to reward.
    log_le_Y = best_of_n.quantiles(anchor_Y[None], reward_Y[None])[0][0]
    bon = best_of_n.bon_logp(anchor_Y[None], reward_Y[None], n)

    def expected_surrogate(theta, anchor_Y=anchor_Y, log_le_Y=log_le_Y):
      logp_Y = jax.nn.log_softmax(theta)
      loss_Y, _ = bond.bond_backward(
        logp_Y[:, None], anchor_Y[:, None], log_le_Y[:, None], n=n, baseline="none"
      )
      return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp_Y)) * loss_Y)

    kl_grad = jax.jit(
      jax.grad(lambda t, b=bon: exact.kl(exact.normalize(t[None]), b, jnp.zeros(1)))
    )(theta_Y)
    bond_grad = jax.jit(jax.grad(expected_surrogate))(theta_Y)
    errors.append(np.linalg.norm(bond_grad - kl_grad) / np.linalg.norm(kl_grad))
    median_log_c.append(np.median(np.asarray(_log_c(anchor_Y[None], reward_Y[None], n))))
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.03, errors
  assert abs(median_log_c[2] - math.log(n)) < 1e-2, median_log_c


def test_leave_one_out_baseline_keeps_backward_gradient_unbiased():
  theta_Y, anchor_Y, reward_Y = _policy_table(7)
  log_le_Y = best_of_n.quantiles(anchor_Y[None], reward_Y[None])[0][0]
  pairs_Tx2 = np.array(list(itertools.product(range(len(theta_Y)), repeat=2)))

  def per_row(theta, baseline):
    logp_Y = jax.nn.log_softmax(theta)
    loss_T, _ = bond.bond_backward(
      logp_Y[pairs_Tx2], anchor_Y[pairs_Tx2], log_le_Y[pairs_Tx2], n=3, baseline=baseline
    )
    weight_T = jax.lax.stop_gradient(jnp.exp(jnp.sum(logp_Y[pairs_Tx2], axis=1)))
    return weight_T * loss_T

  grad = lambda b: jax.jit(jax.grad(lambda t: jnp.sum(per_row(t, b))))(theta_Y)
  np.testing.assert_allclose(grad("mean_loo"), grad("none"), atol=1e-13)
  row_grad = lambda b: jax.jit(jax.jacobian(per_row), static_argnums=1)(theta_Y, b)
  assert not np.allclose(row_grad("mean_loo"), row_grad("none"))


def test_mc_quantile_is_unbiased():
  _, anchor_Y, reward_Y = _policy_table(8)
  k = 3
  tuples_TxK = np.array(list(itertools.product(range(len(anchor_Y)), repeat=k)))
  weight_T = jnp.exp(jnp.sum(anchor_Y[tuples_TxK], axis=1))
  reward_TxY = jnp.broadcast_to(reward_Y, (len(tuples_TxK), len(reward_Y)))
  estimate_TxY = bond.mc_quantile(reward_TxY, reward_Y[tuples_TxK])
  log_le = best_of_n.quantiles(anchor_Y[None], reward_Y[None])[0]
  np.testing.assert_allclose(weight_T @ estimate_TxY, jnp.exp(log_le[0]), atol=1e-14)


# -------------------------------------------------------------------------------------------------
# Loss structure: the Jeffreys mix, gradients, stop-gradients.


def _batch(seed, b=3, m=2, k=4, ties=False):
  rng = np.random.default_rng(seed)
  logp_BxK = jnp.asarray(-5.0 + rng.normal(size=(b, m + k)))
  anchor_BxK = jnp.asarray(-5.0 + rng.normal(size=(b, m + k)))
  reward_BxK = rng.integers(0, 3, size=(b, m + k)) if ties else rng.normal(size=(b, m + k))
  return logp_BxK, anchor_BxK, jnp.asarray(reward_BxK, jnp.float64)


def test_bond_is_the_jeffreys_mix_of_its_terms():
  logp, anchor, reward = _batch(0)
  loss_fn = lambda lp, beta: bond.bond(lp, anchor, reward, num_policy=2, n=2, beta=beta)[0]
  loss = jax.jit(loss_fn)
  grad = jax.jit(jax.grad(lambda lp, beta: loss_fn(lp, beta).sum()))
  for beta in (0.25, 0.7):
    np.testing.assert_allclose(
      loss(logp, beta), (1 - beta) * loss(logp, 0.0) + beta * loss(logp, 1.0), atol=1e-13
    )
    np.testing.assert_allclose(
      grad(logp, beta), (1 - beta) * grad(logp, 0.0) + beta * grad(logp, 1.0), atol=1e-13
    )
  forward, _ = bond.bond_forward(logp[:, 2:], reward[:, 2:], n=2)
  np.testing.assert_allclose(loss(logp, 0.0), forward, atol=1e-14)


@pytest.mark.parametrize("baseline", ["mean_loo", "none"])
def test_bond_gradients_and_stop_gradients(baseline):
  """∂ℓ/∂log π: −β(R_j − b_j)/M on policy samples, −(1−β)/G on each group's best; 0 elsewhere."""
  m, k, n, beta = 2, 4, 2, 0.3
  logp, anchor, reward = _batch(1, m=m, k=k, ties=True)
  fn = lambda lp, an, rw: bond.bond(lp, an, rw, num_policy=m, n=n, beta=beta, baseline=baseline)[
    0
  ].sum()
  g_logp, g_anchor, g_reward = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(logp, anchor, reward)
  np.testing.assert_array_equal(g_anchor, 0.0)
  np.testing.assert_array_equal(g_reward, 0.0)
  lp, an, rw = (np.asarray(a) for a in (logp, anchor, reward))
  quantile = np.mean(rw[:, None, m:] <= rw[:, :m, None], axis=-1)
  ret = (n - 1) * np.log(np.maximum(quantile, 1 / (2 * k))) - (lp[:, :m] - an[:, :m])
  adv = ret - (ret.sum(-1, keepdims=True) - ret) / (m - 1) if baseline == "mean_loo" else ret
  expected = np.zeros_like(lp)
  expected[:, :m] = -beta * adv / m
  for b in range(len(lp)):
    for g in range(k // n):
      cols = m + g * n + np.arange(n)
      expected[b, cols[np.argmax(rw[b, cols])]] = -(1 - beta) / (k // n)
  np.testing.assert_allclose(g_logp, expected, atol=1e-14)


@pytest.mark.parametrize("kl_in_backward", [False, True])
def test_jbond_gradients_and_stop_gradients(kl_in_backward):
  beta, gamma = 0.4, 0.7
  logp, anchor, reward = _batch(2, b=4, m=1, k=2, ties=True)
  fn = lambda lp, an, rw: bond.jbond(
    lp, an, rw, beta=beta, gamma=gamma, kl_in_backward=kl_in_backward
  )[0].sum()
  g_logp, g_anchor, g_reward = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(logp, anchor, reward)
  np.testing.assert_array_equal(g_anchor, 0.0)
  np.testing.assert_array_equal(g_reward, 0.0)
  lp, an, rw = (np.asarray(a) for a in (logp, anchor, reward))
  rho = lp[:, 0] - an[:, 0]
  r_j = np.where(rw[:, 0] < rw[:, 1:].min(-1), -math.log(16), 0.0) - kl_in_backward * rho
  expected = np.zeros_like(lp)
  expected[:, 0] = -beta * r_j + gamma * rho
  expected[np.arange(len(lp)), 1 + np.argmax(rw[:, 1:], axis=-1)] = -(1 - beta)
  np.testing.assert_allclose(g_logp, expected, atol=1e-14)


def test_invalid_arguments_raise():
  logp, anchor, reward = _batch(3, m=1, k=4)
  with pytest.raises(ValueError, match="leave-one-out"):
    bond.bond(logp, anchor, reward, num_policy=1, n=2, beta=0.5)
  with pytest.raises(ValueError, match="multiple of n"):
    bond.bond(logp, anchor, reward, num_policy=1, n=3, beta=0.5, baseline="none")
  with pytest.raises(ValueError, match="baseline"):
    bond.bond(logp, anchor, reward, num_policy=1, n=2, beta=0.5, baseline="batch")
  with pytest.raises(ValueError, match="n >= 1"):
    best_of_n.bon_logp(anchor, reward, 0)


# -------------------------------------------------------------------------------------------------
# Finite losses and gradients on degenerate float32 batches.

EXTREMES = {
  # Policy samples (columns 0, 1) lose to all four anchor samples: p̂≤ = 0, clipped.
  "all_anchors_win": (
    np.full((2, 6), -5.0),
    np.full((2, 6), -5.0),
    np.array([[0.0, -1.0, 1.0, 2.0, 3.0, 4.0]] * 2),
  ),
  "ties_everywhere": (np.full((2, 6), -5.0), np.full((2, 6), -5.0), np.zeros((2, 6))),
  "log_ratios_+-1e4": (
    np.array([[1e4, -1e4, -1.0, -2.0, -3.0, -4.0]] * 2),
    np.array([[-1e4, 1e4, 0.0, 0.0, 0.0, 0.0]] * 2),
    np.array([[0.0, 1.0, 0.5, 0.2, 2.0, 0.0]] * 2),
  ),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_finite_on_extreme_inputs(case):
  logp, anchor, reward = (jnp.asarray(a, jnp.float32) for a in EXTREMES[case])
  objectives = {
    "bond": lambda lp, an, rw: bond.bond(lp, an, rw, num_policy=2, n=2, beta=0.5),
    "jbond": lambda lp, an, rw: bond.jbond(
      lp[:, 3:], an[:, 3:], rw[:, 3:], beta=0.5, gamma=1.0, kl_in_backward=True
    ),
  }
  for name, fn in objectives.items():
    loss_B, metrics = jax.jit(fn)(logp, anchor, reward)
    grads = jax.jit(jax.grad(lambda *a, f=fn: f(*a)[0].sum(), argnums=(0, 1, 2)))(
      logp, anchor, reward
    )
    assert loss_B.dtype == jnp.float32, name
    assert np.all(np.isfinite(loss_B)), (name, loss_B)
    assert all(np.all(np.isfinite(g)) for g in grads), name
    assert all(np.all(np.isfinite(v)) for v in metrics.values()), (name, metrics)
  _, metrics = jax.jit(objectives["bond"])(logp, anchor, reward)
  if case == "all_anchors_win":
    np.testing.assert_array_equal(metrics["clipped"], 1.0)
    np.testing.assert_allclose(metrics["return"], math.log(1 / 8), rtol=1e-6)
  if case == "ties_everywhere":
    np.testing.assert_array_equal(metrics["quantile"], 1.0)
    np.testing.assert_array_equal(metrics["clipped"], 0.0)


@pytest.mark.parametrize("beta, gamma", [(0.5, 0.0), (0.3, 0.7)])
def test_jbond_kl_in_the_return_is_the_gamma_term_with_weight_beta(beta, gamma):
  """The paper's return r_J − ρ (kl_in_backward) adds β·ρ·∇log π, the γ term's estimator: the
  loss and its gradient equal the default's with γ + β (the docstring's convention)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    logp = jnp.asarray(rng.normal(-3.0, 1.0, (6, 3)))
    anchor = jnp.asarray(rng.normal(-3.0, 1.0, (6, 3)))
    reward = jnp.asarray(rng.integers(0, 3, (6, 3)).astype(np.float64))

    def loss(lp, kl_in_backward, g):
      out, _ = bond.jbond(lp, anchor, reward, beta=beta, gamma=g, kl_in_backward=kl_in_backward)
      return out.sum()

    paper = jax.value_and_grad(loss)(logp, True, gamma)
    default = jax.value_and_grad(loss)(logp, False, gamma + beta)
    np.testing.assert_allclose(paper[0], default[0], rtol=1e-12)
    np.testing.assert_allclose(paper[1], default[1], rtol=1e-12, atol=1e-15)
    assert np.abs(np.asarray(paper[1][:, 0])).max() > 1e-3  # the policy sample's term is live
    without = jax.value_and_grad(loss)(logp, False, gamma)  # The KL term does matter.
    assert not np.allclose(without[1], paper[1])
