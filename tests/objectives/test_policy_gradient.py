"""REINFORCE / RLOO / ReMax: §7.7 vector and exact expected gradients by enumeration."""

import doctest
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.objectives import policy_gradient as pg
from align_jax.testbed import exact


@pytest.fixture(autouse=True)
def x64():
  """float64 inside each test: expected gradients are compared to 1e-12."""
  with jax.enable_x64(True):
    yield


def _bandit(seed, y=5):
  """A one-step bandit: policy logits θ, reference log-probs and rewards of y outcomes."""
  rng = np.random.default_rng(seed)
  theta_Y = jnp.asarray(rng.normal(size=y))
  ref_Y = jnp.asarray(np.log(rng.dirichlet(np.ones(y))))
  reward_Y = jnp.asarray(rng.normal(size=y))
  return theta_Y, ref_Y, reward_Y


def _objective_grad(theta_Y, ref_Y, reward_Y, beta):
  """∇_θ [E_π[r] − β KL(π‖π_ref)] on the full table."""
  w = jnp.zeros(1)

  def objective(t):
    logp = exact.normalize(t[None])
    return exact.expectation(logp, reward_Y[None], w) - beta * exact.kl(logp, ref_Y[None], w)

  return jax.jit(jax.grad(objective))(theta_Y)


def test_remax_section_7_7():
  token_logp = jnp.array([-0.5, -1.0, -0.2])
  logp = jnp.sum(token_logp)[None, None]
  loss, m = pg.remax(logp, logp, jnp.array([[0.7]]), jnp.array([0.4]), beta=0.0)
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, [0.51], atol=1e-12, rtol=0)
  np.testing.assert_allclose(m["advantage"], [0.3], atol=1e-12, rtol=0)
  np.testing.assert_allclose(m["baseline"], [0.4], rtol=0)
  # With a KL penalty the greedy baseline carries its own: A = (0.7 − 0.1·0.5) − (0.4 − 0.1·(−0.2)).
  _, m = pg.remax(
    logp,
    logp - 0.5,
    jnp.array([[0.7]]),
    jnp.array([0.4]),
    beta=0.1,
    greedy_log_ratio_B=jnp.array([-0.2]),
  )
  np.testing.assert_allclose(m["advantage"], [0.65 - 0.42], atol=1e-12, rtol=0)
  np.testing.assert_allclose(m["kl_penalty"], [0.05], atol=1e-12, rtol=0)


def test_docstring_examples():
  with jax.enable_x64(False):
    result = doctest.testmod(pg, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_reinforce_expected_gradient_is_objective_gradient(beta):
  """Σ_y π(y)·∇ℓ(y) = −∇[E_π r − β KL(π‖π_ref)] exactly, one sample per prompt, no baseline."""
  theta_Y, ref_Y, reward_Y = _bandit(0)

  def expected_loss(theta, beta):
    logp_Y = jax.nn.log_softmax(theta)
    loss_Y, _ = pg.reinforce(
      logp_Y[:, None], ref_Y[:, None], reward_Y[:, None], beta=beta, baseline="none"
    )  # Row y: the sample is y.
    return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp_Y)) * loss_Y)

  grad = jax.jit(jax.grad(expected_loss))
  np.testing.assert_allclose(
    grad(theta_Y, beta), -_objective_grad(theta_Y, ref_Y, reward_Y, beta), atol=1e-13
  )
  wrong_beta = -_objective_grad(theta_Y, ref_Y, reward_Y, beta + 1.0)
  assert not np.allclose(grad(theta_Y, beta), wrong_beta)


def test_leave_one_out_baseline_is_unbiased_and_is_rloo():
  """Exact expectation over K = 2 i.i.d. samples: the leave-one-out baseline adds no bias."""
  theta_Y, ref_Y, reward_Y = _bandit(1, y=4)
  beta = 0.2
  pairs_Tx2 = np.array(list(itertools.product(range(len(theta_Y)), repeat=2)))

  def per_row(theta, baseline):
    logp_Y = jax.nn.log_softmax(theta)
    lp = logp_Y[pairs_Tx2]
    if baseline == "rloo":
      loss_T, _ = pg.rloo(lp, ref_Y[pairs_Tx2], reward_Y[pairs_Tx2], beta=beta)
    else:
      loss_T, _ = pg.reinforce(
        lp, ref_Y[pairs_Tx2], reward_Y[pairs_Tx2], beta=beta, baseline=baseline
      )
    return jax.lax.stop_gradient(jnp.exp(jnp.sum(lp, axis=1))) * loss_T

  grad = lambda b: jax.jit(jax.grad(lambda t: jnp.sum(per_row(t, b))))(theta_Y)
  target = -_objective_grad(theta_Y, ref_Y, reward_Y, beta)
  np.testing.assert_allclose(grad("loo"), target, atol=1e-13)
  np.testing.assert_allclose(grad("none"), target, atol=1e-13)
  np.testing.assert_array_equal(grad("rloo"), grad("loo"))
  row_grad = lambda b: jax.jit(jax.jacobian(per_row), static_argnums=1)(theta_Y, b)
  assert not np.allclose(row_grad("loo"), row_grad("none"))  # The baseline does act per sample.


def test_leave_one_out_advantage_and_gradient():
  """A_k = r̃_k − mean_{i≠k} r̃_i = K/(K−1)(r̃_k − mean r̃); ∂ℓ/∂log π_k = −A_k/K; 0 elsewhere."""
  rng = np.random.default_rng(2)
  b, k, beta = 3, 4, 0.1
  logp, ref = (jnp.asarray(-5.0 + rng.normal(size=(b, k))) for _ in range(2))
  reward = jnp.asarray(rng.normal(size=(b, k)))
  fn = lambda lp, rf, rw: pg.reinforce(lp, rf, rw, beta=beta)[0].sum()
  g_logp, g_ref, g_reward = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(logp, ref, reward)
  shaped = np.asarray(reward) - beta * (np.asarray(logp) - np.asarray(ref))
  advantage = k / (k - 1) * (shaped - shaped.mean(-1, keepdims=True))
  np.testing.assert_allclose(g_logp, -advantage / k, atol=1e-14)
  np.testing.assert_array_equal(g_ref, 0.0)
  np.testing.assert_array_equal(g_reward, 0.0)
  loss, m = pg.reinforce(logp, ref, reward, beta=beta)
  np.testing.assert_allclose(loss, -np.mean(advantage * np.asarray(logp), -1), atol=1e-13)
  np.testing.assert_allclose(m["advantage"], 0.0, atol=1e-14)
  np.testing.assert_allclose(m["reward"], np.mean(np.asarray(reward), -1), rtol=1e-14)
  np.testing.assert_allclose(
    m["kl_penalty"], beta * np.mean(np.asarray(logp - ref), -1), rtol=1e-14
  )


@pytest.mark.parametrize("with_greedy_penalty", [False, True])
def test_remax_is_unbiased_on_a_bandit(with_greedy_penalty):
  """The greedy baseline depends on the prompt only: E_y[∇ℓ] = −∇[E_π r − β KL], exactly."""
  theta_Y, ref_Y, reward_Y = _bandit(3)
  beta = 0.25
  greedy = int(np.argmax(theta_Y))

  def expected_loss(theta):
    logp_Y = jax.nn.log_softmax(theta)
    size = len(theta)
    greedy_ratio_B = None
    if with_greedy_penalty:
      greedy_ratio_B = jnp.full(size, logp_Y[greedy] - ref_Y[greedy])
    loss_Y, _ = pg.remax(
      logp_Y[:, None],
      ref_Y[:, None],
      reward_Y[:, None],
      jnp.full(size, reward_Y[greedy]),
      beta=beta,
      greedy_log_ratio_B=greedy_ratio_B,
    )
    return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp_Y)) * loss_Y)

  grad = jax.jit(jax.grad(expected_loss))(theta_Y)
  np.testing.assert_allclose(grad, -_objective_grad(theta_Y, ref_Y, reward_Y, beta), atol=1e-13)


def test_remax_stop_gradients():
  rng = np.random.default_rng(4)
  logp, ref = (jnp.asarray(-3.0 + rng.normal(size=(2, 3))) for _ in range(2))
  reward, greedy, greedy_ratio = (jnp.asarray(rng.normal(size=s)) for s in ((2, 3), 2, 2))
  fn = lambda *a: pg.remax(a[0], a[1], a[2], a[3], beta=0.3, greedy_log_ratio_B=a[4])[0].sum()
  grads = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3, 4)))(logp, ref, reward, greedy, greedy_ratio)
  for g in grads[1:]:
    np.testing.assert_array_equal(g, 0.0)
  shaped = np.asarray(reward) - 0.3 * np.asarray(logp - ref)
  advantage = shaped - (np.asarray(greedy) - 0.3 * np.asarray(greedy_ratio))[:, None]
  np.testing.assert_allclose(grads[0], -advantage / 3, atol=1e-14)


def test_invalid_baselines_raise():
  x = jnp.zeros((2, 1))
  with pytest.raises(ValueError, match="leave-one-out"):
    pg.reinforce(x, x, x, beta=0.1)
  with pytest.raises(ValueError, match="baseline"):
    pg.reinforce(x, x, x, beta=0.1, baseline="mean")


EXTREMES = {
  "policy_+-1e4": (jnp.array([[1e4, -1e4], [-1e4, 1e4]]), jnp.zeros((2, 2))),
  "reference_+-1e4": (jnp.zeros((2, 2)), jnp.array([[1e4, -1e4], [-1e4, 1e4]])),
  "all_equal": (jnp.full((2, 2), -5.0), jnp.full((2, 2), -5.0)),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_finite_on_extreme_inputs(case):
  logp, ref = (a.astype(jnp.float32) for a in EXTREMES[case])
  reward = jnp.array([[1.0, 0.0], [0.0, 0.0]], jnp.float32)
  objectives = {
    "reinforce": lambda lp, rf: pg.reinforce(lp, rf, reward, beta=0.1),
    "reinforce_none": lambda lp, rf: pg.reinforce(lp, rf, reward, beta=0.1, baseline="none"),
    "remax": lambda lp, rf: pg.remax(
      lp, rf, reward, jnp.zeros(2, jnp.float32), beta=0.1, greedy_log_ratio_B=lp[:, 0] - rf[:, 0]
    ),
  }
  for name, fn in objectives.items():
    loss, metrics = jax.jit(fn)(logp, ref)
    grads = jax.jit(jax.grad(lambda lp, rf, f=fn: f(lp, rf)[0].sum(), argnums=(0, 1)))(logp, ref)
    assert loss.dtype == jnp.float32, name
    assert np.all(np.isfinite(loss)), (name, loss)
    assert all(np.all(np.isfinite(g)) for g in grads), name
    assert all(np.all(np.isfinite(v)) for v in metrics.values()), name
