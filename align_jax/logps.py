"""The only code objectives use to run the model: per-sequence log-probabilities.

Log-probs are float32 (float64 for a float64 model), whatever the compute dtype.

Convention: `loss_mask[..., t] = 1` when token t is scored, i.e. log π(tokens[t] | tokens[<t])
enters the sum. Position 0 is never scored (nothing predicts it).
"""

import jax
import jax.numpy as jnp

from align_jax import models


def next_token_logprobs(graphdef, params, tokens_RxL: jax.Array) -> jax.Array:
  """log π(· | tokens[≤t]) for every position t: float32 [R, L, V]."""
  logits_RxLxV, _ = models.apply(graphdef, params, tokens_RxL)
  return jax.nn.log_softmax(logits_RxLxV.astype(models.wide(logits_RxLxV.dtype)), axis=-1)


def token_logps(graphdef, params, tokens_RxL: jax.Array) -> jax.Array:
  """log π(tokens[t] | tokens[<t]) for t = 1..L-1, float32 [R, L-1]."""
  logits_RxLxV, _ = models.apply(graphdef, params, tokens_RxL)
  logits_RxTxV = logits_RxLxV[:, :-1].astype(models.wide(logits_RxLxV.dtype))
  target_RxT = tokens_RxL[:, 1:]
  picked_RxT = jnp.take_along_axis(logits_RxTxV, target_RxT[..., None], axis=-1)[..., 0]
  return picked_RxT - jax.nn.logsumexp(logits_RxTxV, axis=-1)


def sequence_logps(graphdef, params, tokens_BxKxL: jax.Array,
                   loss_mask_BxKxL: jax.Array) -> jax.Array:
  """Σ_t mask[t] · log π(tokens[t] | tokens[<t]) per response: float32 [B, K]."""
  B, K, L = tokens_BxKxL.shape
  tok_logp_RxT = token_logps(graphdef, params, tokens_BxKxL.reshape(B * K, L))
  mask_RxT = loss_mask_BxKxL.reshape(B * K, L)[:, 1:].astype(tok_logp_RxT.dtype)
  return jnp.sum(tok_logp_RxT * mask_RxT, axis=-1).reshape(B, K)


def sequence_scores(graphdef, params, tokens_BxKxL: jax.Array,
                    loss_mask_BxKxL: jax.Array) -> jax.Array:
  """A scoring model's outputs at each response's last scored token: float32 [B, K, O].

  The last scored position has seen the prompt and the whole response (reward models read it).
  """
  B, K, L = tokens_BxKxL.shape
  scores_RxLxO, _ = models.apply(graphdef, params, tokens_BxKxL.reshape(B * K, L))
  mask_RxL = loss_mask_BxKxL.reshape(B * K, L) > 0
  last_R = L - 1 - jnp.argmax(mask_RxL[:, ::-1], axis=1)
  picked_RxO = jnp.take_along_axis(scores_RxLxO, last_R[:, None, None], axis=1)[:, 0]
  return picked_RxO.astype(models.wide(picked_RxO.dtype)).reshape(B, K, -1)
