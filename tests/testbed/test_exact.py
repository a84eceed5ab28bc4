"""Exact metrics and the prefix enumeration pass, against float64 mathematics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import targets
from align_jax.testbed import exact
from align_jax.testbed import language as lang

V = lang.V
BOS = V  # An input-only token for these tests' models; the testbed itself uses none.
MODEL_VOCAB = V + 1


@pytest.fixture(autouse=True)
def x64():
  """float64 inside each test only; the rest of the suite stays float32."""
  with jax.enable_x64(True):
    yield


def _chain_model():
  """The chain as a next-token model over MODEL_VOCAB; BOS never follows."""
  log_start_V, log_trans_VxV = lang.chain()
  table = np.full((MODEL_VOCAB, MODEL_VOCAB), -np.inf)
  table[:V, :V] = log_trans_VxV
  table[BOS, :V] = log_start_V
  table = jnp.asarray(table)
  return lambda tokens_RxS: table[tokens_RxS]


def _bigram_context_model(seed, bos_logit=-np.inf):
  """A random softmax model indexed by the last two tokens (BOS before BOS)."""
  logits = np.random.default_rng(seed).normal(size=(9, 9, 9)) * 2.0
  logits[..., BOS] = bos_logit
  table = jnp.asarray(logits - np.logaddexp.reduce(logits, -1, keepdims=True))

  def fn(tokens_RxS):
    prev_RxS = jnp.pad(tokens_RxS[:, :-1], ((0, 0), (1, 0)), constant_values=BOS)
    return table[prev_RxS, tokens_RxS]

  return fn


def _brute_force(fn, prompts_XxP, response_len):
  """Scores every full sequence [BOS, x, y] separately: X·Y model rows."""
  ys = lang.all_sequences(response_len)
  num_x, p = prompts_XxP.shape
  seq = np.concatenate(
    [
      np.full((num_x * len(ys), 1), BOS),
      np.repeat(prompts_XxP, len(ys), 0),
      np.tile(ys, (num_x, 1)),
    ],
    axis=1,
  )
  lp = np.asarray(fn(jnp.asarray(seq)))[:, p:-1]
  tok = seq[:, 1 + p :]
  return np.take_along_axis(lp, tok[..., None], -1).sum((1, 2)).reshape(num_x, -1)


def _random_tables(seed, x=3, y=6):
  """Random log-prob tables with zeros; p's support ⊂ q's support."""
  rng = np.random.default_rng(seed)
  logp = rng.normal(size=(x, y)) * 1.5
  logq = rng.normal(size=(x, y)) * 1.5
  logp[0, :2] = -np.inf
  logq[0, 1] = -np.inf
  logp[1, 3] = -np.inf
  norm = lambda a: a - np.logaddexp.reduce(a, -1, keepdims=True)
  logw = norm(rng.normal(size=x))
  return norm(logp), norm(logq), logw


def _np_kl(logp, logq, logw):
  p = np.exp(logp)
  with np.errstate(invalid="ignore"):
    terms = np.where(p > 0, p * (logp - logq), 0.0)
  return np.exp(logw) @ terms.sum(-1)


def test_prefix_logps_equals_chain_conditionals():
  fn = _chain_model()
  got = exact.prefix_logps(fn, lang.all_sequences(2), 4, V, BOS)
  assert got.shape == (64, 4096) and got.dtype == jnp.float64
  np.testing.assert_allclose(got, lang.chain_conditional_logp(2, 4), rtol=0, atol=1e-10)
  chunked = exact.prefix_logps(fn, lang.all_sequences(2), 4, V, BOS, chunk=1000)
  np.testing.assert_array_equal(chunked, got)
  full = exact.prefix_logps(fn, np.zeros((1, 0), np.int32), 6, V, BOS)
  np.testing.assert_allclose(full[0], lang.chain_logprob(lang.all_sequences(6)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("prompt_len,response_len", [(1, 3), (2, 1), (0, 2)])
def test_prefix_logps_equals_brute_force(prompt_len, response_len):
  prompts = lang.all_sequences(prompt_len)
  # BOS gets mass here: it must be ignored, not renormalised away.
  fn = _bigram_context_model(1, bos_logit=0.5)
  calls = []
  counted = lambda t: calls.append(t.shape) or fn(t)
  got = exact.prefix_logps(counted, prompts, response_len, V, BOS, chunk=100)
  want = _brute_force(fn, prompts, response_len)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
  rows = len(prompts) * V ** (response_len - 1)  # Y / V times fewer than X·Y.
  # One trace of one chunk shape (lax.map), not one call per chunk.
  assert calls == [(min(rows, 100), prompt_len + response_len)]
  assert np.all(np.logaddexp.reduce(np.asarray(got), -1) < -1e-3)


def test_prefix_logps_rows_sum_to_one_and_jits():
  fn = _bigram_context_model(2)
  prompts = jnp.asarray(lang.all_sequences(2)[::5])
  pass_fn = jax.jit(exact.prefix_logps, static_argnums=(0, 2, 3, 4))
  logp = pass_fn(fn, prompts, 3, V, BOS)
  np.testing.assert_allclose(jax.nn.logsumexp(logp, -1), 0, atol=1e-12)
  np.testing.assert_allclose(logp, _brute_force(fn, np.asarray(prompts), 3), rtol=0, atol=1e-10)


@np.errstate(divide="ignore", invalid="ignore")
def test_divergences_match_numpy():
  logp, logq, logw = _random_tables(0)
  p, q, w = np.exp(logp), np.exp(logq), np.exp(logw)
  np.testing.assert_allclose(exact.kl(logp, logq, logw), _np_kl(logp, logq, logw), rtol=1e-13)
  np.testing.assert_allclose(
    exact.tv(logp, logq, logw), w @ (0.5 * np.abs(p - q).sum(-1)), rtol=1e-13
  )
  logm = np.log((p + q) / 2)
  want_js = 0.5 * _np_kl(logp, logm, logw) + 0.5 * _np_kl(logq, logm, logw)
  np.testing.assert_allclose(exact.js(logp, logq, logw), want_js, rtol=1e-13)
  want_h = -(w @ np.where(p > 0, p * np.log(p), 0).sum(-1))
  np.testing.assert_allclose(exact.entropy(logp, logw), want_h, rtol=1e-13)
  vals = np.random.default_rng(3).normal(size=p.shape)
  vals[0, 0] = np.inf  # p = 0 there: ignored.
  np.testing.assert_allclose(
    exact.expectation(logp, vals, logw), w @ np.where(p > 0, p * vals, 0).sum(-1), rtol=1e-13
  )


@np.errstate(divide="ignore")
def test_divergence_bounds_and_identities():
  logp, logq, logw = _random_tables(1)
  assert exact.kl(logp, logp, logw) == 0.0
  assert exact.tv(logp, logp, logw) == 0.0
  np.testing.assert_allclose(exact.js(logp, logp, logw), 0, atol=1e-15)
  assert 0 < exact.js(logp, logq, logw) <= np.log(2)
  assert 0 < exact.tv(logp, logq, logw) <= 1
  disjoint_p = np.log([[1.0, 0.0]])
  disjoint_q = np.log([[0.0, 1.0]])
  one = np.zeros(1)
  np.testing.assert_allclose(exact.js(disjoint_p, disjoint_q, one), np.log(2))
  assert exact.tv(disjoint_p, disjoint_q, one) == 1.0
  assert exact.kl(disjoint_p, disjoint_q, one) == np.inf
  # A prompt of zero weight contributes nothing, even an infinite divergence.
  two_p = np.concatenate([disjoint_p, np.log([[0.5, 0.5]])])
  two_q = np.concatenate([disjoint_q, np.log([[0.25, 0.75]])])
  w = np.log([0.0, 1.0])
  want = 0.5 * np.log(2) + 0.5 * np.log(0.5 / 0.75)
  np.testing.assert_allclose(exact.kl(two_p, two_q, w), want, rtol=1e-14)


def test_kl_infinite_without_support_with_finite_gradients():
  logp, logq, logw = _random_tables(2)
  assert exact.kl(logq, logp, logw) == np.inf  # q > 0 = p at [0, 0].
  # d KL(q‖softmax(z)) / dz = w (π − q): finite even though the value is inf.
  grad = jax.grad(lambda z: exact.kl(logq, exact.normalize(z), logw))(logp)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(
    grad, np.exp(logw)[:, None] * (np.exp(logp) - np.exp(logq)), atol=1e-14
  )


def test_kl_gradients_with_zeros_match_closed_form():
  logp, logq, logw = _random_tables(3)
  w, p, q = np.exp(logw)[:, None], np.exp(logp), np.exp(logq)
  kl_pi_q = lambda z: exact.kl(exact.normalize(z), logq, logw)
  grad = jax.grad(kl_pi_q)(logp)  # z = logp has -inf entries.
  kl_x = np.asarray([_np_kl(logp[i : i + 1], logq[i : i + 1], np.zeros(1)) for i in range(3)])
  with np.errstate(invalid="ignore"):
    want = w * np.where(p > 0, p * (logp - logq - kl_x[:, None]), 0)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, want, atol=1e-14)
  for fn in (exact.tv, exact.js):
    g = jax.grad(lambda z: fn(exact.normalize(z), logq, logw))(logp)
    assert np.all(np.isfinite(g)), fn.__name__
  g = jax.grad(lambda z: exact.entropy(exact.normalize(z), logw))(logp)
  assert np.all(np.isfinite(g))


def test_rlhf_target_gibbs_variational_identity():
  rng = np.random.default_rng(4)
  logref, _, logw = _random_tables(4, x=4, y=7)
  reward = rng.normal(size=logref.shape)
  for beta in (0.1, 0.5, 2.0):
    target = exact.normalize(targets.rlhf(logref, reward, beta))
    np.testing.assert_allclose(jax.nn.logsumexp(target, -1), 0, atol=1e-13)
    value = lambda lp: exact.expectation(lp, reward, logw) - beta * exact.kl(lp, logref, logw)
    log_z = np.logaddexp.reduce(logref + reward / beta, -1)
    np.testing.assert_allclose(value(target), beta * np.exp(logw) @ log_z, rtol=1e-12)
    for _ in range(5):
      pi = exact.normalize(rng.normal(size=logref.shape))
      assert value(pi) < value(target)
    assert value(logref) < value(target)


def test_rlhf_sentiment_oracle_numbers():
  logp_a = lang.chain_conditional_logp(0, 6)  # One empty prompt: X = 1.
  r_sent = lang.sentiment(lang.all_sequences(6))[None]
  one = np.zeros(1)
  assert round(float(exact.expectation(logp_a, r_sent, one)), 3) == -0.072
  for beta, reward, kl in ((0.5, 0.361, 0.411), (0.25, 0.627, 1.183), (0.1, 0.901, 2.888)):
    target = exact.normalize(targets.rlhf(logp_a, r_sent, beta))
    got = exact.policy_metrics(target, logp_a, r_sent, one)
    assert round(float(got["exact/reward"]), 3) == reward
    assert round(float(got["exact/kl_policy_ref"]), 3) == kl


def test_policy_metrics_keys_jit_and_dtype():
  logp, logq, logw = _random_tables(5)
  reward = np.random.default_rng(5).normal(size=logp.shape)
  base = exact.policy_metrics(logp, logq, reward, logw)
  assert set(base) == {"exact/kl_policy_ref", "exact/reward", "exact/win_rate", "exact/entropy"}
  full = jax.jit(exact.policy_metrics)(logp, logq, reward, logw, logq)
  assert set(full) == set(base) | {
    "exact/kl_target_policy",
    "exact/kl_policy_target",
    "exact/tv",
    "exact/js",
  }
  np.testing.assert_allclose(
    full["exact/kl_policy_target"], full["exact/kl_policy_ref"], rtol=1e-13
  )
  np.testing.assert_allclose(full["exact/kl_target_policy"], exact.kl(logq, logp, logw), rtol=1e-13)
  f32 = exact.policy_metrics(
    *(jnp.asarray(a, jnp.float32) for a in (logp, logq, reward, logw, logq))
  )
  for key, value in f32.items():
    assert value.dtype == jnp.float32, key
    np.testing.assert_allclose(value, full[key], rtol=1e-5, atol=1e-6)


def test_win_rate_equals_the_sum_over_all_pairs_with_ties_half():
  logp, logq, logw = _random_tables(7, x=3, y=9)
  reward = np.round(np.random.default_rng(7).normal(size=logp.shape), 0)  # Many ties.
  p, q = np.exp(logp), np.exp(logq)
  beats = (reward[:, :, None] > reward[:, None, :]) + 0.5 * (
    reward[:, :, None] == reward[:, None, :]
  )
  want = np.exp(logw) @ np.einsum("xy,xz,xyz->x", p, q, beats)
  np.testing.assert_allclose(exact.win_rate(logp, logq, reward, logw), want, rtol=1e-12)
  np.testing.assert_allclose(
    jax.jit(exact.win_rate)(logq, logq, reward, logw), 0.5, rtol=1e-12
  )  # π = π_ref: exactly ½, ties or not.
  np.testing.assert_allclose(
    exact.win_rate(logp, logq, 3.0 * reward + 1.0, logw), want, rtol=1e-12
  )  # Only the order of rewards matters.


def test_dominance_quantile_diagnostics():
  u = np.arange(1.0, 101.0)
  d = exact.dominance(u, u - 2.0)
  np.testing.assert_allclose(
    [d["violation"], d["margin"], d["margin_q05"]], [0.0, 2.0, 2.0], rtol=1e-12
  )
  d = exact.dominance(u, np.concatenate([u[:50], u[50:] + 10.0]))  # Upper half dominated.
  np.testing.assert_allclose(d["margin_q05"], 0.0, atol=1e-12)
  assert 0.45 < float(d["violation"]) < 0.55
  perm = np.random.default_rng(0).permutation(100)  # Unpaired: order of the samples is moot.
  np.testing.assert_allclose(exact.dominance(u[perm], u - 2.0)["margin"], 2.0, rtol=1e-12)
