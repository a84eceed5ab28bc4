"""model.attention_impl: the fused-attention call (jax.nn.dot_product_attention) equals the einsum
path. CPUs have no cuDNN, so the call runs here with jax's XLA implementation of the same
function: what is checked is our side of it (GQA layout, scale, causal / padding / window masks,
the KV cache), on training log-probs and on the sampler with left-padded prompts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import logps, models, sampling
from align_jax.models import transformer

CFG = models.ModelConfig(
  vocab_size=40,
  d_model=32,
  n_layers=1,
  n_heads=4,
  n_kv_heads=2,
  head_dim=8,
  mlp_dim=48,
  query_pre_attn_scalar=12.0,
)


@pytest.fixture
def fused_on_cpu(monkeypatch):
  """attention_impl='cudnn' routed to the XLA implementation of dot_product_attention."""
  real = jax.nn.dot_product_attention

  def xla(*args, implementation=None, **kwargs):
    assert implementation == "cudnn"
    return real(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(transformer.jax.nn, "dot_product_attention", xla)


def _both(cfg):
  fused = dataclasses.replace(cfg, attention_impl="cudnn")
  params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
  return [(models.abstract(c)[0], params) for c in (cfg, fused)]


@pytest.mark.parametrize("window", [0, 3])
def test_training_logps_match(fused_on_cpu, window):
  cfg = dataclasses.replace(CFG, sliding_window=window)
  tokens = jax.random.randint(jax.random.key(1), (3, 2, 9), 0, CFG.vocab_size)
  mask = jnp.ones(tokens.shape, jnp.float32)
  (g_xla, p), (g_fused, _) = _both(cfg)
  forward = jax.jit(logps.sequence_logps, static_argnums=0)
  np.testing.assert_allclose(
    forward(g_fused, p, tokens, mask), forward(g_xla, p, tokens, mask), rtol=1e-5, atol=1e-5
  )


def test_sampler_with_cache_and_left_padding_matches(fused_on_cpu):
  prompts = jax.random.randint(jax.random.key(2), (4, 5), 1, CFG.vocab_size)
  prompt_mask = jnp.array([[1] * 5, [0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [1] * 5])
  (g_xla, p), (g_fused, _) = _both(CFG)
  cfg = sampling.SamplingConfig(max_new_tokens=6)
  a, b = (
    sampling.sample(g, p, prompts, jax.random.key(3), cfg, prompt_mask_RxP=prompt_mask)
    for g in (g_xla, g_fused)
  )
  np.testing.assert_array_equal(a["tokens_RxL"], b["tokens_RxL"])
  np.testing.assert_allclose(a["logp_RxN"], b["logp_RxN"], rtol=1e-5, atol=1e-5)


def test_softcap_needs_the_einsum_path():
  with pytest.raises(ValueError, match="attn_softcap"):
    dataclasses.replace(CFG, attn_softcap=50.0, attention_impl="auto")
  with pytest.raises(ValueError, match="attention_impl"):
    dataclasses.replace(CFG, attention_impl="flash")
