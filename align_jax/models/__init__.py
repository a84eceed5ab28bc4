"""Models: one transformer code path (transformer.py) and its named sizes (presets.py)."""

from align_jax.models.presets import preset
from align_jax.models.transformer import (
  ModelConfig,
  Segments,
  SharedPrompt,
  Transformer,
  abstract,
  apply,
  init_cache,
  init_params,
  stack_layers,
  unembed,
  unstack_layers,
  wide,
)
