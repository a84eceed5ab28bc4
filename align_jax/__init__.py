"""align_jax: aligning language models in JAX, with exact evaluation on a testbed.

Shape legend, one for the whole package: names carry their shapes (`tokens_BxKxL`, `logp_BxK`,
`wq_DxHxE`), one letter per dimension; K (responses) and E (head dim) never share a letter.

  B  prompts in the batch              D  model width
  K  responses per prompt              F  MLP width
  L  tokens per row                    H  query heads
  T  scored positions (L − 1), or a    G  key/value heads
     testbed response's tokens         E  head dim
  P  prompt tokens                     V  vocabulary
  N  new tokens (sampler), or records  O  scoring-model outputs
  R  rows of a forward pass (B·K)      C  rating categories (distributional labels)
  S  KV-cache slots                    X, Y  testbed prompts, testbed responses
  A  layers (stacked parameters)       Q, U  chunks, positions per chunk (long sequences)
"""
