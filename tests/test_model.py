"""The transformer and sequence_logps: normalisation, the logits/targets shift, cache, remat, GQA."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import logps, models

CFG = models.ModelConfig(**models.preset("tiny"))


@pytest.fixture(scope="module")
def model():
  graphdef, _, _ = models.abstract(CFG)
  return graphdef, models.init_params(CFG, jax.random.key(0))


def test_sequence_logps_normalise_over_continuations(model):
  """Σ over every 2-token continuation of exp(log π) is 1: catches any logits/targets shift."""
  graphdef, params = model
  V = CFG.vocab_size
  prompt = [3, 1, 4]
  conts = np.array(list(itertools.product(range(V), repeat=2)))
  tokens = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], 1)[:, None]  # [R,1,5]
  mask = np.zeros(tokens.shape, np.float32)
  mask[..., 3:] = 1.0
  logp = logps.sequence_logps(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask))
  np.testing.assert_allclose(jax.nn.logsumexp(logp), 0.0, atol=1e-5)


def test_mask_excludes_prompt_and_padding(model):
  graphdef, params = model
  tokens = jnp.array([[[2, 5, 1, 7, 0, 0]]])
  mask = jnp.array([[[0, 0, 1, 1, 0, 0]]], jnp.float32)
  tok = logps.token_logps(graphdef, params, tokens[0])  # log π(t_i | t_<i), i = 1..5
  np.testing.assert_allclose(
    logps.sequence_logps(graphdef, params, tokens, mask)[0, 0], tok[0, 1] + tok[0, 2], rtol=1e-6
  )
  # Changing padding after the response leaves the sequence log-prob unchanged (causality).
  other = tokens.at[..., 4:].set(3)
  np.testing.assert_allclose(
    logps.sequence_logps(graphdef, params, other, mask),
    logps.sequence_logps(graphdef, params, tokens, mask),
    rtol=1e-6,
  )


def test_cached_decoding_equals_full_forward(model):
  graphdef, params = model
  tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, CFG.vocab_size)
  full, _ = models.apply(graphdef, params, tokens)
  cache = models.init_cache(CFG, 3, 7)
  pre, cache = models.apply(graphdef, params, tokens[:, :4], cache=cache, cache_index=0)
  outs = [pre]
  for i in range(4, 7):
    pos = jnp.full((3, 1), i)
    out, cache = models.apply(
      graphdef, params, tokens[:, i : i + 1], positions_RxL=pos, cache=cache, cache_index=i
    )
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


@pytest.mark.parametrize("policy", ["nothing", "dots_no_batch"])
def test_remat_same_gradients_and_actually_remats(model, policy):
  _, params = model
  tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, CFG.vocab_size)
  remat_graphdef, _, _ = models.abstract(dataclasses.replace(CFG, remat=True, remat_policy=policy))
  plain_graphdef, _, _ = models.abstract(CFG)

  def loss(graphdef, p):
    return models.apply(graphdef, p, tokens)[0].astype(jnp.float32).std()

  g_plain = jax.grad(lambda p: loss(plain_graphdef, p))(params)
  g_remat = jax.grad(lambda p: loss(remat_graphdef, p))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_plain, g_remat)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(remat_graphdef, p)))(params))
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  shown = {
    "nothing": "policy=<function nothing_saveable",
    "dots_no_batch": "policy=DotsSaveable(only_if_no_batch_dims=True)",
  }[policy]
  assert shown in jaxpr  # the chosen policy reached the remat
  assert "remat" not in str(jax.make_jaxpr(jax.grad(lambda p: loss(plain_graphdef, p)))(params))


def test_gqa_equals_repeated_kv_heads():
  """n_kv_heads=2 with each KV head shared == n_kv_heads=4 with the heads duplicated."""
  gqa = CFG
  mha = dataclasses.replace(CFG, n_kv_heads=CFG.n_heads)
  g_gqa, _, _ = models.abstract(gqa)
  g_mha, _, _ = models.abstract(mha)
  p = models.init_params(gqa, jax.random.key(3))
  rep = CFG.n_heads // CFG.n_kv_heads
  p_mha = jax.tree.map(lambda x: x, p)
  for layer in p_mha["layers"].values():
    for w in ("wk_DxGxE", "wv_DxGxE"):
      layer["attn"][w] = jnp.repeat(layer["attn"][w], rep, axis=1)
  tokens = jax.random.randint(jax.random.key(4), (2, 5), 0, CFG.vocab_size)
  np.testing.assert_allclose(
    models.apply(g_gqa, p, tokens)[0], models.apply(g_mha, p_mha, tokens)[0], atol=1e-5
  )


def test_tied_embeddings_have_no_unembed_and_use_embedding():
  tied = dataclasses.replace(CFG, tie_embeddings=True)
  graphdef, shapes, names = models.abstract(tied)
  assert "unembed_DxV" not in shapes
  p = models.init_params(tied, jax.random.key(5))
  tokens = jnp.array([[1, 2, 3]])
  base, _ = models.apply(graphdef, p, tokens)
  p2 = dict(p, embed_VxD=p["embed_VxD"].at[4].multiply(2.0))  # token 4 never in the input
  logits, _ = models.apply(graphdef, p2, tokens)
  assert not np.allclose(logits[..., 4], base[..., 4])  # its output logit moved with the embedding
  np.testing.assert_allclose(logits[..., :4], base[..., :4], atol=1e-6)


def test_bfloat16_compute_keeps_float32_logits_and_params():
  bf = dataclasses.replace(CFG, dtype="bfloat16")
  graphdef, shapes, _ = models.abstract(bf)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
  p = models.init_params(bf, jax.random.key(6))
  logits, _ = models.apply(graphdef, p, jnp.array([[1, 2, 3]]))
  assert logits.dtype == jnp.float32
  full, _ = models.apply(models.abstract(CFG)[0], p, jnp.array([[1, 2, 3]]))
  np.testing.assert_allclose(logits, full, atol=0.1)  # bf16 rounding only


def test_every_parameter_has_logical_names_of_its_rank():
  _, shapes, names = models.abstract(CFG)
  for s, n in zip(
    jax.tree.leaves(shapes), jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
  ):
    assert len(s.shape) == len(n)
    assert set(n) <= set(models.transformer.PARAM_AXES)


def test_scoring_head_replaces_unembed_and_is_read_at_each_response_last_token():
  cfg = dataclasses.replace(CFG, num_scores=3)
  graphdef, shapes, names = models.abstract(cfg)
  assert "unembed_DxV" not in shapes and shapes["score_DxO"].shape == (CFG.d_model, 3)
  assert names["score_DxO"] == ("embed", "scores")
  params = models.init_params(cfg, jax.random.key(3))
  tokens = jnp.array([[[2, 5, 1, 7, 0, 0], [2, 5, 3, 0, 0, 0]]])
  mask = jnp.array([[[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]]], jnp.float32)
  out = logps.sequence_scores(graphdef, params, tokens, mask)
  full, _ = models.apply(graphdef, params, tokens[0])
  assert out.shape == (1, 2, 3) and full.shape == (2, 6, 3)
  np.testing.assert_allclose(out[0, 0], full[0, 3], rtol=1e-6)
  np.testing.assert_allclose(out[0, 1], full[1, 2], rtol=1e-6)


def _largest_scores(jaxpr, S) -> int:
  """The largest array of rank >= 4 whose last dim is the S keys in a jaxpr (scores), in elements."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = getattr(var.aval, "shape", ())
      if len(shape) >= 4 and shape[-1] == S:
        largest = max(largest, int(np.prod(shape)))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          largest = max(largest, _largest_scores(getattr(sub, "jaxpr", sub), S))
  return largest


def test_attention_in_query_chunks_equals_whole_attention():
  """23 queries in chunks of 4 (the last padded) with a sliding window, soft-capped scores and
  a KV cache: logits within 1e-6, gradients within 1e-6 of their scale, and the backward pass
  holds one chunk's [R, G, N·4, S] scores, not [R, G, N·23, S]."""
  options = dict(sliding_window=5, sliding_window_pattern=2, attn_softcap=2.0, remat=True)
  whole = dataclasses.replace(CFG, attention_chunk=0, **options)
  chunked = dataclasses.replace(whole, attention_chunk=4)
  (g_whole, shapes, _), g_chunked = models.abstract(whole), models.abstract(chunked)[0]
  params = models.init_params(whole, jax.random.key(7))
  tokens = jax.random.randint(jax.random.key(8), (2, 23), 0, CFG.vocab_size)
  logits = jax.jit(lambda g, p: models.apply(g, p, tokens)[0], static_argnums=0)
  np.testing.assert_allclose(logits(g_chunked, params), logits(g_whole, params), atol=1e-6)
  loss = lambda g: lambda p: jnp.sum(logps.token_logps(g, p, tokens) * jnp.arange(22.0))
  want = jax.jit(jax.grad(loss(g_whole)))(params)
  for a, b in zip(
    jax.tree.leaves(jax.jit(jax.grad(loss(g_chunked)))(params)), jax.tree.leaves(want)
  ):
    np.testing.assert_allclose(a, b, atol=1e-6 * max(1.0, float(np.max(np.abs(b)))), rtol=0)
  # A cached prefill of 9 queries (3 chunks) then one decode step, against the whole forward.
  cache = models.init_cache(chunked, 2, 23)
  pre, cache = models.apply(g_chunked, params, tokens[:, :9], cache=cache)
  step, _ = models.apply(
    g_chunked,
    params,
    tokens[:, 9:10],
    positions_RxL=jnp.full((2, 1), 9),
    cache=cache,
    cache_index=9,
  )
  full = logits(g_whole, params)
  np.testing.assert_allclose(jnp.concatenate([pre, step], 1), full[:, :10], atol=1e-5)
  sizes = {
    c: _largest_scores(jax.make_jaxpr(jax.grad(loss(g)))(shapes).jaxpr, 23)
    for c, g in ((0, g_whole), (4, g_chunked))
  }
  G, N = CFG.n_kv_heads, CFG.n_heads // CFG.n_kv_heads
  assert sizes == {0: 2 * G * N * 23 * 23, 4: 2 * G * N * 4 * 23}
