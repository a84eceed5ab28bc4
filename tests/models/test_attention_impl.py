"""model.attention_impl: the fused-attention call (jax.nn.dot_product_attention) equals the einsum
path. CPUs have no cuDNN, so the call runs here with jax's XLA implementation of the same
function: what is checked is our side of it (GQA layout, scale, causal / padding / window masks,
shared-prompt and packed rows' masks, the KV cache), on training log-probs and on the sampler
with left-padded prompts; and which calls cuDNN cannot take (they fall back, logged once)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import logps, models, sampling
from align_jax.models import transformer
from conftest import packed_batch

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
  """attention_impl='cudnn' routed to the XLA implementation of dot_product_attention, with
  cuDNN's conditions taken as met (they hold on a GPU in bfloat16); the test must call it."""
  real, calls = jax.nn.dot_product_attention, []

  def xla(*args, implementation=None, **kwargs):
    assert implementation == "cudnn"
    calls.append(1)
    return real(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(transformer.jax.nn, "dot_product_attention", xla)
  monkeypatch.setattr(transformer, "_cudnn_refusal", lambda cfg, L, S, masked: "")
  yield
  assert calls, "the fused call never ran"


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


@pytest.mark.parametrize("layout", ["shared_prompt", "packed"])
def test_block_and_segment_masks_match(fused_on_cpu, layout):
  """The masks of shared-prompt rows and packed rows, handed to the fused call as [R, 1, L, S],
  give the einsum path's log-probs."""
  tokens = np.array(jax.random.randint(jax.random.key(4), (3, 3, 10), 1, CFG.vocab_size))
  tokens[:, 1:, :4] = tokens[:, :1, :4]  # Prompts of 4 tokens, shared by a record's rows.
  mask = np.zeros(tokens.shape, np.float32)
  for b, k, n in [(0, 0, 3), (0, 1, 6), (0, 2, 1), (1, 0, 5), (1, 1, 2), (1, 2, 4), (2, 0, 6)]:
    mask[b, k, 4 : 4 + n] = 1.0
  mask[2, 1:, 4:6] = 1.0
  tokens = np.where(mask.cumsum(-1) == 0, tokens, np.where(mask > 0, tokens, 0))
  shared, packed = (4, None) if layout == "shared_prompt" else (0, _packed(tokens, mask))
  if packed is not None:  # The records in their packed batch's slots.
    tokens, mask = packed.pop("tokens_BxKxL"), packed.pop("loss_mask_BxKxL")
  (g_xla, p), (g_fused, _) = _both(CFG)
  fused = jax.jit(lambda t, m, packed: logps.sequence_logps(g_fused, p, t, m, shared, packed))
  plain = jax.jit(lambda t, m: logps.sequence_logps(g_xla, p, t, m))
  np.testing.assert_allclose(fused(tokens, mask, packed), plain(tokens, mask), rtol=1e-5, atol=1e-5)


def _packed(tokens, mask) -> dict:
  """The records packed two to a row of 32 slots: the rows, and the records' own layout."""
  arrays = {"tokens_KxL": tokens.astype(np.int32), "loss_mask_KxL": mask}
  batch = packed_batch(arrays, shared=True, pack_len=32, pack_records=2, rows=2)
  return {k: batch[k] for k in (*logps.PACKED, "tokens_BxKxL", "loss_mask_BxKxL")}


def test_calls_cudnn_cannot_take_fall_back_with_one_logged_line(monkeypatch, caplog):
  cfg = dataclasses.replace(CFG, attention_impl="cudnn")
  assert "needs a GPU" in transformer._cudnn_refusal(cfg, 8, 8, False)  # This CPU.
  with caplog.at_level("WARNING", logger="absl"):
    assert not transformer._fused_attention(cfg, 8, 8, False)
    assert not transformer._fused_attention(cfg, 8, 8, False)
  assert sum("cuDNN's fused attention needs a GPU" in r.getMessage() for r in caplog.records) == 1
  monkeypatch.setattr(transformer.jax, "default_backend", lambda: "gpu")
  half = dataclasses.replace(cfg, dtype="bfloat16", head_dim=16)
  assert transformer._cudnn_refusal(half, 8, 8, True) == ""
  assert transformer._fused_attention(half, 8, 8, True)
  refusals = {
    "takes bfloat16": (cfg, 8, 8, False),
    "soft-cap": (dataclasses.replace(half, attention_impl="auto", attn_softcap=30.0), 8, 8, False),
    "head dim": (dataclasses.replace(half, head_dim=12), 8, 8, False),
    "even lengths": (half, 7, 9, True),
  }
  for why, args in refusals.items():
    assert why in transformer._cudnn_refusal(*args)
  assert transformer._cudnn_refusal(half, 7, 9, False) == ""  # Plain causal: any length.


def test_softcap_needs_the_einsum_path():
  with pytest.raises(ValueError, match="attn_softcap"):
    dataclasses.replace(CFG, attn_softcap=50.0, attention_impl="cudnn")
  with pytest.raises(ValueError, match="attention_impl"):
    dataclasses.replace(CFG, attention_impl="flash")
