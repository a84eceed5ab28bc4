"""The sampler: its log-probs are those of the distribution it draws from, and it draws from it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import config_lib, logps, models, sampling, sharding
from align_jax.testbed import exact

CFG = models.ModelConfig(**models.preset("tiny"))
V = CFG.vocab_size
EOS = 2


@pytest.fixture(scope="module")
def model():
  graphdef, _, names = models.abstract(CFG)
  return graphdef, jax.jit(models.init_params, static_argnums=0)(CFG, jax.random.key(0)), names


# Jitted teacher-forced references (eager op-by-op dispatch would dominate the test time).
_forward = jax.jit(
  lambda graphdef, params, t: models.apply(graphdef, params, t)[0], static_argnums=0
)
_token_logps = jax.jit(logps.token_logps, static_argnums=0)
_sequence_logps = jax.jit(logps.sequence_logps, static_argnums=0)
_next_token_logprobs = jax.jit(logps.next_token_logprobs, static_argnums=0)
_transform = jax.jit(sampling.transform_logits, static_argnums=(1, 2, 3))


def _prompts(rows: int, length: int, seed: int) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (rows, length), 0, V, jnp.int32)


def _np_transform(logits_xV, temperature, top_k, top_p):
  """Reference in float64: softmax(logits/T), keep the top k, renormalise, keep the nucleus."""
  logits_xV = np.asarray(logits_xV, np.float64)
  if temperature == 0:
    return np.where(np.arange(V) == logits_xV.argmax(-1)[..., None], 0.0, -np.inf)
  q = np.exp(logits_xV / temperature - (logits_xV / temperature).max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  if 0 < top_k < V:
    q = np.where(q >= np.sort(q, -1)[..., V - top_k : V - top_k + 1], q, 0.0)
    q /= q.sum(-1, keepdims=True)
  if top_p < 1:
    desc = -np.sort(-q, -1)
    before = np.cumsum(desc, -1) - desc
    least = np.where(before < top_p, desc, np.inf).min(-1, keepdims=True)
    q = np.where(q >= least, q, 0.0)
    q /= q.sum(-1, keepdims=True)
  with np.errstate(divide="ignore"):
    return np.log(q)


def _teacher_logprobs(graphdef, params, tokens_RxL, prompt_len, temperature, top_k, top_p):
  """Transformed log-probs of the generated tokens from ONE full forward pass: float64 [R, N]."""
  logits_RxLxV = _forward(graphdef, params, tokens_RxL)
  logp_RxNxV = _np_transform(logits_RxLxV[:, prompt_len - 1 : -1], temperature, top_k, top_p)
  new_RxN = np.asarray(tokens_RxL)[:, prompt_len:]
  return np.take_along_axis(logp_RxNxV, new_RxN[..., None], -1)[..., 0], logp_RxNxV


def _greedy_by_full_forward(graphdef, params, tokens_RxL, lengths_R, steps):
  """Writes `steps` argmax tokens after the first lengths_R[r] tokens of each row.

  Every step is a full forward pass over the whole (fixed-shape) rows; causality makes the
  tokens to the right of the current one irrelevant.
  """
  tokens_RxL, rows_R = np.array(tokens_RxL), np.arange(len(tokens_RxL))
  for t in range(steps):
    logits_RxLxV = np.asarray(_forward(graphdef, params, jnp.asarray(tokens_RxL)))
    at_R = np.asarray(lengths_R) + t
    tokens_RxL[rows_R, at_R] = logits_RxLxV[rows_R, at_R - 1].argmax(-1)
  return tokens_RxL


def test_config_from_run_config_and_validation():
  cfg = sampling.SamplingConfig(**config_lib.base().sampling)
  assert (cfg.max_new_tokens, cfg.eos_id, cfg.pad_id) == (4, -1, 0)
  hash(cfg)  # Static argument of the jitted sampler.
  for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(top_k=-1), dict(max_new_tokens=0)):
    with pytest.raises(ValueError):
      sampling.SamplingConfig(**{"max_new_tokens": 4, **bad})


def test_transform_logits_vector_and_tie_conventions():
  """q = [.5, .2, .2, .1]: top-k 2 and top-p .6 keep the tied .2s -> [5/9, 2/9, 2/9, 0]."""
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1]]))
  tie_kept = [math.log(5 / 9), math.log(2 / 9), math.log(2 / 9), -np.inf]
  np.testing.assert_allclose(_transform(logits, 1.0, 2, 1.0)[0], tie_kept, rtol=1e-6)
  np.testing.assert_allclose(_transform(logits, 1.0, 0, 0.6)[0], tie_kept, rtol=1e-6)
  np.testing.assert_allclose(_transform(logits, 1.0, 0, 0.4)[0], [0.0, -np.inf, -np.inf, -np.inf])
  # top-p 0.75 needs .5 + .2 + .2: the smallest prefix with mass >= top_p.
  np.testing.assert_allclose(_transform(logits, 1.0, 0, 0.75)[0], tie_kept, rtol=1e-6)
  # Temperature 2 on [.5,.2,.2,.1]: q ∝ sqrt(p).
  sq = np.sqrt([0.5, 0.2, 0.2, 0.1])
  np.testing.assert_allclose(_transform(logits, 2.0, 0, 1.0)[0], np.log(sq / sq.sum()), rtol=1e-6)
  np.testing.assert_allclose(_transform(logits, 0.0, 3, 0.5)[0], [0.0, -np.inf, -np.inf, -np.inf])
  random_logits = jax.random.normal(jax.random.key(9), (64, V)) * 2
  for t, k, p in [(0.7, 3, 1.0), (1.3, 0, 0.7), (0.5, 5, 0.9), (1.0, 8, 1.0)]:
    np.testing.assert_allclose(
      _transform(random_logits, t, k, p), _np_transform(random_logits, t, k, p), atol=1e-5
    )


@pytest.mark.parametrize("eos_id", [EOS, -1])
def test_logps_equal_teacher_forced_at_temperature_one(model, eos_id):
  graphdef, params, _ = model
  R, P, N = 32, 3, 6
  out = sampling.sample(
    graphdef,
    params,
    _prompts(R, P, 1),
    jax.random.key(2),
    sampling.SamplingConfig(max_new_tokens=N, eos_id=eos_id),
  )
  tokens_RxL, mask_RxN = out["tokens_RxL"], np.asarray(out["mask_RxN"])
  assert tokens_RxL.shape == (R, P + N) and out["logp_RxN"].dtype == jnp.float32
  teacher_RxN = np.asarray(_token_logps(graphdef, params, tokens_RxL))[:, P - 1 :]
  np.testing.assert_allclose(out["logp_RxN"], teacher_RxN * mask_RxN, atol=1e-5)
  loss_mask_RxL = np.concatenate([np.zeros((R, P), np.float32), mask_RxN], 1)
  seq_R = _sequence_logps(
    graphdef, params, tokens_RxL[:, None], jnp.asarray(loss_mask_RxL)[:, None]
  )[:, 0]
  np.testing.assert_allclose(np.sum(out["logp_RxN"], -1), seq_R, atol=1e-5)
  if eos_id >= 0:  # Some rows stop early (the mask matters), some run to the end.
    assert 0 < np.sum(mask_RxN[:, -1] == 0) < R
  else:
    assert np.all(mask_RxN == 1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 3, 1.0), (1.3, 0, 0.7), (0.5, 5, 0.9)])
def test_logps_are_those_of_the_transformed_distribution(model, temperature, top_k, top_p):
  graphdef, params, _ = model
  R, P, N = 32, 3, 6
  cfg = sampling.SamplingConfig(
    max_new_tokens=N, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=EOS
  )
  out = sampling.sample(graphdef, params, _prompts(R, P, 3), jax.random.key(4), cfg)
  mask_RxN = np.asarray(out["mask_RxN"])
  expected_RxN, logp_RxNxV = _teacher_logprobs(
    graphdef, params, out["tokens_RxL"], P, temperature, top_k, top_p
  )
  expected_RxN = np.where(mask_RxN > 0, expected_RxN, 0.0)  # -inf after EOS is masked out.
  np.testing.assert_allclose(out["logp_RxN"], expected_RxN, atol=1e-5)
  assert np.all(np.isfinite(expected_RxN))  # Every drawn token is in the truncated support.
  assert np.any(np.isinf(logp_RxNxV))  # ...and truncation did remove tokens.


def _exact_transformed(graphdef, params, prompt_P, steps, temperature, top_k, top_p):
  """log p(y|x) over all V**steps responses (lexicographic): Π_t transformed π(y_t | x, y_<t)."""
  ys_YxT = np.indices((V,) * steps).reshape(steps, -1).T
  tokens_YxL = np.concatenate([np.tile(prompt_P, (len(ys_YxT), 1)), ys_YxT], 1)
  picked_YxT, _ = _teacher_logprobs(
    graphdef, params, jnp.asarray(tokens_YxL), len(prompt_P), temperature, top_k, top_p
  )
  return picked_YxT.sum(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.0, 0, 0.8)])
def test_empirical_distribution_matches_exact(model, temperature, top_k, top_p):
  """TV(empirical of n draws, exact) ≤ ½ Σ_y sqrt(p_y(1−p_y)/n) + sqrt(log(1/δ) / 2n).

  The first term bounds E[TV] (Jensen on each |count/n − p_y|); TV moves by at most 1/n when one
  draw changes, so McDiarmid gives P(TV > E[TV] + t) ≤ exp(−2nt²) = δ; δ = 1e-6 here.
  """
  graphdef, params, _ = model
  prompt_P, steps, n = np.array([3, 1]), 3, 30_000
  exact_Y = _exact_transformed(graphdef, params, prompt_P, steps, temperature, top_k, top_p)
  untransformed_Y = np.asarray(
    exact.prefix_logps(
      lambda t: _next_token_logprobs(graphdef, params, t), prompt_P[None], steps, V
    )[0]
  )
  cfg = sampling.SamplingConfig(
    max_new_tokens=steps, temperature=temperature, top_k=top_k, top_p=top_p
  )
  out = sampling.sample(
    graphdef, params, jnp.tile(jnp.asarray(prompt_P), (n, 1)), jax.random.key(5), cfg
  )
  new_nxT = np.asarray(out["tokens_RxL"])[:, len(prompt_P) :]
  codes_n = new_nxT @ (V ** np.arange(steps)[::-1])  # Lexicographic, as prefix_logps.
  empirical_Y = np.bincount(codes_n, minlength=V**steps) / n
  p_Y = np.exp(exact_Y)
  np.testing.assert_allclose(p_Y.sum(), 1.0, atol=1e-6)
  tv = 0.5 * np.abs(empirical_Y - p_Y).sum()
  bound = 0.5 * np.sum(np.sqrt(p_Y * (1 - p_Y) / n)) + math.sqrt(math.log(1e6) / (2 * n))
  assert tv < bound, (tv, bound)
  # The sampler's own log-prob of each draw is the exact transformed log p(y|x).
  np.testing.assert_allclose(out["logp_RxN"].sum(-1), exact_Y[codes_n], atol=1e-5)
  if (temperature, top_k, top_p) == (1.0, 0, 1.0):
    np.testing.assert_allclose(exact_Y, untransformed_Y, atol=1e-5)
  else:  # The bound is tight enough to tell the transformed target from the plain model.
    assert 0.5 * np.abs(p_Y - np.exp(untransformed_Y)).sum() > 2 * bound


def test_greedy_equals_argmax_of_full_forward(model):
  graphdef, params, _ = model
  prompts_RxP, N = _prompts(4, 3, 6), 5
  cfg = sampling.SamplingConfig(max_new_tokens=N, temperature=0.0, top_k=3, top_p=0.5)
  out = sampling.sample(graphdef, params, prompts_RxP, jax.random.key(7), cfg)
  padded_RxL = np.pad(np.asarray(prompts_RxP), ((0, 0), (0, N)))
  np.testing.assert_array_equal(
    out["tokens_RxL"], _greedy_by_full_forward(graphdef, params, padded_RxL, [3] * 4, N)
  )
  np.testing.assert_array_equal(out["logp_RxN"], 0.0)  # log 1 under the one-hot.
  np.testing.assert_array_equal(out["mask_RxN"], 1.0)


def test_eos_stops_row_pads_and_masks(model):
  """Up to its first EOS a row is the EOS-free run (same keys); after it, pad 0 with mask/logp 0."""
  graphdef, params, _ = model
  R, P, N = 32, 3, 6  # The shapes and configs of the test above: no new compilation.
  prompts_RxP, key = _prompts(R, P, 8), jax.random.key(9)
  with_eos = sampling.sample(
    graphdef, params, prompts_RxP, key, sampling.SamplingConfig(max_new_tokens=N, eos_id=EOS)
  )
  free = sampling.sample(
    graphdef, params, prompts_RxP, key, sampling.SamplingConfig(max_new_tokens=N)
  )
  with_eos, free = jax.device_get(with_eos), jax.device_get(free)
  tokens_RxN, free_RxN = with_eos["tokens_RxL"][:, P:], free["tokens_RxL"][:, P:]
  stopped = 0
  for r in range(R):
    hits = np.flatnonzero(free_RxN[r] == EOS)
    end = hits[0] + 1 if len(hits) else N  # Tokens kept, EOS included.
    stopped += end < N
    np.testing.assert_array_equal(tokens_RxN[r, :end], free_RxN[r, :end])
    np.testing.assert_array_equal(tokens_RxN[r, end:], 0)
    np.testing.assert_array_equal(with_eos["mask_RxN"][r], np.arange(N) < end)
    np.testing.assert_array_equal(with_eos["logp_RxN"][r, end:], 0.0)
    np.testing.assert_allclose(
      with_eos["logp_RxN"][r].sum(), free["logp_RxN"][r, :end].sum(), atol=1e-5
    )
  assert 0 < stopped < R


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_equals_unsharded(model, mesh_shape):
  graphdef, params, names = model
  prompts_RxP, key = _prompts(16, 3, 10), jax.random.key(11)
  cfg = sampling.SamplingConfig(max_new_tokens=5, temperature=0.8, top_k=6, top_p=0.9, eos_id=EOS)
  plain = sampling.sample(graphdef, params, prompts_RxP, key, cfg)
  mesh = sharding.make_mesh(mesh_shape, ("data", "fsdp", "tensor"))
  table = sharding.check_rules(config_lib.base().rules, mesh)
  with jax.set_mesh(mesh), sharding.use_rules(table):
    sharded_params = jax.device_put(params, sharding.tree_shardings(names, mesh, table))
    sharded_prompts = jax.device_put(prompts_RxP, sharding.batch_sharding(mesh, 2))
    out = sampling.sample(graphdef, sharded_params, sharded_prompts, key, cfg)
  rows_per_shard = 16 // (mesh_shape[0] * mesh_shape[1])
  assert out["tokens_RxL"].addressable_shards[0].data.shape[0] == rows_per_shard
  np.testing.assert_array_equal(out["tokens_RxL"], plain["tokens_RxL"])
  np.testing.assert_array_equal(out["mask_RxN"], plain["mask_RxN"])
  np.testing.assert_allclose(out["logp_RxN"], plain["logp_RxN"], atol=1e-5)


def test_left_padded_prompts_sample_as_unpadded(model):
  """Per row, positions count real tokens: greedy and log-probs match the unpadded prompt."""
  graphdef, params, _ = model
  lengths_R, P, N = np.array([3, 1, 2, 3]), 3, 4
  prompt_mask_RxP = (np.arange(P) >= P - lengths_R[:, None]).astype(np.int32)
  prompts_RxP = np.where(prompt_mask_RxP > 0, np.asarray(_prompts(4, P, 12)), 0)  # Pad: 0.
  outs = [
    jax.device_get(
      sampling.sample(
        graphdef,
        params,
        jnp.asarray(prompts_RxP),
        jax.random.key(13),
        sampling.SamplingConfig(max_new_tokens=N, temperature=t),
        prompt_mask_RxP=jnp.asarray(prompt_mask_RxP),
      )
    )
    for t in (0.0, 1.0)
  ]
  # The same rows without padding: real prompt, generated tokens, then zeros at the right.
  unpadded = [np.zeros((4, P + N), np.int32) for _ in outs]
  for r, n in enumerate(lengths_R):
    for out, rows_RxL in zip(outs, unpadded):
      rows_RxL[r, : n + N] = out["tokens_RxL"][r, P - n :]
  greedy_RxL = _greedy_by_full_forward(
    graphdef, params, np.where(np.arange(P + N) < lengths_R[:, None], unpadded[0], 0), lengths_R, N
  )
  np.testing.assert_array_equal(greedy_RxL, unpadded[0])
  teacher_RxT = np.asarray(_token_logps(graphdef, params, jnp.asarray(unpadded[1])))
  teacher_RxN = np.stack([teacher_RxT[r, n - 1 : n - 1 + N] for r, n in enumerate(lengths_R)])
  np.testing.assert_allclose(outs[1]["logp_RxN"], teacher_RxN, atol=1e-5)
