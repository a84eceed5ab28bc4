"""Energy-based targets (ALGORITHMS.md §1.1–§1.2, §5.11): §7.1 / §7.7 vectors, moment matching."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from align_jax import targets
from align_jax.testbed import exact

A = [0.4, 0.3, 0.2, 0.1]  # ALGORITHMS.md §7.1
REWARD = [1.0, 0.0, 2.0, -1.0]


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def test_docstring_examples():
  with jax.enable_x64(False):  # The examples show float32, the default dtype.
    result = doctest.testmod(targets, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def _conditional(seed, x=4, y=16):
  """Base log a(y|x), two features (binary, continuous) [X, Y, 2] and log prompt weights."""
  rng = np.random.default_rng(seed)
  log_a = exact.normalize(jnp.asarray(rng.normal(size=(x, y))))
  phi = np.stack([rng.random((x, y)) < 0.4, rng.normal(size=(x, y))], axis=-1).astype(np.float64)
  prompt_logw = jax.nn.log_softmax(jnp.asarray(rng.normal(size=x)))
  return log_a, jnp.asarray(phi), prompt_logw


def _exact_moments(log_P, phi, prompt_logw):
  """E_{x∼w, y∼p(·|x)}[φ] with p = normalize(P), exactly."""
  log_p = exact.normalize(log_P)
  return jnp.stack(
    [exact.expectation(log_p, phi[..., f], prompt_logw) for f in range(phi.shape[-1])]
  )


# -------------------------------------------------------------------------------------------------
# Pointwise, exponential, hybrid and RLHF targets.


def test_pointwise_section_7_1():
  log_a = jnp.log(jnp.asarray(A))
  log_P = targets.pointwise(log_a, jnp.asarray([True, False, True, True]))
  np.testing.assert_allclose(jnp.exp(log_P), [0.4, 0.0, 0.2, 0.1], atol=1e-15)
  assert log_P[1] == -jnp.inf
  np.testing.assert_allclose(jnp.exp(jax.nn.logsumexp(log_P)), 0.7, atol=1e-12)  # Z = E_a[b].
  np.testing.assert_allclose(
    jnp.exp(exact.normalize(log_P[None])[0]), [0.571429, 0.0, 0.285714, 0.142857], atol=1e-6
  )
  # ε-smoothing: log(a·max(b, ε)) keeps every sample in the support.
  smoothed = targets.pointwise(log_a, jnp.asarray([1.0, 0.0, 1.0, 1.0]), epsilon=0.01)
  np.testing.assert_allclose(jnp.exp(smoothed), [0.4, 0.003, 0.2, 0.1], atol=1e-15)
  with pytest.raises(ValueError, match="epsilon"):
    targets.pointwise(log_a, jnp.ones(4), epsilon=1.0)


def test_targets_work_on_tables_and_sampled_batches():
  log_a, phi, _ = _conditional(0)
  b = phi[..., 0] > 0
  lam = jnp.asarray([0.7, -0.3])
  table = targets.exponential(targets.pointwise(log_a, b), phi, lam)
  np.testing.assert_allclose(table, jnp.where(b, log_a + phi @ lam, -jnp.inf), atol=1e-12)
  # Gathering samples [B, K] from the table equals building the target on the samples.
  rows, cols = jnp.asarray([[0, 0, 3], [2, 1, 1]]), jnp.asarray([[5, 2, 9], [0, 15, 4]])
  sampled = targets.exponential(
    targets.pointwise(log_a[rows, cols], b[rows, cols]), phi[rows, cols], lam
  )
  np.testing.assert_array_equal(sampled, table[rows, cols])


def test_rlhf_section_7_1_and_exact_target():
  log_P = targets.rlhf(jnp.log(jnp.asarray(A)), jnp.asarray(REWARD), 1.0)
  np.testing.assert_allclose(jnp.exp(log_P), [1.087313, 0.3, 1.477811, 0.036788], atol=1e-6)
  np.testing.assert_allclose(jnp.exp(jax.nn.logsumexp(log_P)), 2.901912, atol=1e-6)
  log_a, phi, _ = _conditional(1)
  reward = phi[..., 1]
  unnormalised = np.exp(np.asarray(log_a, np.float64)) * np.exp(np.asarray(reward) / 0.3)
  np.testing.assert_allclose(
    exact.normalize(targets.rlhf(log_a, reward, 0.3)),
    np.log(unnormalised / unnormalised.sum(-1, keepdims=True)),
    atol=1e-12,
  )
  with pytest.raises(ValueError, match="beta"):
    targets.rlhf(log_a, reward, 0.0)


# -------------------------------------------------------------------------------------------------
# LSC (§5.11).


def test_lsc_section_7_7():
  u = targets.lsc(jnp.asarray([1.2, -0.3]), jnp.asarray([0.5, 0.1]))
  np.testing.assert_allclose(u, [-0.403186, -0.913015], atol=1e-6)
  np.testing.assert_allclose(jnp.sum(u), -1.316201, atol=1e-6)
  np.testing.assert_allclose(
    jnp.sum(u), np.log(1 / (1 + np.exp(-0.7)) / (1 + np.exp(0.4))), atol=1e-12
  )


def test_lsc_properties():
  r = jnp.linspace(-40.0, 40.0, 81)
  ref = jnp.asarray(0.3)
  u = targets.lsc(r, ref)
  assert np.all(u < 0) and np.all(np.isfinite(u)) and np.all(np.diff(u) > 0)
  np.testing.assert_allclose(targets.lsc(r + 5.0, ref + 5.0), u, atol=1e-12)  # Shift invariance.
  du = jax.vmap(jax.grad(targets.lsc), in_axes=(0, None))(r, ref)
  np.testing.assert_allclose(du, jax.nn.sigmoid(ref - r), atol=1e-12)  # Diminishing returns.
  d2u = jax.vmap(jax.grad(jax.grad(targets.lsc)), in_axes=(0, None))(r, ref)
  assert np.all(d2u <= 0)  # Concave.


# -------------------------------------------------------------------------------------------------
# Moment matching (§1.2).


def test_fit_lambda_section_7_1():
  phi = jnp.asarray([[1.0], [0.0], [1.0], [0.0]])
  log_a = jnp.log(jnp.asarray(A))
  lam, mu, converged = targets.fit_lambda(
    phi, log_a, jnp.asarray([0.5]), lr=1.0, tol=1e-13, max_iter=1000
  )
  assert converged
  np.testing.assert_allclose(lam, [-0.4054651081], atol=1e-10)
  np.testing.assert_allclose(lam, [np.log(2 / 3)], atol=1e-12)  # 0.6 e^λ = 0.4.
  np.testing.assert_allclose(mu, [0.5], atol=1e-13)
  # The fitted target has the moment exactly.
  p = jnp.exp(exact.normalize(targets.exponential(log_a, phi, lam)[None])[0])
  np.testing.assert_allclose(p[0] + p[2], 0.5, atol=1e-12)


def _dual_optimum(log_a, phi, prompt_logw, mu_bar):
  """argmax_λ λ·μ̄ − Σ_x w_x log Z_x(λ) on the exact table, by BFGS (NumPy, independent of JAX)."""
  log_a, phi, w = np.asarray(log_a), np.asarray(phi), np.exp(np.asarray(prompt_logw))

  def neg_dual(lam):
    logits = log_a + phi @ lam
    m = logits.max(axis=-1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))
    p = np.exp(logits - log_z[:, None])
    moments = np.einsum("x,xy,xyf->f", w, p, phi)
    return -(lam @ mu_bar - w @ log_z), -(mu_bar - moments)

  result = scipy.optimize.minimize(
    neg_dual, np.zeros(phi.shape[-1]), jac=True, method="BFGS", options={"gtol": 1e-10}
  )
  assert result.success
  return result.x


def test_fit_lambda_exact_conditional_table():
  """Shared λ, per-prompt Z_x: moments reach μ̄ exactly and λ is the dual optimum."""
  log_a, phi, prompt_logw = _conditional(2)
  lam_true = jnp.asarray([0.8, -0.5])
  mu_bar = _exact_moments(targets.exponential(log_a, phi, lam_true), phi, prompt_logw)
  lam, mu, converged = targets.fit_lambda(
    phi, log_a, mu_bar, prompt_logw_X=prompt_logw, lr=1.0, tol=1e-6, max_iter=5000
  )
  assert converged
  achieved = _exact_moments(targets.exponential(log_a, phi, lam), phi, prompt_logw)
  assert np.max(np.abs(achieved - mu_bar)) < 1e-3
  np.testing.assert_allclose(mu, achieved, atol=1e-12)  # μ̂ is the exact moment here.
  np.testing.assert_allclose(
    lam, _dual_optimum(log_a, phi, prompt_logw, np.asarray(mu_bar)), atol=1e-3
  )
  np.testing.assert_allclose(lam, lam_true, atol=1e-3)
  # Normalising the prompts jointly (the pooled layout over all (x, y)) is another problem: its λ
  # makes the prompt marginal drift, so it misses the conditional moments.
  joint_log_weight = (log_a + prompt_logw[:, None]).ravel()
  pooled, pooled_mu, _ = targets.fit_lambda(
    phi.reshape(-1, 2), joint_log_weight, mu_bar, lr=1.0, tol=1e-6, max_iter=5000
  )
  np.testing.assert_allclose(pooled_mu, mu_bar, atol=1e-6)
  assert np.max(np.abs(pooled - lam)) > 1e-2


def test_fit_lambda_snis_from_samples():
  """SNIS from M samples of q per prompt (log weight log a − log q) lands near the exact λ."""
  log_a, phi, prompt_logw = _conditional(3)
  mu_bar = jnp.asarray([0.5, 0.2])
  lam_exact, _, ok = targets.fit_lambda(
    phi, log_a, mu_bar, prompt_logw_X=prompt_logw, lr=1.0, tol=1e-8, max_iter=5000
  )
  assert ok
  rng = np.random.default_rng(3)
  log_q = exact.normalize(0.5 * log_a)  # A flatter proposal than a.
  m = 4000
  idx = jnp.asarray(
    np.stack([rng.choice(16, size=m, p=np.exp(np.asarray(log_q[x]))) for x in range(4)])
  )
  take = lambda t: jnp.take_along_axis(t, idx, axis=1)
  phi_s = jnp.stack([take(phi[..., f]) for f in range(2)], axis=-1)
  lam, mu, ok = targets.fit_lambda(
    phi_s, take(log_a - log_q), mu_bar, prompt_logw_X=prompt_logw, lr=1.0, tol=1e-8, max_iter=5000
  )
  assert ok
  np.testing.assert_allclose(mu, mu_bar, atol=1e-8)
  np.testing.assert_allclose(lam, lam_exact, atol=0.1)
  assert np.max(np.abs(lam - lam_exact)) > 0  # A sample estimate, not the exact solution.


def test_fit_lambda_hybrid_base_and_divergence():
  log_a, phi, prompt_logw = _conditional(4)
  b = phi[..., 0] > 0
  base = targets.pointwise(log_a, ~b)  # Only responses without feature 0; fit feature 1.
  mu_bar = jnp.asarray([0.25])
  lam, _, ok = targets.fit_lambda(
    phi[..., 1:], base, mu_bar, prompt_logw_X=prompt_logw, lr=1.0, tol=1e-9, max_iter=5000
  )
  assert ok
  log_P = targets.exponential(base, phi[..., 1:], lam)
  np.testing.assert_allclose(_exact_moments(log_P, phi, prompt_logw)[1], 0.25, atol=1e-8)
  assert np.all(log_P[b] == -jnp.inf)
  # A feature that never fires cannot reach a positive moment: no convergence, λ keeps growing.
  never = jnp.zeros((4, 16, 1))
  lam, mu, ok = targets.fit_lambda(never, log_a, jnp.asarray([0.5]), lr=0.5, tol=1e-6, max_iter=200)
  assert not ok and lam[0] == pytest.approx(50.0) and mu[0] == 0


def test_fit_lambda_jit_and_shapes():
  log_a, phi, prompt_logw = _conditional(5)
  fit = jax.jit(targets.fit_lambda, static_argnames=("lr", "tol", "max_iter"))
  lam, _, ok = fit(
    phi, log_a, jnp.asarray([0.45, 0.0]), prompt_logw_X=prompt_logw, lr=1.0, tol=1e-6, max_iter=2000
  )
  assert ok and lam.shape == (2,)
  with pytest.raises(ValueError, match="fit_lambda"):
    targets.fit_lambda(phi, log_a[0], jnp.zeros(2), lr=1.0, tol=1e-6, max_iter=10)
