"""Pairwise, binary and tie objectives (ALGORITHMS.md §5.2–§5.8), SimPO and ORPO: §7.7 vectors,
special cases, gradients."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import objectives
from align_jax.data import udm
from align_jax.objectives import binary, likelihood, pairwise

# ALGORITHMS.md §7.7: log π(y_w) = −10, log π(y_l) = −12, log π_ref = −10.5, −11.5 => h = 1; |y| = 20, 10.
LOGP = [[-10.0, -12.0]]
REF = [[-10.5, -11.5]]
LENGTHS = [[20.0, 10.0]]


def _random_pairs(seed: int, batch: int = 16, scale: float = 3.0):
  """Policy and reference [B, 2] log-probs with margins h spread over both signs."""
  rng = np.random.default_rng(seed)
  ref_Bx2 = -20.0 + rng.standard_normal((batch, 2))
  logp_Bx2 = ref_Bx2 + scale * rng.standard_normal((batch, 2))
  return jnp.asarray(logp_Bx2, jnp.float32), jnp.asarray(ref_Bx2, jnp.float32)


def _h(logp_Bx2, ref_Bx2):
  ratio = np.asarray(logp_Bx2, np.float64) - np.asarray(ref_Bx2, np.float64)
  return ratio[:, 0] - ratio[:, 1]


def _softplus(x):
  return np.logaddexp(0.0, x)


def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


# -------------------------------------------------------------------------------------------------
# §7.7 rows, in float64 so the 6-decimal values are checked to 1e-6 (float32 rounding alone is ~2e-6
# at the IPO value 24.255625).


def _bco_after_update(logp, ref, delta0, count0, beta):
  rewards_B = beta * (logp[0] - ref[0])
  delta, _ = binary.bco_update_delta(delta0, count0, rewards_B)
  return binary.bco(logp[0], ref[0], jnp.array([True, False]), delta, beta=beta)[0]


def _todo_both(logp, ref, key):
  loss, m = pairwise.todo(
    jnp.concatenate([logp, logp]),
    jnp.concatenate([ref, ref]),
    jnp.array([False, True]),
    beta=0.1,
    alpha=0.5,
  )
  return loss if key is None else jnp.stack([m["p_win"][0], m["p_lose"][0], m["p_tie"][0]])


def _slic_hf_row(logp):
  loss, m = pairwise.slic_hf(logp, jnp.array([-9.0]), delta=1.0, lam=0.5)
  return jnp.concatenate([loss, m["calibration"]])


VECTORS = {
  "dpo": (lambda lp, rf, n: pairwise.dpo(lp, rf, beta=0.1)[0], [0.644397]),
  "cdpo": (lambda lp, rf, n: pairwise.cdpo(lp, rf, beta=0.1, label_smoothing=0.1)[0], [0.654397]),
  "rdpo": (lambda lp, rf, n: pairwise.rdpo(lp, rf, beta=0.1, label_smoothing=0.1)[0], [0.631897]),
  "ipo_sequence": (lambda lp, rf, n: pairwise.ipo(lp, rf, tau=0.1)[0], [16.0]),
  "ipo_per_token": (
    lambda lp, rf, n: pairwise.ipo(lp, rf, tau=0.1, num_tokens_Bx2=n)[0],
    [24.255625],
  ),
  "slic_hinge": (lambda lp, rf, n: pairwise.slic_hinge(lp, rf, beta=0.1)[0], [0.9]),
  "slic_hf_loss_and_calibration": (lambda lp, rf, n: _slic_hf_row(lp), [4.5, 0.0]),
  "ln_dpo": (lambda lp, rf, n: pairwise.ln_dpo(lp, rf, n, beta=1.0)[0], [0.656350]),
  "kto_desirable_undesirable": (
    lambda lp, rf, n: binary.kto(lp[0], rf[0], jnp.array([True, False]), 0.2, beta=0.1)[0],
    [0.492501, 0.482507],
  ),
  "kto_z0": (
    lambda lp, rf, n: binary.kto_reference_point(jnp.array([0.3, -0.1, 0.4]), jnp.zeros(3))[None],
    [0.2],
  ),
  "bco_delta_from_batch": (
    lambda lp, rf, n: _bco_after_update(lp, rf, 0.0, 0.0, 0.1),
    [0.668460, 0.668460],
  ),
  "bco_delta_0.03": (
    lambda lp, rf, n: binary.bco(lp[0], rf[0], jnp.array([True, False]), 0.03, beta=0.1)[0],
    [0.683197, 0.653947],
  ),
  "todo_preference_tie": (lambda lp, rf, n: _todo_both(lp, rf, None), [0.913015, 1.409178]),
  "todo_probabilities": (lambda lp, rf, n: _todo_both(lp, rf, "p"), [0.401312, 0.354344, 0.244344]),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_section_7_7_vectors(name):
  fn, expected = VECTORS[name]
  with jax.enable_x64(True):
    logp, ref, n = (jnp.asarray(x, jnp.float64) for x in (LOGP, REF, LENGTHS))
    value = fn(logp, ref, n)
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, expected, atol=1e-6, rtol=0)


def test_bco_delta_from_section_7_7_batch_is_zero():
  with jax.enable_x64(True):
    delta, count = binary.bco_update_delta(0.0, 0.0, jnp.array([0.05, -0.05]))
    np.testing.assert_allclose([delta, count], [0.0, 2.0], atol=1e-15)


def test_docstring_examples():
  for module in (pairwise, binary):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, module.__name__


# -------------------------------------------------------------------------------------------------
# cDPO / rDPO


def test_cdpo_without_smoothing_is_dpo_exactly():
  logp, ref = _random_pairs(0)
  loss_fn = lambda f: lambda lp: f(lp)[0].sum()
  cdpo = lambda lp: pairwise.cdpo(lp, ref, beta=0.3, label_smoothing=0.0)
  dpo = lambda lp: pairwise.dpo(lp, ref, beta=0.3)
  np.testing.assert_array_equal(cdpo(logp)[0], dpo(logp)[0])
  np.testing.assert_array_equal(jax.grad(loss_fn(cdpo))(logp), jax.grad(loss_fn(dpo))(logp))
  assert not np.allclose(pairwise.cdpo(logp, ref, beta=0.3, label_smoothing=0.1)[0], dpo(logp)[0])


def test_cdpo_gradient_closed_form_and_finite_optimum():
  beta, eps = 0.3, 0.1
  logp, ref = _random_pairs(1)
  g_logp, g_ref = jax.grad(
    lambda lp, rf: pairwise.cdpo(lp, rf, beta=beta, label_smoothing=eps)[0].sum(), argnums=(0, 1)
  )(logp, ref)
  h = _h(logp, ref)
  dl_dh = beta * (-(1 - eps) * _sigmoid(-beta * h) + eps * _sigmoid(beta * h))
  np.testing.assert_allclose(g_logp, np.stack([dl_dh, -dl_dh], -1), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(g_ref, 0.0)
  # The minimiser is the finite margin h* = logit(1 − ε)/β.
  h_star = np.log((1 - eps) / eps) / beta
  logp_star = jnp.array([[h_star / 2, -h_star / 2]], jnp.float32)
  g_star = jax.grad(
    lambda lp: pairwise.cdpo(lp, jnp.zeros((1, 2)), beta=beta, label_smoothing=eps)[0].sum()
  )(logp_star)
  np.testing.assert_allclose(g_star, 0.0, atol=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
def test_rdpo_is_unbiased_under_symmetric_label_flips(eps):
  """E over the flip (prob ε) of the rDPO loss on the observed label is the clean DPO loss."""
  with jax.enable_x64(True):
    logp, ref = _random_pairs(2)
    logp, ref = logp.astype(jnp.float64), ref.astype(jnp.float64)
    flipped = lambda x: x[:, ::-1]
    expected_rdpo = (1 - eps) * pairwise.rdpo(logp, ref, beta=0.2, label_smoothing=eps)[
      0
    ] + eps * pairwise.rdpo(flipped(logp), flipped(ref), beta=0.2, label_smoothing=eps)[0]
    clean = pairwise.dpo(logp, ref, beta=0.2)[0]
    np.testing.assert_allclose(expected_rdpo, clean, atol=1e-12)
    # cDPO, by contrast, is biased: its expectation under the same noise is not the clean loss.
    expected_cdpo = (1 - eps) * pairwise.cdpo(logp, ref, beta=0.2, label_smoothing=eps)[
      0
    ] + eps * pairwise.cdpo(flipped(logp), flipped(ref), beta=0.2, label_smoothing=eps)[0]
    assert np.max(np.abs(expected_cdpo - clean)) > 1e-3


def test_flip_rates_are_validated():
  logp, ref = jnp.array(LOGP), jnp.array(REF)
  for bad in (0.5, -0.1, 0.7):
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
      pairwise.rdpo(logp, ref, beta=0.1, label_smoothing=bad)
  for bad in (-0.1, 0.6):
    with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
      pairwise.cdpo(logp, ref, beta=0.1, label_smoothing=bad)
  pairwise.cdpo(logp, ref, beta=0.1, label_smoothing=0.5)
  np.testing.assert_allclose(
    pairwise.rdpo(logp, ref, beta=0.1, label_smoothing=0.0)[0], [0.644397], atol=1e-6
  )
  with pytest.raises(ValueError, match="alpha"):
    pairwise.todo(logp, ref, jnp.array([True]), beta=0.1, alpha=0.0)
  with pytest.raises(ValueError, match="tau"):
    pairwise.ipo(logp, ref, tau=0.0)


# -------------------------------------------------------------------------------------------------
# IPO, SLiC, LN-DPO


@pytest.mark.parametrize("per_token", [False, True])
def test_ipo_gradient_closed_form(per_token):
  tau = 0.25
  logp, ref = _random_pairs(3)
  n = jnp.array([[7.0, 3.0]] * 8 + [[1.0, 12.0]] * 8) if per_token else None
  g_logp, g_ref = jax.grad(
    lambda lp, rf: pairwise.ipo(lp, rf, tau=tau, num_tokens_Bx2=n)[0].sum(), argnums=(0, 1)
  )(logp, ref)
  n_np = np.ones((16, 2)) if n is None else np.asarray(n)
  ratio = (np.asarray(logp, np.float64) - np.asarray(ref, np.float64)) / n_np
  residual = 2 * (ratio[:, 0] - ratio[:, 1] - 1 / (2 * tau))
  np.testing.assert_allclose(
    g_logp, np.stack([residual / n_np[:, 0], -residual / n_np[:, 1]], -1), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_array_equal(g_ref, 0.0)


def test_ipo_gradient_vanishes_at_target_margin():
  tau = 0.1  # target h = 1/(2τ) = 5
  g = jax.grad(lambda lp: pairwise.ipo(lp, jnp.zeros((1, 2)), tau=tau)[0].sum())(
    jnp.array([[2.5, -2.5]])
  )
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("beta,delta", [(0.1, 1.0), (0.5, 2.0)])
def test_slic_hinge_is_max_zero_delta_minus_beta_h(beta, delta):
  logp, ref = _random_pairs(4, batch=32, scale=6.0)
  h = _h(logp, ref)
  assert np.any(beta * h > delta) and np.any(beta * h < delta)  # both regimes are exercised
  kwargs = (
    {"beta": beta} if delta == 1.0 else {"beta": beta, "delta": delta}
  )  # δ = 1 is the default
  loss, m = pairwise.slic_hinge(logp, ref, **kwargs)
  np.testing.assert_allclose(loss, np.maximum(0.0, delta - beta * h), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m["margin"], beta * h, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda lp: pairwise.slic_hinge(lp, ref, **kwargs)[0].sum())(logp)
  active = (beta * h < delta)[:, None]
  np.testing.assert_allclose(g, np.where(active, [[-beta, beta]], 0.0), rtol=1e-6)


def test_slic_hf_calibration_and_regulariser():
  logp = jnp.array(
    [[-10.0, -12.0], [-10.0, -10.5], [-13.0, -11.0]]
  )  # log-likelihood margins 2, 0.5, −2
  target = jnp.array([-9.0, -4.0, -20.0])
  delta, lam = 1.0, 0.5
  loss, m = pairwise.slic_hf(logp, target, delta=delta, lam=lam)
  np.testing.assert_allclose(m["calibration"], [0.0, 0.5, 3.0])
  np.testing.assert_allclose(loss, [4.5, 0.5 + 2.0, 3.0 + 10.0])
  g_logp, g_target = jax.grad(
    lambda lp, t: pairwise.slic_hf(lp, t, delta=delta, lam=lam)[0].sum(), argnums=(0, 1)
  )(logp, target)
  np.testing.assert_allclose(g_logp, [[0.0, 0.0], [-1.0, 1.0], [-1.0, 1.0]])
  np.testing.assert_allclose(g_target, [-lam] * 3)


def test_ln_dpo_reduces_to_dpo_and_is_length_invariant():
  logp, ref = _random_pairs(5)
  dpo = pairwise.dpo(logp, ref, beta=0.5)[0]
  ones = jnp.ones((16, 2))
  np.testing.assert_allclose(pairwise.ln_dpo(logp, ref, ones, beta=0.5)[0], dpo, rtol=1e-6)
  np.testing.assert_allclose(pairwise.ln_dpo(logp, ref, 0 * ones, beta=0.5)[0], dpo, rtol=1e-6)
  n = jnp.array([[20.0, 10.0]] * 16)
  ln = pairwise.ln_dpo(logp, ref, n, beta=0.5)[0]
  np.testing.assert_allclose(pairwise.ln_dpo(2 * logp, 2 * ref, 2 * n, beta=0.5)[0], ln, rtol=1e-6)
  ratio = (np.asarray(logp, np.float64) - np.asarray(ref, np.float64)) / np.asarray(n)
  np.testing.assert_allclose(ln, _softplus(-0.5 * (ratio[:, 0] - ratio[:, 1])), rtol=1e-5)
  assert not np.allclose(ln, dpo)


# -------------------------------------------------------------------------------------------------
# TODO


def test_todo_without_ties_is_dpo_with_margin_alpha_and_dpo_as_alpha_vanishes():
  logp, ref = _random_pairs(6)
  beta, alpha = 0.3, 0.5
  no_ties = jnp.zeros(16, bool)
  loss, m = pairwise.todo(logp, ref, no_ties, beta=beta, alpha=alpha)
  np.testing.assert_allclose(loss, _softplus(-(beta * _h(logp, ref) - alpha)), rtol=1e-5)
  np.testing.assert_allclose(m["p_win"], _sigmoid(beta * _h(logp, ref) - alpha), rtol=1e-5)
  tiny, _ = pairwise.todo(logp, ref, no_ties, beta=beta, alpha=1e-7)
  np.testing.assert_allclose(tiny, pairwise.dpo(logp, ref, beta=beta)[0], atol=1e-6)
  assert not np.allclose(loss, pairwise.dpo(logp, ref, beta=beta)[0], atol=1e-3)


def test_todo_probabilities_and_tie_loss():
  with jax.enable_x64(True):
    margins = jnp.linspace(-8.0, 8.0, 33)  # ℓ = βh with β = 1, includes ℓ = 0 at index 16
    logp = jnp.stack([margins / 2, -margins / 2], -1)
    ref = jnp.zeros_like(logp)
    ties = jnp.ones(33, bool)
    loss, m = pairwise.todo(logp, ref, ties, beta=1.0, alpha=0.5)
    np.testing.assert_allclose(m["p_win"] + m["p_lose"] + m["p_tie"], 1.0, atol=1e-12)
    np.testing.assert_allclose(loss, -np.log(m["p_tie"]), rtol=1e-12)
    # Minimum at ℓ = 0: −log(e − 1) + 2·softplus(0.5) (ALGORITHMS.md §5.8).
    assert int(np.argmin(loss)) == 16
    np.testing.assert_allclose(loss[16], 1.406829, atol=1e-6)
    # Symmetric in the order of the pair.
    swapped, _ = pairwise.todo(logp[:, ::-1], ref, ties, beta=1.0, alpha=0.5)
    np.testing.assert_allclose(swapped, loss, rtol=1e-12)
    # Ternary accuracy (argmax of the three): at α = 0.5 a tie is never the most likely outcome
    # (p_tie ≤ 0.245 < p_win at ℓ = 0); at α = 1.5 it is near ℓ = 0, and a win only for large ℓ.
    assert np.all(m["accuracy"] == 0.0)
    _, m_wide = pairwise.todo(logp, ref, ties, beta=1.0, alpha=1.5)
    np.testing.assert_array_equal(np.asarray(m_wide["accuracy"])[[0, 16, 32]], [0.0, 1.0, 0.0])
    _, m_pref = pairwise.todo(logp, ref, ~ties, beta=1.0, alpha=1.5)
    np.testing.assert_array_equal(np.asarray(m_pref["accuracy"])[[0, 16, 32]], [0.0, 0.0, 1.0])


# -------------------------------------------------------------------------------------------------
# KTO and BCO


def test_kto_reference_point_is_clamped_masked_mean_without_gradient():
  np.testing.assert_allclose(
    binary.kto_reference_point(jnp.array([0.3, -0.1, 0.4]), jnp.zeros(3)), 0.2, atol=1e-7
  )
  np.testing.assert_array_equal(
    binary.kto_reference_point(jnp.array([-0.3, 0.1]), jnp.zeros(2)), 0.0
  )
  padded = binary.kto_reference_point(
    jnp.array([1.3, 0.9, 1.4, 100.0]), jnp.ones(4), jnp.array([1, 1, 1, 0])
  )
  np.testing.assert_allclose(padded, 0.2, atol=1e-6)
  np.testing.assert_array_equal(
    binary.kto_reference_point(jnp.ones(2), jnp.zeros(2), jnp.zeros(2)), 0.0
  )
  g = jax.grad(lambda lp, rf: binary.kto_reference_point(lp, rf), argnums=(0, 1))(
    jnp.array([0.3, -0.1, 0.4]), jnp.zeros(3)
  )
  np.testing.assert_array_equal(g, 0.0)


def test_kto_symmetry_bounds_and_gradient():
  beta, c = 0.1, 2.0
  loss, m = binary.kto(jnp.array([c, -c]), jnp.zeros(2), jnp.array([True, False]), 0.0, beta=beta)
  np.testing.assert_allclose(loss, [1 - _sigmoid(beta * c)] * 2, rtol=1e-6)
  np.testing.assert_array_equal(m["accuracy"], [1.0, 1.0])
  # Saturating: bounded by λ_D / λ_U for any log-ratio; the weights scale each kind separately.
  r = jnp.array([-1e4, 1e4, -1e4, 1e4, 0.3])
  desirable = jnp.array([True, True, False, False, True])
  loss, _ = binary.kto(
    r, jnp.zeros(5), desirable, 0.2, beta=beta, desirable_weight=2.0, undesirable_weight=3.0
  )
  np.testing.assert_allclose(loss[:4], [2.0, 0.0, 0.0, 3.0], atol=1e-6)
  assert 0.0 < loss[4] < 2.0
  # ∂ℓ_D/∂r = −λ_D β σ(m) σ(−m) with m = β(r − z0); ∂ℓ_U/∂r = +λ_U β σ(m) σ(−m) with m = β(z0 − r).
  r = jnp.array([0.5, -0.5, 1.5])
  desirable = jnp.array([True, False, False])
  g_r, g_z0 = jax.grad(
    lambda r, z: binary.kto(r, jnp.zeros(3), desirable, z, beta=beta, desirable_weight=2.0)[
      0
    ].sum(),
    argnums=(0, 1),
  )(r, jnp.float32(0.2))
  s = np.array([1.0, -1.0, -1.0])
  margin = s * beta * (np.asarray(r) - 0.2)
  lam = np.array([2.0, 1.0, 1.0])
  np.testing.assert_allclose(g_r, -s * lam * beta * _sigmoid(margin) * _sigmoid(-margin), rtol=1e-5)
  np.testing.assert_array_equal(g_z0, 0.0)


def test_kto_single_kind_batches_are_finite():
  for labels in (jnp.ones(4, bool), jnp.zeros(4, bool)):
    loss, _ = binary.kto(jnp.arange(4.0), jnp.zeros(4), labels, 0.1, beta=0.1)
    assert np.all(np.isfinite(loss)) and np.all((loss >= 0) & (loss <= 1))


def test_bco_delta_is_running_mean_of_everything_seen():
  with jax.enable_x64(True):
    batches = [
      (jnp.array([0.3, -0.1]), None),
      (jnp.array([1.0, 2.0, 4.0, 50.0]), jnp.array([1, 1, 1, 0])),  # one padding row
      (jnp.array([7.0]), jnp.array([0])),  # only padding
      (jnp.array([-0.6]), None),
    ]
    delta, count = jnp.float64(0.0), jnp.float64(0.0)
    for rewards, mask in batches:
      delta, count = binary.bco_update_delta(delta, count, rewards, mask)
    seen = [0.3, -0.1, 1.0, 2.0, 4.0, -0.6]
    np.testing.assert_allclose([delta, count], [np.mean(seen), len(seen)], atol=1e-12)
    # EMA option: δ' = m·δ + (1 − m)·batch mean; an empty batch leaves δ alone.
    d, c = binary.bco_update_delta(1.0, 5.0, jnp.array([0.0, 2.0]), momentum=0.9)
    np.testing.assert_allclose([d, c], [0.9 * 1.0 + 0.1 * 1.0, 7.0], atol=1e-12)
    d, _ = binary.bco_update_delta(1.0, 5.0, jnp.array([3.0]), jnp.array([0]), momentum=0.9)
    np.testing.assert_allclose(d, 1.0)
    g = jax.grad(lambda r: binary.bco_update_delta(0.0, 3.0, r)[0])(jnp.array([0.1, 0.2]))
    np.testing.assert_array_equal(g, 0.0)


def test_bco_pair_udm_and_gradient():
  beta, c = 0.1, 0.7
  logp = jnp.array([c / beta, -c / beta])
  loss, m = binary.bco(logp, jnp.zeros(2), jnp.array([True, False]), 0.0, beta=beta)
  np.testing.assert_allclose(loss.sum(), 2 * _softplus(-c), rtol=1e-6)
  np.testing.assert_allclose(m["reward"], [c, -c], rtol=1e-6)
  # UDM: density-ratio weights multiply undesirable losses only.
  w = udm.bco_udm_weight(jnp.array([0.75, 0.75]))
  np.testing.assert_allclose(w, [3.0, 3.0], rtol=1e-6)
  weighted, _ = binary.bco(
    logp, jnp.zeros(2), jnp.array([True, False]), 0.0, beta=beta, udm_weight_B=w
  )
  np.testing.assert_allclose(weighted, [loss[0], 3.0 * loss[1]], rtol=1e-6)
  np.testing.assert_allclose(
    udm.bco_udm_weight(jnp.array([0.0, 0.2, 0.5, 0.99, 1.0])),
    [0.5, 0.5, 1.0, 10.0, 10.0],
    rtol=1e-6,
  )
  # ∂ℓ/∂log π = −β s σ(−m) with m = s(r − δ); no gradient into δ or the reference.
  logp, ref = jnp.array([-3.0, -5.0, -4.0]), jnp.array([-4.0, -4.0, -2.0])
  chosen = jnp.array([True, False, True])
  g_logp, g_ref, g_delta = jax.grad(
    lambda lp, rf, d: binary.bco(lp, rf, chosen, d, beta=beta)[0].sum(), argnums=(0, 1, 2)
  )(logp, ref, jnp.float32(0.05))
  s = np.where(np.asarray(chosen), 1.0, -1.0)
  margin = s * (beta * (np.asarray(logp) - np.asarray(ref)) - 0.05)
  np.testing.assert_allclose(g_logp, -beta * s * _sigmoid(-margin), rtol=1e-5)
  np.testing.assert_array_equal(g_ref, 0.0)
  np.testing.assert_array_equal(g_delta, 0.0)


# -------------------------------------------------------------------------------------------------
# Every objective: reference gets no gradient; losses and gradients finite on extreme inputs.

_N_Bx2 = jnp.array([[20.0, 10.0], [1.0, 3.0]])
_LABEL_4 = jnp.array([True, False, False, True])


def _kto(lp, rf):
  lp_B, rf_B = lp.reshape(-1), rf.reshape(-1)
  z0 = binary.kto_reference_point(jnp.roll(lp_B, 1), jnp.roll(rf_B, 1))  # batch cycled by one
  return binary.kto(lp_B, rf_B, _LABEL_4, z0, beta=0.1)[0]


def _bco(lp, rf):
  lp_B, rf_B = lp.reshape(-1), rf.reshape(-1)
  delta, _ = binary.bco_update_delta(0.0, 0.0, 0.1 * (lp_B - rf_B))
  return binary.bco(
    lp_B, rf_B, _LABEL_4, delta, beta=0.1, udm_weight_B=udm.bco_udm_weight(jnp.full(4, 0.6))
  )[0]


OBJECTIVES = {
  "cdpo": lambda lp, rf: pairwise.cdpo(lp, rf, beta=0.1, label_smoothing=0.1)[0],
  "rdpo": lambda lp, rf: pairwise.rdpo(lp, rf, beta=0.1, label_smoothing=0.1)[0],
  "ipo": lambda lp, rf: pairwise.ipo(lp, rf, tau=0.1)[0],
  "ipo_per_token": lambda lp, rf: pairwise.ipo(lp, rf, tau=0.1, num_tokens_Bx2=_N_Bx2)[0],
  "slic_hinge": lambda lp, rf: pairwise.slic_hinge(lp, rf, beta=0.1)[0],
  "slic_hf": lambda lp, rf: pairwise.slic_hf(lp, lp[:, 0], delta=1.0, lam=0.5)[0],
  "ln_dpo": lambda lp, rf: pairwise.ln_dpo(lp, rf, _N_Bx2, beta=1.0)[0],
  "todo": lambda lp, rf: pairwise.todo(lp, rf, jnp.array([False, True]), beta=0.1, alpha=0.5)[0],
  "kto": _kto,
  "bco": _bco,
  "simpo": lambda lp, rf: pairwise.simpo(lp, _N_Bx2, beta=2.0, gamma=1.0)[0],
  "orpo": lambda lp, rf: pairwise.orpo(lp, _N_Bx2, lam=0.1)[0],
}


@functools.cache
def _loss_and_grads(name):
  """Jitted (loss_B, (∂/∂logp, ∂/∂ref)) of an objective: one compile serves every [2, 2] input."""
  fn = OBJECTIVES[name]
  return jax.jit(jax.value_and_grad(lambda lp, rf: fn(lp, rf).sum(), argnums=(0, 1)))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_reference_and_batch_statistics_get_no_gradient(name):
  logp, ref = _random_pairs(7, batch=2)
  _, (g_logp, g_ref) = _loss_and_grads(name)(logp, ref)
  np.testing.assert_array_equal(g_ref, 0.0)
  assert np.any(g_logp != 0.0)


@pytest.mark.parametrize("name", ["kto", "bco"])
def test_batch_statistic_path_contributes_no_gradient(name):
  """z0 / δ computed from the policy's own log-probs must act as constants."""
  logp, ref = _random_pairs(8, batch=2)
  lp_B, rf_B = logp.reshape(-1), ref.reshape(-1)
  if name == "kto":
    z0 = binary.kto_reference_point(jnp.roll(lp_B, 1), jnp.roll(rf_B, 1))
    frozen = lambda lp: binary.kto(lp.reshape(-1), rf_B, _LABEL_4, z0, beta=0.1)[0].sum()
  else:
    delta, _ = binary.bco_update_delta(0.0, 0.0, 0.1 * (lp_B - rf_B))
    w = udm.bco_udm_weight(jnp.full(4, 0.6))
    frozen = lambda lp: binary.bco(lp.reshape(-1), rf_B, _LABEL_4, delta, beta=0.1, udm_weight_B=w)[
      0
    ].sum()
  live = lambda lp: OBJECTIVES[name](lp, ref).sum()
  np.testing.assert_allclose(jax.grad(live)(logp), jax.grad(frozen)(logp), rtol=1e-6)


EXTREMES = {
  "policy_+-1e4": (jnp.array([[1e4, -1e4], [-1e4, 1e4]]), jnp.zeros((2, 2))),
  "reference_+-1e4": (jnp.zeros((2, 2)), jnp.array([[1e4, -1e4], [-1e4, 1e4]])),
  "all_zero": (jnp.zeros((2, 2)), jnp.zeros((2, 2))),
  "all_equal": (jnp.full((2, 2), -5.0), jnp.full((2, 2), -5.0)),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_finite_on_extreme_and_equal_inputs(name, case):
  logp, ref = EXTREMES[case]
  loss, (g_logp, g_ref) = _loss_and_grads(name)(logp, ref)
  assert np.all(np.isfinite(loss)), loss
  assert np.all(np.isfinite(g_logp)) and np.all(np.isfinite(g_ref))


# -------------------------------------------------------------------------------------------------
# SimPO and ORPO (reference-free, length-normalised): TRL's formulas written out in NumPy, float64.


def _trl_simpo(logp_Bx2, n_Bx2, beta, gamma):
  """TRL CPOTrainer, loss_type="simpo", cpo_alpha=0, no label smoothing: average log-probs, logits
  = (avg_w − avg_l) − simpo_gamma/β, loss = −logsigmoid(β·logits)."""
  avg = np.asarray(logp_Bx2, np.float64) / np.asarray(n_Bx2, np.float64)
  logits = (avg[:, 0] - avg[:, 1]) - gamma / beta
  return _softplus(-beta * logits)


def _trl_orpo(logp_Bx2, n_Bx2, lam):
  """TRL ORPOTrainer.odds_ratio_loss with beta = λ, plus the chosen per-token NLL."""
  avg = np.asarray(logp_Bx2, np.float64) / np.asarray(n_Bx2, np.float64)
  log_odds = (avg[:, 0] - avg[:, 1]) - (np.log1p(-np.exp(avg[:, 0])) - np.log1p(-np.exp(avg[:, 1])))
  ratio = -_softplus(-log_odds)
  return -avg[:, 0] - lam * ratio, log_odds


def _lengths(seed, batch=16):
  """Completion lengths in [1, 30); float64 under enable_x64, else float32."""
  return jnp.asarray(np.random.default_rng(seed).integers(1, 30, (batch, 2)), float)


def test_simpo_orpo_vectors():
  """|y| = 20, 10: ℓ = −0.5, −1.2. SimPO β = 2, γ = 1: softplus(−(1.4 − 1)). ORPO λ = 0.1:
  odds(ℓ) = ℓ − log(1 − e^ℓ) = 0.432752, −0.841618, and 0.5 + 0.1·softplus(−1.274370)."""
  with jax.enable_x64(True):
    logp, n = jnp.asarray(LOGP, jnp.float64), jnp.asarray(LENGTHS, jnp.float64)
    loss, m = pairwise.simpo(logp, n, beta=2.0, gamma=1.0)
    np.testing.assert_allclose(loss, [0.513015], atol=1e-6, rtol=0)
    np.testing.assert_allclose(m["margin"], [1.4], rtol=1e-14)
    np.testing.assert_allclose(
      [m["reward_chosen"][0], m["reward_rejected"][0]], [-1.0, -2.4], rtol=1e-14
    )
    loss, m = pairwise.orpo(logp, n, lam=0.1)
    np.testing.assert_allclose(loss, [0.524655], atol=1e-6, rtol=0)
    np.testing.assert_allclose(m["margin"], [1.274370], atol=1e-6, rtol=0)
    np.testing.assert_allclose(m["nll"], [0.5], rtol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_simpo_and_orpo_match_trl_formulas(seed):
  with jax.enable_x64(True):
    logp, _ = _random_pairs(seed)
    logp, n = jnp.asarray(logp, jnp.float64), _lengths(seed)
    for beta, gamma in ((2.0, 1.0), (0.1, 0.5), (10.0, 3.0)):
      np.testing.assert_allclose(
        pairwise.simpo(logp, n, beta=beta, gamma=gamma)[0],
        _trl_simpo(logp, n, beta, gamma),
        rtol=1e-12,
      )
    for lam in (0.1, 1.0):
      loss, m = pairwise.orpo(logp, n, lam=lam)
      want, log_odds = _trl_orpo(logp, n, lam)
      np.testing.assert_allclose(loss, want, rtol=1e-12)
      np.testing.assert_allclose(m["margin"], log_odds, rtol=1e-12)
      np.testing.assert_allclose(m["log_odds_ratio"], -_softplus(-log_odds), rtol=1e-12)


def test_simpo_gradient_closed_form():
  """∂ℓ/∂log π(y_w) = −(β/|y_w|)·σ(γ − m), ∂ℓ/∂log π(y_l) = (β/|y_l|)·σ(γ − m); none into |y|."""
  beta, gamma = 2.0, 0.8
  with jax.enable_x64(True):
    logp, _ = _random_pairs(3)
    logp, n = jnp.asarray(logp, jnp.float64), _lengths(3)
    g_logp, g_n = jax.grad(
      lambda lp, nn: pairwise.simpo(lp, nn, beta=beta, gamma=gamma)[0].sum(), argnums=(0, 1)
    )(logp, n)
    lp, nn = np.asarray(logp), np.asarray(n)
    margin = beta * (lp[:, 0] / nn[:, 0] - lp[:, 1] / nn[:, 1])
    weight = _sigmoid(gamma - margin)
    np.testing.assert_allclose(
      g_logp, np.stack([-beta / nn[:, 0], beta / nn[:, 1]], -1) * weight[:, None], rtol=1e-10
    )
    np.testing.assert_array_equal(g_n, 0.0)


def test_orpo_gradient_closed_form():
  """With d = odds(ℓ_w) − odds(ℓ_l) and odds'(ℓ) = 1/(1 − e^ℓ): ∂ℓ/∂log π(y_w) =
  (−1 − λσ(−d)/(1 − e^ℓ_w))/|y_w| and ∂ℓ/∂log π(y_l) = λσ(−d)/(1 − e^ℓ_l)/|y_l|."""
  lam = 0.3
  with jax.enable_x64(True):
    logp, _ = _random_pairs(4)
    n = _lengths(4)
    logp = jnp.asarray(logp, jnp.float64) * n / 20.0  # ℓ spread over (−3, −0.2), near 0 too.
    g_logp = jax.grad(lambda lp: pairwise.orpo(lp, n, lam=lam)[0].sum())(logp)
    ell = np.asarray(logp) / np.asarray(n)
    _, d = _trl_orpo(logp, n, lam)
    w = lam * _sigmoid(-d)
    want = np.stack(
      [(-1.0 - w / -np.expm1(ell[:, 0])) / n[:, 0], w / -np.expm1(ell[:, 1]) / n[:, 1]], -1
    )
    np.testing.assert_allclose(g_logp, want, rtol=1e-10)


def test_simpo_special_cases():
  logp, _ = _random_pairs(5)
  ones = jnp.ones_like(logp)
  # γ = 0 and unit lengths: DPO against a zero (uniform) reference, bit for bit.
  np.testing.assert_array_equal(
    pairwise.simpo(logp, ones, beta=0.3, gamma=0.0)[0],
    pairwise.dpo(logp, jnp.zeros_like(logp), beta=0.3)[0],
  )
  # Length-normalised: scaling a response's log-prob and length together changes nothing.
  n = _lengths(5)
  scaled = pairwise.simpo(
    logp * jnp.array([3.0, 1.0]), n * jnp.array([3.0, 1.0]), beta=2.0, gamma=1.0
  )[0]
  np.testing.assert_allclose(scaled, pairwise.simpo(logp, n, beta=2.0, gamma=1.0)[0], rtol=1e-5)
  # The target margin: the loss at margin γ is log 2.
  at_gamma = pairwise.simpo(jnp.array([[-1.0, -1.5]]), jnp.ones((1, 2)), beta=2.0, gamma=1.0)[0]
  np.testing.assert_allclose(at_gamma, [np.log(2.0)], rtol=1e-6)


def test_orpo_special_cases():
  logp, _ = _random_pairs(6)
  n = _lengths(6)
  # λ = 0: the per-token NLL of the chosen response, which is SFT on it.
  np.testing.assert_allclose(
    pairwise.orpo(logp, n, lam=0.0)[0], likelihood.sft(logp[:, :1], n[:, :1])[0], rtol=1e-6
  )
  # Swapping chosen and rejected flips the sign of the log-odds margin.
  swapped = pairwise.orpo(logp[:, ::-1], n[:, ::-1], lam=0.1)[1]["margin"]
  np.testing.assert_allclose(swapped, -pairwise.orpo(logp, n, lam=0.1)[1]["margin"], rtol=1e-6)


def test_orpo_log_odds_stay_accurate_in_float32():
  """log(1 − e^ℓ) in log space: float32 agrees with float64 to 1e-5 relative from ℓ = −1e−6 (where
  naive log(1 − exp) in float32 is off by ~5 %) to ℓ = −80; ℓ = 0 (an empty response) is finite."""
  ell = -np.geomspace(1e-6, 80.0, 41)
  logp = jnp.asarray(np.stack([ell, np.full_like(ell, -1.0)], -1), jnp.float32)
  got = pairwise.orpo(logp, jnp.ones_like(logp), lam=1.0)[1]["margin"]
  ell32 = np.asarray(logp[:, 0], np.float64)  # The float32 inputs, evaluated exactly.
  want = (ell32 - np.log(-np.expm1(ell32))) - (-1.0 - np.log(-np.expm1(-1.0)))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  empty = jnp.zeros((1, 2))
  loss, grad = jax.value_and_grad(lambda lp: pairwise.orpo(lp, empty, lam=0.1)[0].sum())(empty)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(
  "name, fn, cfg",
  [("simpo", pairwise.simpo, {"beta": 2.0, "gamma": 1.0}), ("orpo", pairwise.orpo, {"lam": 0.1})],
)
def test_simpo_orpo_registry_binds_lengths_from_the_loss_mask(name, fn, cfg):
  """The registry entry reads the scored tokens (mask after position 0); no reference is needed."""
  mask = jnp.array([[[1, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]]], jnp.float32)  # 3 and 2 tokens.
  logp = jnp.array([[-3.0, -4.0]])
  entry = objectives.get(name)
  assert not entry.needs_ref and entry.data == "pairs" and entry.granularity == "sequence"
  loss, metrics, stats = entry.fn(logp, {"loss_mask_BxKxL": mask}, {"s": 1}, **cfg)
  want_loss, want_metrics = fn(logp, jnp.array([[3.0, 2.0]]), **cfg)
  np.testing.assert_array_equal(loss, want_loss)
  jax.tree.map(np.testing.assert_array_equal, metrics, want_metrics)
  assert stats == {"s": 1}
