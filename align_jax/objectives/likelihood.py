"""Maximum likelihood (SFT / pretraining) on [B, K] sequences, and the scored-token count."""

import jax
import jax.numpy as jnp


def sft(logp_BxK: jax.Array, num_tokens_BxK: jax.Array):
  """Negative log-likelihood per scored token, averaged over the K sequences of a prompt.

  Args:
    logp_BxK: summed log-probs of the scored tokens.
    num_tokens_BxK: how many tokens each sum covers (clamped to ≥ 1).

  Returns:
    loss_B = −Σ_k logp / Σ_k tokens, and metrics {nll_per_token, perplexity}.

  Examples:
    >>> loss, _ = sft(jnp.array([[-6., -2.]]), jnp.array([[3., 1.]]))
    >>> print(f"{loss[0]:.1f}")   # 8 nats over 4 tokens
    2.0
  """
  n_B = jnp.maximum(jnp.sum(num_tokens_BxK, axis=-1), 1.0)
  nll_B = -jnp.sum(logp_BxK, axis=-1) / n_B
  return nll_B, {"nll_per_token": nll_B, "perplexity": jnp.exp(nll_B)}


def num_tokens(batch: dict) -> jax.Array:
  """Scored tokens per response, [B, K] float32: the loss mask after the first position.

  Position 0 of a sequence is never predicted, so it is never scored; the length-normalised
  objectives (IPO per token, LN-DPO, SimPO, ORPO, PRO) divide by this count.

  Examples:
    >>> print(num_tokens({"loss_mask_BxKxL": jnp.array([[[0, 0, 1, 1], [0, 1, 1, 0]]])}))
    [[2. 2.]]
  """
  return batch["loss_mask_BxKxL"][..., 1:].astype(jnp.float32).sum(-1)


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).


def sft_objective(logp_BxK: jax.Array, batch: dict, stats: dict):
  """`sft` on a corpus batch: the token-mean NLL of its K sequences per row."""
  return (*sft(logp_BxK, num_tokens(batch)), stats)
