"""align_jax: aligning language models in JAX, with exact evaluation on a testbed.

Shape legend used in names across the code (`tokens_BxKxL`, `logp_BxK`, ...):

  B  prompts in the batch          D  model width
  K  responses per prompt          F  MLP width
  L  tokens per sequence           H, G, Dh  query heads, KV heads, head dim
  V  vocabulary                    R  rows of a forward pass (B*K, flattened)
  X  testbed prompts               Y  testbed responses per prompt
"""
