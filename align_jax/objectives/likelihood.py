"""Maximum likelihood (SFT / pretraining) on [B, K] sequences."""

import jax
import jax.numpy as jnp


def sft(logp_BxK: jax.Array, num_tokens_BxK: jax.Array):
  """Negative log-likelihood per scored token, averaged over the K sequences of a prompt.

  Args:
    logp_BxK: summed log-probs of the scored tokens.
    num_tokens_BxK: how many tokens each sum covers (clamped to ≥ 1).

  Returns:
    loss_B = −Σ_k logp / Σ_k tokens, and metrics {nll_per_token, perplexity}.
  """
  n_B = jnp.maximum(jnp.sum(num_tokens_BxK, axis=-1), 1.0)
  nll_B = -jnp.sum(logp_BxK, axis=-1) / n_B
  return nll_B, {"nll_per_token": nll_B, "perplexity": jnp.exp(nll_B)}
