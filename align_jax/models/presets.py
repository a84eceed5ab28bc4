"""Named model sizes. A config picks one with `model=<name>` and may override any field."""

import ml_collections as mlc

PRESETS = {
    # The testbed's base LM over ToyLang's 8 tokens.
    "testbed": dict(vocab_size=8, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                    mlp_dim=192),
    # For unit tests and smoke runs.
    "tiny": dict(vocab_size=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 mlp_dim=64),
    # A ~1.2B Llama-3.2-1B-shaped model for accelerator benchmarks (tied embeddings).
    "llama_1b": dict(vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     head_dim=64, mlp_dim=8192, rope_theta=500_000.0, norm_eps=1e-5,
                     tie_embeddings=True, dtype="bfloat16", param_dtype="float32"),
}

_DEFAULTS = dict(rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=False, dtype="float32",
                 param_dtype="float32", remat=False, num_scores=0)


def preset(name: str) -> mlc.ConfigDict:
  """The ConfigDict of a preset, every ModelConfig field present so overrides type-check."""
  if name not in PRESETS:
    raise ValueError(f"model preset {name!r} is unknown; known: {sorted(PRESETS)}")
  return mlc.ConfigDict({**_DEFAULTS, **PRESETS[name]})
