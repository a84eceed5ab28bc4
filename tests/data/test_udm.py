"""BCO underlying distribution matching: prompt features, the balanced logistic fit, density-ratio weights."""

import doctest

import numpy as np
import pytest

from align_jax.data import udm


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _known_model(n=20000, seed=0):
  """Features with non-trivial means and scales; labels from logit = x·w + b (≈ 42% positive)."""
  rng = np.random.default_rng(seed)
  x = np.array([3.0, -1.0, 0.0]) + np.array([1.0, 0.5, 2.0]) * rng.standard_normal((n, 3))
  w, b = np.array([1.0, -2.0, 0.5]), -5.5
  y = (rng.random(n) < _sigmoid(x @ w + b)).astype(np.float64)
  return x, y, w, b


def test_fit_recovers_known_logistic_model_and_is_stationary():
  x, y, w_true, b_true = _known_model()
  l2 = 1e-3
  w, b = udm.fit_logistic(x, y, l2=l2)
  n1, n0 = y.sum(), (1 - y).sum()
  # Balancing the classes multiplies the posterior odds by n0/n1: only the intercept moves.
  # Tolerances ≈ 4 standard errors (spread of the fit over 30 seeds: 0.021, 0.038, 0.008; b 0.09).
  assert np.all(np.abs(w - w_true) < [0.09, 0.15, 0.035]), w
  assert abs(b - (b_true + np.log(n0 / n1))) < 0.35, (b, b_true + np.log(n0 / n1))
  # First-order optimality of Σ s_i NLL_i + (λ/2)‖σ⊙w‖², s_i = 1/(2 n_class), σ the s-weighted std.
  s = np.where(y > 0, 0.5 / n1, 0.5 / n0)
  sigma = np.sqrt(s @ (x - s @ x) ** 2)
  r = s * (_sigmoid(x @ w + b) - y)
  grad_w, grad_b = x.T @ r + l2 * sigma**2 * w, r.sum()
  assert np.max(np.abs(grad_w)) < 1e-7 and abs(grad_b) < 1e-7, (grad_w, grad_b)
  assert np.max(np.abs(l2 * sigma**2 * w)) > 1e-3  # the penalty term is not negligible here
  # The unweighted likelihood is not stationary at this point (the balancing matters).
  assert abs(np.mean(_sigmoid(x @ w + b) - y)) > 0.05


def test_duplicating_desirable_examples_leaves_the_fit_unchanged():
  x, y, _, _ = _known_model(n=3000, seed=1)
  w, b = udm.fit_logistic(x, y)
  pos = y > 0
  x2, y2 = np.concatenate([x, x[pos]]), np.concatenate([y, y[pos]])
  w2, b2 = udm.fit_logistic(x2, y2)
  np.testing.assert_allclose(w2, w, rtol=1e-9, atol=1e-9)
  assert b2 == pytest.approx(b, abs=1e-9)


def test_empty_class_raises():
  x = np.random.default_rng(0).standard_normal((10, 2))
  with pytest.raises(ValueError, match=r"both classes.*0 positive"):
    udm.fit_logistic(x, np.zeros(10))
  with pytest.raises(ValueError, match=r"both classes.*0 negative"):
    udm.fit_logistic(x, np.ones(10))
  tokens = np.ones((4, 1, 3), np.int32)
  mask = np.array([0, 1, 0], np.float32) * np.ones((4, 1, 3), np.float32)
  with pytest.raises(ValueError, match="both classes"):
    udm.density_ratio_weights(tokens, mask, np.ones(4, np.float32), np.eye(2))


def test_prompt_features_average_exactly_the_prompt_tokens(monkeypatch):
  embed = np.array([[2.0**i, -(4.0**i)] for i in range(6)])  # distinct, so any mix-up shows
  tokens = np.array(
    [
      [1, 2, 3, 4, 0, 0],  # prompt [1, 2], completion [3, 4], padding
      [5, 5, 1, 3, 2, 0],  # prompt [5, 5, 1]
      [3, 4, 0, 0, 0, 0],  # no prompt: completion starts at 0
      [4, 4, 0, 0, 0, 0],  # no completion token at all
      [0, 0, 0, 5, 5, 5],
    ]
  )  # prompt of token 0 (a real id), completion to the end
  mask = np.array(
    [
      [0, 0, 1, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0],
      [0, 0, 0, 1, 1, 1],
    ],
    np.float32,
  )
  want = np.stack(
    [(embed[1] + embed[2]) / 2, (2 * embed[5] + embed[1]) / 3, np.zeros(2), np.zeros(2), embed[0]]
  )
  got = udm.prompt_features(tokens, mask, embed)
  assert got.dtype == np.float64 and got.shape == (5, 2)
  np.testing.assert_array_equal(got, want)
  monkeypatch.setattr(udm, "_CHUNK_ELEMENTS", 24)  # 2 records per chunk: uneven chunking
  np.testing.assert_array_equal(udm.prompt_features(tokens, mask, embed), want)


# Vocabulary: ids 0..9 are "A" tokens, 10..19 "B" tokens; embeddings carry the A/B side plus noise.
_V, _D, _P, _C, _L = 20, 6, 6, 3, 12


def _synthetic_binary(n_des=400, n_und=700, seed=0):
  """Desirable prompts mostly A tokens; undesirable prompts with k = 0..6 A tokens (uniform)."""
  rng = np.random.default_rng(seed)
  embed = rng.standard_normal((_V, _D)) * 0.3
  embed[:, 0] += np.where(np.arange(_V) < 10, 1.0, -1.0)
  n = n_des + n_und
  n_a = np.concatenate([rng.binomial(_P, 0.8, n_des), rng.integers(0, _P + 1, n_und)])
  is_a = np.arange(_P)[None, :] < n_a[:, None]
  prompt = np.where(is_a, rng.integers(0, 10, (n, _P)), rng.integers(10, 20, (n, _P)))
  tokens = np.zeros((n, 2, _L), np.int32)
  mask = np.zeros((n, 2, _L), np.float32)
  tokens[:, 0, :_P] = rng.permuted(prompt, axis=1)
  tokens[:, 0, _P : _P + _C] = rng.integers(0, _V, (n, _C))
  mask[:, 0, _P : _P + _C] = 1.0
  desirable = np.concatenate([np.ones(n_des), np.zeros(n_und)]).astype(np.float32)
  order = rng.permutation(n)
  return tokens[order], mask[order], desirable[order], embed, n_a[order]


def test_density_ratio_weights_order_clip_and_leave_desirable_at_one():
  tokens, mask, desirable, embed, n_a = _synthetic_binary()
  und = desirable == 0
  wide = udm.density_ratio_weights(tokens, mask, desirable, embed, min_ratio=1e-6, max_ratio=1e6)
  assert wide.dtype == np.float32 and wide.shape == desirable.shape
  assert np.all(wide[~und] == 1.0)
  # The ratio p_D(x)/p_U(x) grows with the number of A tokens in the prompt.
  group_means = [wide[und & (n_a == k)].mean() for k in range(_P + 1)]
  assert np.all(np.diff(group_means) > 0), group_means
  assert group_means[0] < 0.2 and group_means[-1] > 1.5, group_means
  # Clipping: defaults bound the weights; tight bounds are attained and equal np.clip of the ratio.
  default = udm.density_ratio_weights(tokens, mask, desirable, embed)
  assert np.all((default[und] >= 0.5) & (default[und] <= 10.0)) and np.any(default[und] == 0.5)
  tight = udm.density_ratio_weights(tokens, mask, desirable, embed, min_ratio=0.8, max_ratio=1.5)
  np.testing.assert_allclose(tight[und], np.clip(wide[und], 0.8, 1.5), rtol=1e-6)
  assert tight[und].min() == np.float32(0.8) and tight[und].max() == np.float32(1.5)
  assert np.all(tight[~und] == 1.0)


def test_subsample_is_balanced_seeded_and_used_by_the_weights():
  tokens, mask, desirable, embed, _ = _synthetic_binary()
  idx = udm.balanced_subsample(desirable, 50, seed=3)
  assert len(np.unique(idx)) == 100 and np.all(np.diff(idx) > 0)
  assert desirable[idx].sum() == 50
  np.testing.assert_array_equal(idx, udm.balanced_subsample(desirable, 50, seed=3))
  assert not np.array_equal(idx, udm.balanced_subsample(desirable, 50, seed=4))
  small = udm.balanced_subsample(desirable, 500, seed=0)  # only 400 desirable records exist
  assert desirable[small].sum() == 400 and (1 - desirable[small]).sum() == 500
  # The weights are exactly the classifier fitted on that subsample, mapped through the ratio clip.
  got = udm.density_ratio_weights(tokens, mask, desirable, embed, per_class=50, seed=3)
  x = udm.prompt_features(tokens[:, 0], mask[:, 0], embed)
  w, b = udm.fit_logistic(x[idx], desirable[idx])
  p = _sigmoid(x @ w + b)
  want = np.where(desirable > 0, 1.0, np.clip(p / (1 - p), 0.5, 10.0))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Deterministic per seed; another seed draws another subsample and so other weights.
  np.testing.assert_array_equal(
    got, udm.density_ratio_weights(tokens, mask, desirable, embed, per_class=50, seed=3)
  )
  other = udm.density_ratio_weights(tokens, mask, desirable, embed, per_class=50, seed=4)
  assert np.max(np.abs(other - got)) > 1e-3


def test_docstring_examples():
  result = doctest.testmod(udm, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
