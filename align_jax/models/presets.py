"""Named model sizes. A config picks one with `model=<name>` and may override any field.

Presets are for fresh initialisation and benchmarks. The real-model presets carry the published
architecture of each checkpoint (`family` names its Hugging Face class). A Hugging Face
`--config.init_checkpoint=/path/to/hf_dir` brings its own architecture (config.json,
align_jax/models/hf.py): the fresh-init presets (FRESH, every config's default) yield to it; any
other preset must agree with it (`hf.model_config`).
"""

import dataclasses

import ml_collections as mlc

from align_jax.models.transformer import ModelConfig
from align_jax.errors import ConfigError

# Real models: bf16 compute, fp32 parameters, layers scanned (one compiled body).
_BF16 = dict(dtype="bfloat16", param_dtype="float32", scan_layers=True)
_LLAMA3 = dict(
  family="llama",
  rope_theta=500_000.0,
  norm_eps=1e-5,
  rope_scaling="llama3",
  rope_low_freq_factor=1.0,
  rope_high_freq_factor=4.0,
  rope_original_max_len=8192,
  max_positions=131_072,
  **_BF16,
)
_GEMMA = dict(
  norm_plus_one=True, mlp_act="gelu_tanh", embed_scale=True, tie_embeddings=True, **_BF16
)
_GEMMA2 = dict(
  _GEMMA,
  family="gemma2",
  post_norms=True,
  query_pre_attn_scalar=256.0,
  attn_softcap=50.0,
  final_softcap=30.0,
  sliding_window=4096,
  sliding_window_pattern=2,
  max_positions=8192,
  vocab_size=256_000,
)
_GEMMA3 = dict(
  _GEMMA,
  family="gemma3",
  post_norms=True,
  qk_norm=True,
  query_pre_attn_scalar=256.0,
  rope_theta=1_000_000.0,
  rope_local_theta=10_000.0,
  sliding_window_pattern=6,
)
_QWEN = dict(rope_theta=1_000_000.0, tie_embeddings=True, vocab_size=151_936, **_BF16)
_GPT2 = dict(
  family="gpt2",
  vocab_size=50_257,
  head_dim=64,
  norm="layer",
  norm_eps=1e-5,
  qkv_bias=True,
  out_bias=True,
  mlp_bias=True,
  mlp_act="gelu_tanh",
  gated_mlp=False,
  positions="learned",
  max_positions=1024,
  tie_embeddings=True,
  **_BF16,
)

PRESETS = {
  # The testbed's base LM over ToyLang's 8 tokens.
  "testbed": dict(
    vocab_size=8, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=192
  ),
  # For unit tests and smoke runs.
  "tiny": dict(
    vocab_size=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64
  ),
  # A ~1.2B Llama-3.2-1B-shaped model for accelerator benchmarks (tied embeddings).
  "llama_1b": dict(
    vocab_size=128_256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    rope_theta=500_000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
    **_BF16,
  ),
  # Llama 3.2 1B / 3B, Llama 3.1 8B / 70B.
  "llama3_1b": dict(
    _LLAMA3,
    vocab_size=128_256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    rope_factor=32.0,
    tie_embeddings=True,
  ),
  "llama3_3b": dict(
    _LLAMA3,
    vocab_size=128_256,
    d_model=3072,
    n_layers=28,
    n_heads=24,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=8192,
    rope_factor=32.0,
    tie_embeddings=True,
  ),
  "llama3_8b": dict(
    _LLAMA3,
    vocab_size=128_256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=14_336,
    rope_factor=8.0,
  ),
  "llama3_70b": dict(
    _LLAMA3,
    vocab_size=128_256,
    d_model=8192,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=28_672,
    rope_factor=8.0,
  ),
  # Gemma 2 2B / 9B.
  "gemma2_2b": dict(
    _GEMMA2, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, mlp_dim=9216
  ),
  "gemma2_9b": dict(
    _GEMMA2, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, head_dim=256, mlp_dim=14_336
  ),
  # Gemma 3 1B (text), 4B (its language model; global layers' RoPE scaled linearly by 8).
  "gemma3_1b": dict(
    _GEMMA3,
    vocab_size=262_144,
    d_model=1152,
    n_layers=26,
    n_heads=4,
    n_kv_heads=1,
    head_dim=256,
    mlp_dim=6912,
    sliding_window=512,
    max_positions=32_768,
  ),
  "gemma3_4b": dict(
    _GEMMA3,
    vocab_size=262_208,
    d_model=2560,
    n_layers=34,
    n_heads=8,
    n_kv_heads=4,
    head_dim=256,
    mlp_dim=10_240,
    sliding_window=1024,
    rope_scaling="linear",
    rope_factor=8.0,
    max_positions=131_072,
  ),
  # Qwen2.5 0.5B / 1.5B (QKV biases), Qwen3 0.6B / 1.7B (QK-norm).
  "qwen2_0.5b": dict(
    _QWEN,
    family="qwen2",
    qkv_bias=True,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    head_dim=64,
    mlp_dim=4864,
    max_positions=32_768,
  ),
  "qwen2_1.5b": dict(
    _QWEN,
    family="qwen2",
    qkv_bias=True,
    d_model=1536,
    n_layers=28,
    n_heads=12,
    n_kv_heads=2,
    head_dim=128,
    mlp_dim=8960,
    max_positions=32_768,
  ),
  "qwen3_0.6b": dict(
    _QWEN,
    family="qwen3",
    qk_norm=True,
    d_model=1024,
    n_layers=28,
    n_heads=16,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=3072,
    max_positions=40_960,
  ),
  "qwen3_1.7b": dict(
    _QWEN,
    family="qwen3",
    qk_norm=True,
    d_model=2048,
    n_layers=28,
    n_heads=16,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=6144,
    max_positions=40_960,
  ),
  # GPT-2 small / medium.
  "gpt2": dict(_GPT2, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, mlp_dim=3072),
  "gpt2_medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, mlp_dim=4096),
}

# Presets for fresh initialisation (the testbed's base LM, unit tests and smoke runs): a Hugging
# Face init_checkpoint's config.json replaces them.
FRESH = ("testbed", "tiny")

# Every ModelConfig field with a default, so each preset's ConfigDict has all of them.
_DEFAULTS = {
  f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING
}


def preset(name: str) -> mlc.ConfigDict:
  """The ConfigDict of a preset, every ModelConfig field present so overrides type-check."""
  if name not in PRESETS:
    raise ConfigError(f"model preset {name!r} is unknown; known: {sorted(PRESETS)}")
  return mlc.ConfigDict({**_DEFAULTS, **PRESETS[name]})


def fresh(name: str) -> dict | None:
  """The fields of `name` if it is a fresh-init preset (they yield to a Hugging Face checkpoint),
  else None ('' = a hand-built model section, or a real-model preset: every field is asked for)."""
  return {**_DEFAULTS, **PRESETS[name]} if name in FRESH else None
