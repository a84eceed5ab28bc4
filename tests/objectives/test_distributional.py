"""D2O and AOT (ALGORITHMS.md §4.1–§4.2): §7.4–§7.5 vectors, special cases, OT optimum, masks."""

import doctest
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.objectives import distributional, pairwise

# ALGORITHMS.md §7.4 (n = 4, β = 0.1): rows are [chosen, rejected].
AOT_LOGP = [[-10.0, -11.0], [-12.0, -11.5], [-9.0, -12.0], [-15.0, -14.0]]
AOT_REF = [[-10.5, -10.5], [-12.0, -11.0], [-9.5, -11.0], [-14.0, -14.5]]
# ALGORITHMS.md §7.5 (K = 3 self-samples, β = α = 0.1): column 0 the negative, then the samples.
D2O_LOGP = [[-25.0, -20.0, -22.0, -21.0]]
D2O_REF = [[-24.0, -20.5, -21.5, -21.5]]

H_CONFIGS = {
  "logistic": {"h": "logistic"},
  "logistic_smoothed": {"h": "logistic", "label_smoothing": 0.2},
  "squared_hinge": {"h": "squared_hinge"},
  "least_squares": {"h": "least_squares"},
}
AOT_FNS = {"paired": distributional.aot, "unpaired": distributional.aot_unpaired}


def _softplus(x):
  return np.logaddexp(0.0, x)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _h_numpy(z, *, beta, h="logistic", label_smoothing=0.0):
  if h == "logistic":
    return (1 - label_smoothing) * _softplus(-beta * z) + label_smoothing * _softplus(beta * z)
  if h == "squared_hinge":
    return np.maximum(beta - z, 0.0) ** 2
  return (beta - z) ** 2


def _random_logps(seed, shape, scale=3.0):
  rng = np.random.default_rng(seed)
  ref = -20.0 + rng.standard_normal(shape)
  return jnp.asarray(ref + scale * rng.standard_normal(shape)), jnp.asarray(ref)


def _uv(fn_name, logp, ref):
  """The two sorted quantities of an AOT variant, in float64 NumPy."""
  logp, ref = np.asarray(logp, np.float64), np.asarray(ref, np.float64)
  if fn_name == "paired":
    return logp[:, 0] - logp[:, 1], ref[:, 0] - ref[:, 1]
  return logp[:, 0] - ref[:, 0], logp[:, 1] - ref[:, 1]


def test_docstring_examples():
  result = doctest.testmod(distributional, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


# -------------------------------------------------------------------------------------------------
# AOT


def test_section_7_4_vectors():
  with jax.enable_x64(True):
    logp, ref = jnp.asarray(AOT_LOGP, jnp.float64), jnp.asarray(AOT_REF, jnp.float64)
    paired, m = distributional.aot(logp, ref, beta=0.1)
    unpaired, m_un = distributional.aot_unpaired(logp, ref, beta=0.1)
    dpo, _ = pairwise.dpo(logp, ref, beta=0.1)
    assert paired.dtype == jnp.float64
    np.testing.assert_allclose(paired.mean(), 0.675256, atol=1e-6)
    np.testing.assert_allclose(unpaired.mean(), 0.674788, atol=1e-6)
    np.testing.assert_allclose(dpo.mean(), 0.676193, atol=1e-6)
    np.testing.assert_allclose(dpo, [0.644397, 0.668460, 0.620957, 0.770957], atol=1e-6)
    # u = [1, −0.5, 3, −1] has ranks [2, 1, 3, 0]; sorted v = [−1, 0, 0.5, 1.5]; so example b is
    # charged h(u_b − v_(rank b)) with z = [0.5, −0.5, 1.5, 0].
    z = np.array([0.5, -0.5, 1.5, 0.0])
    np.testing.assert_allclose(paired, _softplus(-0.1 * z), atol=1e-12)
    np.testing.assert_allclose(m["sorted_margin"], 0.1 * z, atol=1e-12)
    np.testing.assert_array_equal(m["dominance_violation"], [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(m["margin"], 0.1 * np.array([1.0, 0.5, 1.5, -1.5]), atol=1e-12)
    np.testing.assert_array_equal(m["accuracy"], [1.0, 1.0, 1.0, 0.0])
    # Unpaired: chosen ratios [0.5, 0, 0.5, −1], rejected [−0.5, −0.5, −1, 0.5] => sorted
    # differences [0, 0.5, 1, 0], the minimum over all 24 pairings.
    np.testing.assert_allclose(
      np.sort(np.asarray(m_un["sorted_margin"])), 0.1 * np.array([0.0, 0.0, 0.5, 1.0]), atol=1e-12
    )
    u, v = _uv("unpaired", logp, ref)
    best = min(_softplus(-0.1 * (u - v[list(p)])).mean() for p in itertools.permutations(range(4)))
    np.testing.assert_allclose(unpaired.mean(), best, atol=1e-12)


@pytest.mark.parametrize("fn_name", sorted(AOT_FNS))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_single_pair_is_dpo(fn_name, eps):
  """n = 1: no coupling, so AOT is DPO (cDPO with label smoothing), value and gradient."""
  with jax.enable_x64(True):
    logp, ref = _random_logps(0, (6, 2))
    for b in range(6):
      lp, rf = logp[b : b + 1], ref[b : b + 1]
      aot = lambda x: AOT_FNS[fn_name](x, rf, beta=0.3, label_smoothing=eps)[0].sum()
      cdpo = lambda x: pairwise.cdpo(x, rf, beta=0.3, label_smoothing=eps)[0].sum()
      np.testing.assert_allclose(aot(lp), cdpo(lp), rtol=1e-12)
      np.testing.assert_allclose(jax.grad(aot)(lp), jax.grad(cdpo)(lp), rtol=1e-12)
    if eps == 0.0:
      np.testing.assert_allclose(
        AOT_FNS[fn_name](logp[:1], ref[:1], beta=0.3)[0],
        pairwise.dpo(logp[:1], ref[:1], beta=0.3)[0],
        rtol=1e-12,
      )
    # With n > 1 the coupling matters: the batch loss is not the mean DPO loss.
    batch = AOT_FNS[fn_name](logp, ref, beta=0.3, label_smoothing=eps)[0].mean()
    assert abs(batch - pairwise.cdpo(logp, ref, beta=0.3, label_smoothing=eps)[0].mean()) > 1e-4


@pytest.mark.parametrize("config", sorted(H_CONFIGS))
@pytest.mark.parametrize("fn_name", sorted(AOT_FNS))
def test_sorted_pairing_is_the_minimum_over_all_permutations(fn_name, config):
  kwargs = H_CONFIGS[config]
  beta = 0.7
  strictly_better = 0
  with jax.enable_x64(True):
    for n, seed in itertools.product(range(1, 7), range(3)):
      logp, ref = _random_logps(100 * n + seed, (n, 2))
      loss, _ = AOT_FNS[fn_name](logp, ref, beta=beta, **kwargs)
      u, v = _uv(fn_name, logp, ref)
      costs = [
        _h_numpy(u - v[list(p)], beta=beta, **kwargs).mean()
        for p in itertools.permutations(range(n))
      ]
      np.testing.assert_allclose(loss.mean(), min(costs), rtol=1e-12, atol=1e-12)
      strictly_better += min(costs) < _h_numpy(u - v, beta=beta, **kwargs).mean() - 1e-9
  assert strictly_better > 5  # the identity pairing is usually not optimal: the check has teeth


@pytest.mark.parametrize("fn_name", sorted(AOT_FNS))
def test_permutation_of_the_batch_permutes_the_losses(fn_name):
  logp, ref = _random_logps(1, (8, 2))
  perm = np.random.default_rng(2).permutation(8)
  fn = functools.partial(AOT_FNS[fn_name], beta=0.3)
  loss, m = fn(logp, ref)
  loss_p, m_p = fn(logp[perm], ref[perm])
  np.testing.assert_allclose(loss_p, loss[perm], rtol=1e-6)
  np.testing.assert_allclose(loss_p.mean(), loss.mean(), rtol=1e-6)
  for k in m:
    np.testing.assert_allclose(m_p[k], m[k][perm], rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda lp: fn(lp, ref)[0].sum())(logp)
  g_p = jax.grad(lambda lp: fn(lp, ref[perm])[0].sum())(logp[perm])
  np.testing.assert_allclose(g_p, g[perm], rtol=1e-6)


@pytest.mark.parametrize("fn_name", sorted(AOT_FNS))
def test_gradient_flows_through_sorted_values(fn_name):
  """Logistic h: ∂/∂u_(i) = −βσ(−βz_i), ∂/∂v_(i) = +βσ(−βz_i), with the permutation held fixed."""
  beta = 0.3
  logp, ref = _random_logps(3, (8, 2))
  g_logp, g_ref = jax.grad(
    lambda lp, rf: AOT_FNS[fn_name](lp, rf, beta=beta)[0].sum(), argnums=(0, 1)
  )(logp, ref)
  u, v = _uv(fn_name, logp, ref)
  order_u, order_v = np.argsort(u), np.argsort(v)
  w = beta * _sigmoid(-beta * (u[order_u] - v[order_v]))
  g_u, g_v = np.zeros(8), np.zeros(8)
  g_u[order_u], g_v[order_v] = -w, w
  np.testing.assert_array_equal(g_ref, 0.0)
  if fn_name == "paired":  # u = log π(y_w) − log π(y_l); v is the reference's and gets nothing
    np.testing.assert_allclose(g_logp, np.stack([g_u, -g_u], -1), rtol=1e-5)
  else:  # u, v = the chosen and rejected log-ratios, both the policy's
    np.testing.assert_allclose(g_logp, np.stack([g_u, g_v], -1), rtol=1e-5)


def test_label_smoothing_zero_is_plain_form_and_options_are_validated():
  logp, ref = _random_logps(4, (8, 2))
  for fn in AOT_FNS.values():
    plain, _ = fn(logp, ref, beta=0.1)
    np.testing.assert_array_equal(fn(logp, ref, beta=0.1, label_smoothing=0.0)[0], plain)
    assert not np.allclose(fn(logp, ref, beta=0.1, label_smoothing=0.1)[0], plain)
    with pytest.raises(ValueError, match="unknown"):
      fn(logp, ref, beta=0.1, h="indicator")
    for bad in (-0.1, 0.6):
      with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
        fn(logp, ref, beta=0.1, label_smoothing=bad)
    with pytest.raises(ValueError, match="logistic"):
      fn(logp, ref, beta=0.1, label_smoothing=0.1, h="squared_hinge")


def test_squared_hinge_and_least_squares_closed_forms():
  beta = 0.5
  u, v = np.array([2.0, -1.0, 0.2]), np.array([0.0, 0.1, -0.3])
  logp = jnp.stack([jnp.asarray(u), jnp.zeros(3)], -1)
  ref = jnp.stack([jnp.asarray(v), jnp.zeros(3)], -1)
  z = np.sort(u) - np.sort(v)  # [−1.1, 0.2, 2.0]: one below, one inside, one beyond the margin β
  hinge, _ = distributional.aot(logp, ref, beta=beta, h="squared_hinge")
  squares, _ = distributional.aot(logp, ref, beta=beta, h="least_squares")
  np.testing.assert_allclose(np.sort(hinge), np.sort(np.maximum(beta - z, 0) ** 2), rtol=1e-6)
  np.testing.assert_allclose(np.sort(squares), np.sort((beta - z) ** 2), rtol=1e-6)
  assert np.sum(np.asarray(hinge) == 0.0) == 1 and np.all(np.asarray(squares) > 0)


@pytest.mark.parametrize("config", sorted(H_CONFIGS))
@pytest.mark.parametrize("fn_name", sorted(AOT_FNS))
def test_masked_equals_sliced(fn_name, config):
  """Padding rows (extreme values, scattered through the batch) behave as if removed."""
  fn = functools.partial(AOT_FNS[fn_name], beta=0.4, **H_CONFIGS[config])
  logp, ref = _random_logps(5, (9, 2))
  valid = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1], bool)
  # Padding values that would sort first, last and in the middle on either side.
  pad_logp = jnp.array(
    [
      [0.0, 0.0],
      [-80.0, 50.0],
      [0.0, 0.0],
      [0.0, 0.0],
      [50.0, -80.0],
      [0.0, 0.0],
      [0.0, 0.0],
      [-20.0, -20.0],
      [0.0, 0.0],
    ]
  )
  pad_ref = jnp.array(
    [
      [0.0, 0.0],
      [40.0, -60.0],
      [0.0, 0.0],
      [0.0, 0.0],
      [-60.0, 40.0],
      [0.0, 0.0],
      [0.0, 0.0],
      [-20.0, -20.0],
      [0.0, 0.0],
    ]
  )
  logp = jnp.where(valid[:, None], logp, pad_logp)
  ref = jnp.where(valid[:, None], ref, pad_ref)
  loss, m = fn(logp, ref, example_mask_B=jnp.asarray(valid))
  sliced, m_sliced = fn(logp[valid], ref[valid])
  np.testing.assert_allclose(loss[valid], sliced, rtol=1e-6)
  np.testing.assert_array_equal(loss[~valid], 0.0)
  for k in m:
    np.testing.assert_allclose(m[k][valid], m_sliced[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(m[k][~valid], 0.0)
  g = jax.grad(lambda lp: fn(lp, ref, example_mask_B=jnp.asarray(valid))[0].sum())(logp)
  g_sliced = jax.grad(lambda lp: fn(lp, ref[valid])[0].sum())(logp[valid])
  np.testing.assert_allclose(g[valid], g_sliced, rtol=1e-6)
  np.testing.assert_array_equal(g[~valid], 0.0)
  # Without the mask the padding does take part (so the check above can fail).
  assert not np.allclose(fn(logp, ref)[0][valid], sliced, rtol=1e-3)


def test_fully_masked_batch_is_zero_and_finite():
  logp, ref = _random_logps(6, (4, 2))
  for fn in AOT_FNS.values():
    loss_fn = lambda lp: fn(lp, ref, beta=0.1, example_mask_B=jnp.zeros(4))[0].sum()
    loss, g = jax.value_and_grad(loss_fn)(logp)
    assert loss == 0.0
    np.testing.assert_array_equal(g, 0.0)


def test_sort_is_global_under_a_batch_sharded_jit(devices8):
  """B sharded over 8 devices: the jitted loss still couples the whole batch (equals unsharded)."""
  mesh = jax.sharding.Mesh(np.array(devices8), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  logp, ref = _random_logps(7, (16, 2))
  logp_s, ref_s = (jax.device_put(x.astype(jnp.float32), sharding) for x in (logp, ref))
  for fn in AOT_FNS.values():
    loss_fn = jax.jit(jax.value_and_grad(lambda lp, rf: fn(lp, rf, beta=0.3)[0].mean()))
    loss, g = loss_fn(logp_s, ref_s)
    loss_1, g_1 = loss_fn(logp.astype(jnp.float32), ref.astype(jnp.float32))
    np.testing.assert_allclose(loss, loss_1, rtol=1e-6)
    np.testing.assert_allclose(g, g_1, rtol=1e-5)
    # Per-device sorting (two halves of 8, as TRL does on 2 devices) gives a different loss.
    halves = (
      fn(logp[:8], ref[:8], beta=0.3)[0].mean() + fn(logp[8:], ref[8:], beta=0.3)[0].mean()
    ) / 2
    assert abs(halves - loss_1) > 1e-4


# -------------------------------------------------------------------------------------------------
# D2O


def test_section_7_5_vector():
  with jax.enable_x64(True):
    logp, ref = jnp.asarray(D2O_LOGP, jnp.float64), jnp.asarray(D2O_REF, jnp.float64)
    loss, m = distributional.d2o(logp, ref, beta=0.1, alpha=0.1)
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, [0.636514], atol=1e-6)
    np.testing.assert_allclose(m["margin"], [0.7 / 6], atol=1e-12)  # 0.1/3 · 0.5 + 0.1
    np.testing.assert_allclose(m["sample_log_ratio"], [0.5 / 3], atol=1e-12)
    np.testing.assert_allclose(m["negative_log_ratio"], [-1.0], atol=1e-12)
    np.testing.assert_array_equal(m["accuracy"], [1.0])


def test_d2o_value_and_gradient_closed_forms():
  """∂ℓ/∂log π(y_i) = −(β/N)σ(−z), ∂ℓ/∂log π(y_l) = ασ(−z); references (π_r^+ in column 0, π_r^−
  in the sample columns) get no gradient."""
  beta, alpha = 0.3, 0.7
  with jax.enable_x64(True):
    logp, ref = _random_logps(8, (6, 5))
    for mask in (
      None,
      jnp.array(
        [
          [1, 1, 1, 1, 1],
          [0, 1, 0, 1, 1],
          [1, 1, 0, 0, 0],
          [1, 0, 0, 0, 1],
          [0, 1, 1, 1, 0],
          [1, 0, 0, 0, 0],
        ]
      ),
    ):
      fn = lambda lp, rf: distributional.d2o(lp, rf, beta=beta, alpha=alpha, sample_mask_BxK=mask)
      loss, m = fn(logp, ref)
      g_logp, g_ref = jax.grad(lambda lp, rf: fn(lp, rf)[0].sum(), argnums=(0, 1))(logp, ref)
      ratio = np.asarray(logp - ref)
      w = np.ones((6, 4)) if mask is None else np.asarray(mask, np.float64)[:, 1:]
      n = w.sum(-1)
      mean = np.where(n > 0, (w * ratio[:, 1:]).sum(-1) / np.maximum(n, 1), 0.0)
      z = beta * mean - alpha * ratio[:, 0]
      np.testing.assert_allclose(m["margin"], z, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(loss, _softplus(-z), rtol=1e-12)
      expected_samples = -beta * w / np.maximum(n, 1)[:, None] * _sigmoid(-z)[:, None]
      np.testing.assert_allclose(g_logp[:, 1:], expected_samples, rtol=1e-10, atol=1e-15)
      np.testing.assert_allclose(g_logp[:, 0], alpha * _sigmoid(-z), rtol=1e-10)
      np.testing.assert_array_equal(g_ref, 0.0)


def test_d2o_single_sample_single_reference_is_dpo():
  """N = 1, α = β: D2O is DPO with the self-sample as chosen and the negative as rejected."""
  with jax.enable_x64(True):
    logp, ref = _random_logps(9, (8, 2))  # columns [negative, self-sample]
    d2o = lambda lp: distributional.d2o(lp, ref, beta=0.2, alpha=0.2)[0]
    dpo = lambda lp: pairwise.dpo(lp[:, ::-1], ref[:, ::-1], beta=0.2)[0]
    np.testing.assert_allclose(d2o(logp), dpo(logp), rtol=1e-12)
    np.testing.assert_allclose(
      jax.grad(lambda lp: d2o(lp).sum())(logp), jax.grad(lambda lp: dpo(lp).sum())(logp), rtol=1e-12
    )
    assert not np.allclose(distributional.d2o(logp, ref, beta=0.2, alpha=0.5)[0], dpo(logp))


def test_d2o_masked_samples_equal_sliced():
  logp, ref = _random_logps(10, (4, 6))
  mask = jnp.array([[1, 1, 1, 1, 0, 0]] * 4)
  logp = logp.at[:, 4:].set(1e4)  # padding samples with absurd values
  loss, m = distributional.d2o(logp, ref, beta=0.1, alpha=0.1, sample_mask_BxK=mask)
  sliced, m_sliced = distributional.d2o(logp[:, :4], ref[:, :4], beta=0.1, alpha=0.1)
  np.testing.assert_allclose(loss, sliced, rtol=1e-6)
  for k in m:
    np.testing.assert_allclose(m[k], m_sliced[k], rtol=1e-6)
  g = jax.grad(
    lambda lp: distributional.d2o(lp, ref, beta=0.1, alpha=0.1, sample_mask_BxK=mask)[0].sum()
  )(logp)
  np.testing.assert_array_equal(g[:, 4:], 0.0)
  assert not np.allclose(distributional.d2o(logp, ref, beta=0.1, alpha=0.1)[0], sliced)


def test_d2o_sample_term_is_beta_times_mean_log_ratio():
  """z uses β × the mean sample log-ratio: duplicating every sample leaves it unchanged."""
  logp, ref = jnp.array([[-5.0, -3.0, -4.0]]), jnp.array([[-5.0, -4.0, -4.5]])
  z = distributional.d2o(logp, ref, beta=0.5, alpha=0.1)[1]["margin"]
  np.testing.assert_allclose(z, [0.5 * 0.75], rtol=1e-6)
  dup = distributional.d2o(
    jnp.concatenate([logp, logp[:, 1:]], -1),
    jnp.concatenate([ref, ref[:, 1:]], -1),
    beta=0.5,
    alpha=0.1,
  )[1]["margin"]
  np.testing.assert_allclose(dup, z, rtol=1e-6)


# -------------------------------------------------------------------------------------------------
# Finite losses and gradients on adversarial inputs.

EXTREMES = {
  "policy_+-1e4": (jnp.array([[1e4, -1e4, 1e4], [-1e4, 1e4, -1e4]]), jnp.zeros((2, 3))),
  "reference_+-1e4": (jnp.zeros((2, 3)), jnp.array([[1e4, -1e4, -1e4], [-1e4, 1e4, 1e4]])),
  "all_equal": (jnp.full((2, 3), -5.0), jnp.full((2, 3), -5.0)),
  "single_example": (jnp.array([[1e4, -1e4, 3.0]]), jnp.array([[-1e4, 1e4, 0.0]])),
}

OBJECTIVES = {
  **{
    f"aot_{c}": functools.partial(distributional.aot, beta=0.1, **H_CONFIGS[c]) for c in H_CONFIGS
  },
  **{
    f"aot_unpaired_{c}": functools.partial(distributional.aot_unpaired, beta=0.1, **H_CONFIGS[c])
    for c in H_CONFIGS
  },
  "d2o": functools.partial(distributional.d2o, beta=0.1, alpha=0.1),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_finite_on_extreme_and_equal_inputs(name, case):
  logp, ref = EXTREMES[case]
  if name.startswith("aot"):
    logp, ref = logp[:, :2], ref[:, :2]
  loss_fn = lambda lp, rf: OBJECTIVES[name](lp, rf)[0].sum()
  loss, (g_logp, g_ref) = jax.value_and_grad(loss_fn, argnums=(0, 1))(logp, ref)
  assert np.isfinite(loss), loss
  assert np.all(np.isfinite(g_logp)) and np.all(np.isfinite(g_ref))
  np.testing.assert_array_equal(g_ref, 0.0)
  if name.startswith("aot") and case == "all_equal":  # ties everywhere: every rank pairs equals
    np.testing.assert_allclose(OBJECTIVES[name](logp, ref)[1]["sorted_margin"], 0.0)
