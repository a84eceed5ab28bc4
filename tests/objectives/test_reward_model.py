"""Bradley–Terry reward model and DPRM (ALGORITHMS.md §4.3): §7.6 vectors, LP optimum, gradients."""

import doctest
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from align_jax.objectives import reward_model

# ALGORITHMS.md §7.6 (C = 6).
Q = [0.1, 0.2, 0.3, 0.2, 0.1, 0.1]
P = [0.0, 0.0, 0.1, 0.3, 0.4, 0.2]
SCORES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def _softplus(x):
  return np.logaddexp(0.0, x)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _lp_ot(p, q, cost):
  """Exact OT by linear programming: min Σ γ_jk c_jk s.t. Σ_k γ_jk = p_j, Σ_j γ_jk = q_k, γ ≥ 0."""
  c = len(p)
  a_rows = np.kron(np.eye(c), np.ones((1, c)))  # Σ_k γ_jk
  a_cols = np.kron(np.ones((1, c)), np.eye(c))  # Σ_j γ_jk
  res = optimize.linprog(
    np.asarray(cost, np.float64).ravel(),
    A_eq=np.vstack([a_rows, a_cols]),
    b_eq=np.concatenate([p, q]),
    bounds=(0, None),
    method="highs",
  )
  assert res.status == 0, res.message
  return res.fun


def _costs(c):
  j = np.arange(c, dtype=np.float64)
  return {"abs": np.abs(j[:, None] - j[None, :]), "squared": (j[:, None] - j[None, :]) ** 2}


@functools.cache
def _jit_ot(cost: str):
  """Jitted dprm_ot_loss for a named cost (one compile per shape instead of one per op)."""
  return jax.jit(functools.partial(reward_model.dprm_ot_loss, cost=cost))


_jit_ot_matrix = jax.jit(lambda x, t, c: reward_model.dprm_ot_loss(x, t, cost=c))


def test_docstring_examples():
  result = doctest.testmod(reward_model, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


# -------------------------------------------------------------------------------------------------
# Bradley–Terry


def test_bt_reward_closed_form_and_gradient():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    reward = jnp.asarray(rng.standard_normal((16, 2)) * 3)
    margin = jnp.asarray(rng.uniform(0, 1, 16))
    for m_arg, c in itertools.product((0.0, 0.5, margin), (0.0, 0.1)):
      fn = lambda r, m: reward_model.bt_reward(r, margin=m, center_weight=c)
      loss, metrics = fn(reward, m_arg)
      g, g_margin = jax.grad(lambda r, m: fn(r, m)[0].sum(), argnums=(0, 1))(reward, m_arg)
      r = np.asarray(reward)
      d, s, m_np = r[:, 0] - r[:, 1], r.sum(-1), np.asarray(m_arg)
      np.testing.assert_allclose(loss, _softplus(-(d - m_np)) + c * s**2, rtol=1e-12)
      w = _sigmoid(-(d - m_np))
      np.testing.assert_allclose(
        g, np.stack([-w + 2 * c * s, w + 2 * c * s], -1), rtol=1e-10, atol=1e-14
      )
      np.testing.assert_array_equal(g_margin, 0.0)
      np.testing.assert_allclose(metrics["margin"], d, rtol=1e-12)
      np.testing.assert_array_equal(metrics["accuracy"], (d > 0).astype(np.float32))
      np.testing.assert_array_equal(metrics["reward_chosen"], r[:, 0])


def test_bt_reward_is_shift_invariant_only_without_centering():
  reward = jnp.array([[1.0, -0.5], [0.2, 0.7], [3.0, 2.0]])
  for c, invariant in ((0.0, True), (0.1, False)):
    fn = lambda r: reward_model.bt_reward(r, center_weight=c)[0]
    shifted = reward + 5.0
    same = np.allclose(fn(shifted), fn(reward), rtol=1e-6)
    same_grad = np.allclose(
      jax.grad(lambda r: fn(r).sum())(shifted), jax.grad(lambda r: fn(r).sum())(reward), rtol=1e-6
    )
    assert same == invariant and same_grad == invariant, c


# -------------------------------------------------------------------------------------------------
# DPRM


def test_section_7_6_vectors():
  with jax.enable_x64(True):
    logits, target = jnp.log(jnp.asarray([Q], jnp.float64)), jnp.asarray([P], jnp.float64)
    loss_abs, m = reward_model.dprm_ot_loss(logits, target, category_scores_C=jnp.asarray(SCORES))
    loss_sq, _ = reward_model.dprm_ot_loss(logits, target, cost="squared")
    assert loss_abs.dtype == jnp.float64
    np.testing.assert_allclose(loss_abs, [1.4], atol=1e-12)
    np.testing.assert_allclose(loss_sq, [2.4], atol=1e-12)
    np.testing.assert_allclose(_lp_ot(P, Q, _costs(6)["abs"]), 1.4, atol=1e-9)
    np.testing.assert_allclose(_lp_ot(P, Q, _costs(6)["squared"]), 2.4, atol=1e-9)
    np.testing.assert_allclose(m["ot"], [1.4], atol=1e-12)
    np.testing.assert_allclose(m["expected_reward"], [0.46], atol=1e-12)
    np.testing.assert_allclose(m["target_expected_reward"], [0.74], atol=1e-12)
    np.testing.assert_array_equal(m["accuracy"], [0.0])  # modes: category 2 vs category 4
    # The default scores are evenly spaced on [0, 1], i.e. the §7.6 ones.
    _, m_default = reward_model.dprm_ot_loss(logits, target)
    np.testing.assert_allclose(m_default["expected_reward"], [0.46], atol=1e-12)
    np.testing.assert_allclose(
      reward_model.expected_reward(logits, jnp.asarray(SCORES)), [0.46], atol=1e-12
    )
    posterior = reward_model.dprm_posterior(jnp.array([[0.0, 1, 2, 5, 8, 4]]), jnp.ones((1, 6)))
    np.testing.assert_allclose(
      posterior, [[0.038462, 0.076923, 0.115385, 0.230769, 0.346154, 0.192308]], atol=1e-6
    )
    np.testing.assert_allclose(posterior, [np.array([1, 2, 3, 6, 9, 5]) / 26], atol=1e-15)


@pytest.mark.parametrize("cost", ["abs", "squared", "convex_of_scores"])
def test_ot_equals_linear_program_on_random_distributions(cost):
  """The CDF closed form ("abs") and the monotone coupling (Monge costs) are the LP optimum."""
  rng = np.random.default_rng({"abs": 1, "squared": 2, "convex_of_scores": 3}[cost])
  with jax.enable_x64(True):
    for c in range(2, 8):
      q = rng.dirichlet(np.ones(c), size=3)
      p = rng.dirichlet(0.5 * np.ones(c), size=3)
      p[0] = np.eye(c)[rng.integers(c)]  # a one-hot target, as a unanimous crowd gives
      if cost == "convex_of_scores":  # h(s_j − s_k) with h = |·|^1.5 and increasing scores
        s = np.cumsum(rng.uniform(0.1, 1.0, c))
        cost_arg = cost_np = np.abs(s[:, None] - s[None, :]) ** 1.5
      else:
        cost_arg, cost_np = cost, _costs(c)[cost]
      logits, target = jnp.log(jnp.asarray(q)), jnp.asarray(p)
      ot = (
        _jit_ot(cost_arg)
        if isinstance(cost_arg, str)
        else functools.partial(_jit_ot_matrix, c=cost_arg)
      )
      loss, _ = ot(logits, target)
      expected = [_lp_ot(p[b], q[b], cost_np) for b in range(3)]
      np.testing.assert_allclose(loss, expected, rtol=1e-7, atol=1e-9)
      if cost == "abs":  # the general (quantile-coupling) path agrees with the closed form
        general, _ = _jit_ot_matrix(logits, target, jnp.asarray(cost_np))
        np.testing.assert_allclose(general, loss, rtol=1e-10, atol=1e-12)


def test_ot_respects_the_order_of_categories():
  """One-hot target at category 0: predicting category k costs k (abs) or k² (squared); the
  cross-entropy would charge every wrong category alike."""
  c = 5
  target = jnp.tile(jnp.eye(c)[:1], (c, 1))
  logits = 30.0 * jnp.eye(c)  # q ≈ one-hot at k for row k
  for cost, expected in (("abs", np.arange(c)), ("squared", np.arange(c) ** 2)):
    loss, m = reward_model.dprm_ot_loss(logits, target, cost=cost)
    np.testing.assert_allclose(loss, expected, atol=1e-4)
  np.testing.assert_array_equal(m["accuracy"], [1.0, 0.0, 0.0, 0.0, 0.0])
  # And it is zero when the prediction is the target.
  p = jnp.asarray([P, Q])
  for cost in ("abs", "squared"):
    np.testing.assert_allclose(
      reward_model.dprm_ot_loss(jnp.log(jnp.asarray([Q, P])), p[::-1], cost=cost)[0], 0.0, atol=1e-6
    )


@pytest.mark.parametrize("cost", ["abs", "squared"])
def test_ot_gradient_matches_finite_differences(cost):
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.standard_normal((4, 6)))
    target = jnp.asarray(rng.dirichlet(np.ones(6), size=4))
    f = jax.jit(lambda x: reward_model.dprm_ot_loss(x, target, cost=cost)[0].sum())
    g = np.asarray(jax.grad(f)(logits))
    eps = 1e-6
    fd = np.zeros_like(g)
    for idx in np.ndindex(*g.shape):
      e = np.zeros(g.shape)
      e[idx] = eps
      fd[idx] = (f(logits + e) - f(logits - e)) / (2 * eps)
    assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 1e-2
    np.testing.assert_allclose(g, fd, atol=1e-7)
    # Softmax invariance: the gradient sums to 0 over the categories of each row.
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-12)
    # "abs" also matches the closed form ∂OT/∂q_m = −Σ_{m ≤ k < C−1} sign(F_p(k) − F_q(k)),
    # pulled back through the softmax Jacobian.
    if cost == "abs":
      q = np.asarray(jax.nn.softmax(logits))
      gap = np.cumsum(np.asarray(target), -1) - np.cumsum(q, -1)
      dq = np.array([[-np.sign(gap[b, m:-1]).sum() for m in range(6)] for b in range(4)])
      dlogits = q * (dq - (q * dq).sum(-1, keepdims=True))
      np.testing.assert_allclose(g, dlogits, atol=1e-12)


def test_posterior_and_expected_reward():
  votes = jnp.array([[0.0, 0, 0], [3, 0, 1]])
  prior = jnp.array([[1.0, 2, 1], [0.5, 0.5, 0.5]])
  post = reward_model.dprm_posterior(votes, prior)
  np.testing.assert_allclose(
    post, [[0.25, 0.5, 0.25], [3.5 / 5.5, 0.5 / 5.5, 1.5 / 5.5]], rtol=1e-6
  )
  np.testing.assert_allclose(post.sum(-1), 1.0, rtol=1e-6)
  # Votes dominate a weak prior: the posterior approaches the vote shares.
  many = reward_model.dprm_posterior(jnp.array([[3e6, 0, 1e6]]), jnp.ones((1, 3)))
  np.testing.assert_allclose(many, [[0.75, 0.0, 0.25]], atol=1e-6)
  logits = jnp.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0]])
  r = reward_model.expected_reward(logits, jnp.array([-1.0, 0.0, 2.0]))
  np.testing.assert_allclose(r, [1.0 / 3, -1.0], rtol=1e-6)


def test_cost_is_validated():
  logits, target = jnp.zeros((1, 4)), jnp.full((1, 4), 0.25)
  with pytest.raises(ValueError, match="unknown"):
    reward_model.dprm_ot_loss(logits, target, cost="cubic")
  with pytest.raises(ValueError, match=r"\[4, 4\]"):
    reward_model.dprm_ot_loss(logits, target, cost=jnp.zeros((3, 3)))


def test_a_cost_without_the_monge_property_is_refused_in_one_line():
  """sqrt|j − k| is concave in |j − k|: not Monge, and there the monotone coupling's cost (what the
  loss would compute) exceeds the true optimal transport cost, so the loss refuses it."""
  j = np.arange(4.0)
  concave = np.sqrt(np.abs(j[:, None] - j[None, :]))
  assert not reward_model.is_cost(concave) and not reward_model.is_cost(concave.tolist())
  assert reward_model.is_cost(_costs(4)["abs"]) and reward_model.is_cost(_costs(4)["squared"])
  assert not reward_model.is_cost(np.ones((3, 4))) and not reward_model.is_cost("cubic")
  # Mass ½ at 0 and 1 to ½ at 1 and 2: the monotone coupling moves 0 → 1 and 1 → 2 (cost 1); the
  # optimum leaves 1 in place and moves 0 → 2 (cost ½·√2).
  p, q = np.array([0.5, 0.5, 0.0, 0.0]), np.array([0.0, 0.5, 0.5, 0.0])
  with jax.enable_x64(True):
    monotone = reward_model._monotone_ot(jnp.asarray([p]), jnp.asarray([q]), jnp.asarray(concave))
  np.testing.assert_allclose(monotone, [1.0], rtol=1e-12)
  np.testing.assert_allclose(_lp_ot(p, q, concave), 0.5 * np.sqrt(2.0), rtol=1e-9)
  with pytest.raises(ValueError, match="Monge property") as e:
    reward_model.dprm_ot_loss(jnp.zeros((1, 4)), jnp.asarray([p]), cost=concave.tolist())
  assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------------------------
# Finite losses and gradients on adversarial inputs.

LOGITS = {
  "+-1e4": jnp.array([[1e4, -1e4, 0.0, -1e4], [-1e4, -1e4, -1e4, 1e4]]),
  "all_equal": jnp.full((2, 4), 3.0),
  "single_example": jnp.array([[-1e4, 1e4, 1e4, -1e4]]),
}
TARGETS = {"one_hot": [0.0, 0.0, 0.0, 1.0], "spread": [0.1, 0.2, 0.3, 0.4]}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("case", sorted(LOGITS))
@pytest.mark.parametrize("cost", ["abs", "squared"])
def test_dprm_finite_on_extreme_inputs(cost, case, target):
  logits = LOGITS[case]
  p = jnp.tile(jnp.asarray([TARGETS[target]]), (logits.shape[0], 1))
  loss_fn = lambda x: reward_model.dprm_ot_loss(x, p, cost=cost)[0].sum()
  loss, g = jax.value_and_grad(loss_fn)(logits)
  assert np.isfinite(loss) and np.all(np.isfinite(g))


@pytest.mark.parametrize("case", ["+-1e4", "all_equal", "single_example"])
def test_bt_reward_finite_on_extreme_inputs(case):
  reward = {
    "+-1e4": jnp.array([[1e4, -1e4], [-1e4, 1e4]]),
    "all_equal": jnp.full((2, 2), -5.0),
    "single_example": jnp.array([[-1e4, 1e4]]),
  }[case]
  for c in (0.0, 0.1):
    loss_fn = lambda r: reward_model.bt_reward(r, center_weight=c)[0].sum()
    loss, g = jax.value_and_grad(loss_fn)(reward)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
