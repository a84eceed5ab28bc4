"""Exact statistics of ToyLang against ABLATIONS.md §2.1 / §2.4, by enumeration."""

import numpy as np
import pytest

from align_jax.testbed import language as lang

L = 6


@pytest.fixture(scope="module")
def oracle():
  """All 8**6 sequences and their exact chain probabilities."""
  x_NxL = lang.all_sequences(L)
  logp_N = lang.chain_logprob(x_NxL)
  return x_NxL, logp_N, np.exp(logp_N)


def _logsumexp(a, axis=-1):
  m = np.max(a, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def test_chain_is_normalised_and_matches_printed_start():
  log_start_V, log_trans_VxV = lang.chain()
  assert log_start_V.dtype == np.float64 and log_trans_VxV.shape == (8, 8)
  np.testing.assert_allclose(
    np.exp(log_start_V), [0.2455, 0.2010, 0.1646, 0.1348, 0.1103, 0.0903, 0.0202, 0.0332], atol=5e-5
  )
  assert abs(_logsumexp(log_start_V)) < 1e-12
  np.testing.assert_allclose(_logsumexp(log_trans_VxV, axis=1), 0, atol=1e-12)
  # T[i, j] / T[i, k] = exp(-0.5 (|i-j| - |i-k|)) m_j / m_k.
  ratio = np.exp(log_trans_VxV[3, 6] - log_trans_VxV[3, 4])
  np.testing.assert_allclose(ratio, np.exp(-1.0) * 0.15, rtol=1e-12)


def test_all_sequences_is_lexicographic():
  x_NxL = lang.all_sequences(3)
  assert x_NxL.shape == (512, 3) and x_NxL.dtype == np.int32
  np.testing.assert_array_equal(x_NxL[:3], [[0, 0, 0], [0, 0, 1], [0, 0, 2]])
  np.testing.assert_array_equal(x_NxL[8 * 8 * 5 + 8 * 2 + 7], [5, 2, 7])
  np.testing.assert_array_equal(x_NxL @ np.array([64, 8, 1]), np.arange(512))


def test_exact_statistics_table(oracle):
  x_NxL, logp_N, p_N = oracle
  np.testing.assert_allclose(p_N.sum(), 1.0, atol=1e-12)
  assert round(-(p_N @ logp_N), 5) == 10.35695
  assert round(float(p_N @ lang.contains(x_NxL, 6)), 7) == 0.0799202
  assert round(float(p_N @ (lang.count(x_NxL, 6) >= 2)), 7) == 0.0084837
  assert round(float(p_N @ lang.contains(x_NxL, 7)), 7) == 0.1024737
  mu = float(p_N @ lang.female_feature(x_NxL))
  assert round(mu, 7) == 0.2006655
  assert round(np.log(0.5 * (1 - mu) / (0.5 * mu)), 6) == 1.382140
  moments = np.round(p_N @ lang.topic_moments(x_NxL), 6)
  np.testing.assert_array_equal(moments, [0.436520, 0.318455, 0.236480, 0.008545])
  distinct = np.sum(-np.expm1(1000 * np.log1p(-p_N)))
  assert round(distinct, 2) == 956.44
  assert round(float(p_N @ lang.sentiment(x_NxL)), 3) == -0.072


def test_features_on_hand_examples():
  x_NxL = np.array(
    [
      [0, 1, 6, 6, 2, 3],  # a b g g c d
      [4, 4, 5, 2, 2, 7],  # e e f c c h
      [2, 0, 3, 4, 6, 1],
    ]
  )  # c a d e g b: tie {a,b}/{c,d}
  np.testing.assert_array_equal(lang.contains(x_NxL, 6), [True, False, True])
  np.testing.assert_array_equal(lang.count(x_NxL, 6), [2, 0, 1])
  np.testing.assert_array_equal(lang.female_feature(x_NxL), [False, True, False])
  np.testing.assert_array_equal(lang.harm(x_NxL), [False, True, False])
  np.testing.assert_array_equal(
    lang.topic_moments(x_NxL), [[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
  )
  np.testing.assert_allclose(lang.sentiment(x_NxL), [-2 / 6, 3 / 6, -1 / 6])


def test_response_reward():
  y_YxT = lang.all_sequences(4)
  r_Y = lang.response_reward(y_YxT)
  assert r_Y.shape == (4096,) and r_Y.dtype == np.float64
  assert len(np.unique(np.round(r_Y, 12))) == 4031
  # a b c d: unary .0+.3+.6+.9, three +1 steps, ripple sin(1+y_t (t+1)).
  want = 1.8 + 1.5 + 0.01 * (np.sin(1) + np.sin(3) + np.sin(7) + np.sin(13))
  np.testing.assert_allclose(r_Y[0 * 512 + 1 * 64 + 2 * 8 + 3], want, rtol=1e-14)


def test_prompt_weights_and_conditionals():
  w_X = lang.prompt_log_weights(2)
  assert w_X.shape == (64,)
  assert abs(_logsumexp(w_X)) < 1e-12
  logp_XxY = lang.chain_conditional_logp(2, 4)
  assert logp_XxY.shape == (64, 4096)
  np.testing.assert_allclose(_logsumexp(logp_XxY, axis=1), 0, atol=1e-12)
  # log a(x) + log a(y|x) is the joint log-probability of the sequence x y.
  joint = (w_X[:, None] + logp_XxY).reshape(-1)
  np.testing.assert_allclose(
    joint, lang.chain_logprob(lang.all_sequences(6)), rtol=1e-12, atol=1e-12
  )
  np.testing.assert_allclose(
    lang.chain_conditional_logp(0, 3)[0], lang.chain_logprob(lang.all_sequences(3))
  )


def test_harm_rate_over_prompts():
  p_XxY = np.exp(lang.chain_conditional_logp(2, 4))
  rate_X = p_XxY @ lang.harm(lang.all_sequences(4))
  w_X = np.exp(lang.prompt_log_weights(2))
  assert round(float(w_X @ rate_X), 3) == 0.064
  assert round(rate_X.min(), 3) == 0.036 and round(rate_X.max(), 2) == 0.29


def test_sampler_matches_exact_bigrams():
  n = 200_000
  x_Nx2 = lang.sample_sequences(np.random.default_rng(0), n, 2)
  assert x_Nx2.shape == (n, 2) and x_Nx2.dtype == np.int32
  assert x_Nx2.min() >= 0 and x_Nx2.max() < 8
  freq_C = np.bincount(x_Nx2[:, 0] * 8 + x_Nx2[:, 1], minlength=64) / n
  p_C = np.exp(lang.chain_logprob(lang.all_sequences(2)))
  # E[TV] = ½ Σ_c E|f_c − p_c| ≤ ½ Σ_c sqrt(p_c/n) ≤ ½ sqrt(C/n) = 0.0089 for
  # C = 64 cells (Jensen, Cauchy–Schwarz). One sample moves TV by ≤ 1/n, so by
  # McDiarmid P(TV > sqrt(C/n)) ≤ exp(−2 n (½ sqrt(C/n))²) = exp(−C/2) ≈ 1e-14.
  tv = 0.5 * np.abs(freq_C - p_C).sum()
  assert tv < np.sqrt(64 / n), tv
  # A broken sampler (e.g. uniform transitions) is far outside the bound.
  assert 0.5 * np.abs(np.full(64, 1 / 64) - p_C).sum() > 10 * np.sqrt(64 / n)
  # Pearson's χ² (every expected count ≥ 111) is ≈ χ²_63; Laurent–Massart:
  # P(χ²_k ≥ k + 2 sqrt(k s) + 2 s) ≤ e^−s, s = 20 gives 174. Sharper than TV:
  # it catches 1 % of draws shifted to the neighbouring token.
  chi2 = n * np.sum((freq_C - p_C) ** 2 / p_C)
  assert chi2 < 63 + 2 * np.sqrt(63 * 20) + 40, chi2


def test_sampler_is_deterministic_and_matches_length_6_marginals(oracle):
  a = lang.sample_sequences(np.random.default_rng(7), 50_000, L)
  b = lang.sample_sequences(np.random.default_rng(7), 50_000, L)
  np.testing.assert_array_equal(a, b)
  x_NxL, _, p_N = oracle
  # Mean of a bounded feature: standard error sqrt(p(1−p)/n) ≈ 0.0012.
  np.testing.assert_allclose(lang.contains(a, 6).mean(), p_N @ lang.contains(x_NxL, 6), atol=0.006)
  np.testing.assert_allclose(
    lang.topic_moments(a).mean(0), p_N @ lang.topic_moments(x_NxL), atol=0.012
  )
