"""The only code objectives use to run the model: per-token and per-sequence log-probabilities.

Log-probs are float32 (float64 for a float64 model), whatever the compute dtype.

Convention: `loss_mask[..., t] = 1` when token t is scored, i.e. log π(tokens[t] | tokens[<t])
enters the sum. Position 0 is never scored (nothing predicts it).

Two granularities (DESIGN.md §9): token log-probs `[B, K, T]`, T = L - 1, where position t is
log π(tokens[t + 1] | tokens[≤t]) and its mask is `loss_mask[..., 1:]`; and sequence log-probs
`[B, K]`, their sum under that mask. Distillation objectives take the whole next-token
distributions `[B, K, T, V]` at the same positions.

Token log-probs never hold the [R, T, V] float32 logits of a long sequence at once: with
`model.logits_chunk = U` and T > U, the final hidden states are cut into Q = ⌈T/U⌉ chunks of U
positions (the rows stay sharded as they are) and `lax.map` computes each chunk's logits, its
log-normaliser and the picked entry,

    log π(y_t | y_<t) = z_t[y_t] − logsumexp_v z_t[v],   z_t = softcap(h_t · W)   (W: [D, V]),

under `jax.checkpoint`, so the backward pass recomputes a chunk's logits instead of storing them
(the memory of one chunk, [R, U, V], instead of Q of them; the recomputation costs one more
R·T·D·V matmul, as in MaxText's vocabulary tiling and Liger's fused cross-entropy).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax import models
from align_jax.sharding import shard


# A packed batch's rows (R of S slots; align_jax/data/packing.py) and each record's gather index.
PACKED = (
  "pack_tokens_BxS",
  "pack_positions_BxS",
  "pack_segment_BxS",
  "pack_branch_BxS",
  "pack_prev_BxS",
  "pack_index_BxKxT",
)


def next_token_logprobs(graphdef, params, tokens_RxL: jax.Array) -> jax.Array:
  """log π(· | tokens[≤t]) for every position t: float32 [R, L, V]."""
  logits_RxLxV, _ = models.apply(graphdef, params, tokens_RxL)
  return jax.nn.log_softmax(logits_RxLxV.astype(models.wide(logits_RxLxV.dtype)), axis=-1)


def token_logps(graphdef, params, tokens_RxL: jax.Array) -> jax.Array:
  """log π(tokens[t] | tokens[<t]) for t = 1..L-1, float32 [R, L-1]; in chunks of
  `model.logits_chunk` positions when L - 1 is longer (module docstring)."""
  model = nnx.merge(graphdef, params)
  if not model.cfg.logits_chunk or tokens_RxL.shape[1] - 1 <= model.cfg.logits_chunk:
    logits_RxLxV, _ = model(tokens_RxL)
    return _picked(logits_RxLxV[:, :-1], tokens_RxL[:, 1:])
  x_RxLxD, _ = model.hidden(tokens_RxL)
  return _hidden_logps(model, x_RxLxD[:, :-1], tokens_RxL[:, 1:])


def _hidden_logps(model, x_RxTxD: jax.Array, target_RxT: jax.Array) -> jax.Array:
  """log softmax(softcap(x·W))[target] from final hidden states, in chunks of
  `model.logits_chunk` positions when T is longer."""
  w_DxV, chunk = model.unembed_weight(), model.cfg.logits_chunk
  if chunk and x_RxTxD.shape[1] > chunk:
    return chunked_token_logps(model.cfg, x_RxTxD, w_DxV, target_RxT)
  return _picked(models.unembed(model.cfg, x_RxTxD, w_DxV), target_RxT)


def _picked(logits_RxTxV: jax.Array, target_RxT: jax.Array) -> jax.Array:
  """z[y_t] − logsumexp(z) per position, in the wide dtype."""
  logits_RxTxV = logits_RxTxV.astype(models.wide(logits_RxTxV.dtype))
  picked_RxT = jnp.take_along_axis(logits_RxTxV, target_RxT[..., None], axis=-1)[..., 0]
  return picked_RxT - jax.nn.logsumexp(logits_RxTxV, axis=-1)


def chunked_token_logps(
  cfg: models.ModelConfig, x_RxTxD: jax.Array, w_DxV: jax.Array, target_RxT: jax.Array
) -> jax.Array:
  """log softmax(softcap(x·W))[target] per position, cfg.logits_chunk positions at a time, each
  chunk's logits recomputed in the backward pass (module docstring): float32 [R, T]."""
  R, T, D = x_RxTxD.shape
  U = cfg.logits_chunk
  Q = math.ceil(T / U)
  pad = Q * U - T  # The last chunk is padded (target 0) and its padding dropped.
  x_QxRxUxD = jnp.pad(x_RxTxD, ((0, 0), (0, pad), (0, 0))).reshape(R, Q, U, D).swapaxes(0, 1)
  target_QxRxU = jnp.pad(target_RxT, ((0, 0), (0, pad))).reshape(R, Q, U).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(xs):
    x_RxUxD, target_RxU = xs
    x_RxUxD = shard(x_RxUxD, ("act_batch", "act_len", "act_embed"))
    return _picked(models.unembed(cfg, x_RxUxD, w_DxV), target_RxU)

  logp_QxRxU = jax.lax.map(one_chunk, (x_QxRxUxD, target_QxRxU))
  return logp_QxRxU.swapaxes(0, 1).reshape(R, Q * U)[:, :T]


def token_logps_BxK(
  graphdef,
  params,
  tokens_BxKxL: jax.Array,
  loss_mask_BxKxL: jax.Array,
  shared_prompt: int = 0,
  packed: dict | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probs of every response and the mask of the scored ones.

  Args:
    graphdef: the model's graph definition.
    params: the model's parameters.
    tokens_BxKxL: int tokens, K responses per example.
    loss_mask_BxKxL: 1 where token t is scored (see the module docstring).
    shared_prompt: 0, or a lower bound on every example's prompt length: its K responses are
      then scored in one shared-prompt row (`shared_token_logps_BxK`; the same values).
    packed: the batch's packed rows (`PACKED` fields), which hold these records:
      the model runs on them instead (`packed_token_logps_BxK`; the same values).

  Returns:
    logp_BxKxT: float32, T = L - 1; position t is log π(tokens[t + 1] | tokens[≤t]), whatever
      the mask (objectives must weight it by the mask).
    mask_BxKxT: `loss_mask_BxKxL[..., 1:]` in the dtype of logp_BxKxT.
  """
  B, K, L = tokens_BxKxL.shape
  if packed:
    logp_BxKxT = packed_token_logps_BxK(graphdef, params, packed, K)
  elif shared_prompt and K > 1:
    logp_BxKxT = shared_token_logps_BxK(
      graphdef, params, tokens_BxKxL, loss_mask_BxKxL, shared_prompt
    )
  else:
    logp_RxT = token_logps(graphdef, params, tokens_BxKxL.reshape(B * K, L))
    logp_BxKxT = logp_RxT.reshape(B, K, L - 1)
  return logp_BxKxT, loss_mask_BxKxL[..., 1:].astype(logp_BxKxT.dtype)


def shared_rows(
  tokens_BxKxL: jax.Array, loss_mask_BxKxL: jax.Array, lo: int
) -> tuple[jax.Array, jax.Array, models.SharedPrompt]:
  """The K responses of each example in one row `[prompt | r_1 | r_2 | … | r_K]`.

  Example b's prompt is its first p_b tokens, p_b the first position any response scores
  (at least `lo`, a static lower bound on every prompt's length); its K rows share them. The
  row is row 1 as it is (L tokens: prompt, response 1, padding) followed, for k = 2..K, by the
  W = L − lo tokens tokens[b, k, p_b : p_b + W] (the slots past L − p_b are padding):
  S = L + (K − 1)·W slots instead of K·L.

  Returns:
    row_BxS: the tokens; positions_BxS: each token's position in its own unshared row (response
    k continues from the prompt's end); the `models.SharedPrompt` layout the model's attention
    takes (each response sees the prompt and its own past only).
  """
  B, K, L = tokens_BxKxL.shape
  W = L - lo
  first_B = jnp.argmax(jnp.any(loss_mask_BxKxL > 0, axis=1), axis=-1)
  start_B = jnp.maximum(first_B, lo).astype(jnp.int32)
  source_BxW = jnp.minimum(start_B[:, None] + jnp.arange(W)[None], L - 1)  # Padding: clipped.
  rest_BxKxW = jnp.take_along_axis(tokens_BxKxL[:, 1:], source_BxW[:, None], axis=2)
  row_BxS = jnp.concatenate([tokens_BxKxL[:, 0], rest_BxKxW.reshape(B, -1)], axis=1)
  positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
  positions_BxS = jnp.concatenate([positions_BxL, jnp.tile(source_BxW, (1, K - 1))], axis=1)
  return row_BxS, positions_BxS, models.SharedPrompt(start_B, L, W)


def shared_token_logps_BxK(
  graphdef, params, tokens_BxKxL: jax.Array, loss_mask_BxKxL: jax.Array, lo: int
) -> jax.Array:
  """`token_logps_BxK`'s log-probs [B, K, L − 1] from one shared-prompt row per example
  (`shared_rows`): the prompt is run once, not K times, and each response attends to the prompt
  and its own past only, at its own positions, so every entry equals the unshared row's (the
  prompt's entries are the first row's for every k; the prompt's last position predicts each
  response's first token from its one hidden state)."""
  B, K, L = tokens_BxKxL.shape
  W = L - lo
  row_BxS, positions_BxS, layout = shared_rows(tokens_BxKxL, loss_mask_BxKxL, lo)
  start_B = layout.start_R
  model = nnx.merge(graphdef, params)
  x_BxSxD, _ = model.hidden(row_BxS, positions_BxS, kv_mask_RxS=layout)
  # Each slot predicts the next token of its own branch (a block's last slot: a dummy 0).
  blocks = [
    jnp.pad(row_BxS[:, L + k * W + 1 : L + (k + 1) * W], ((0, 0), (0, 1))) for k in range(K - 1)
  ]
  next_BxS = jnp.concatenate([row_BxS[:, 1:L], jnp.zeros((B, 1), row_BxS.dtype), *blocks], axis=1)
  logp_BxS = _hidden_logps(model, x_BxSxD, next_BxS)
  # The prompt's last slot predicts every response's first token.
  end_Bx1xD = jnp.take_along_axis(x_BxSxD, (start_B - 1)[:, None, None], axis=1)
  logits_Bx1xV = models.unembed(model.cfg, end_Bx1xD, model.unembed_weight())
  first_BxK = jnp.take_along_axis(tokens_BxKxL, start_B[:, None, None], axis=2)[..., 0]
  first_BxK = _picked(jnp.broadcast_to(logits_Bx1xV, (B, K, logits_Bx1xV.shape[-1])), first_BxK)
  # Entry (k, t) of the unshared layout: the first row's slot t (the prompt, and response 1),
  # or response k's slot t − p_b of its block.
  t_1x1xT, k_1xKx1 = jnp.arange(L - 1)[None, None], jnp.arange(K)[None, :, None]
  offset_Bx1xT = t_1x1xT - start_B[:, None, None]
  in_block_BxKxT = (k_1xKx1 > 0) & (offset_Bx1xT >= 0)
  slot_BxKxT = jnp.where(in_block_BxKxT, L + (k_1xKx1 - 1) * W + offset_Bx1xT, t_1x1xT)
  logp_BxKxT = jnp.take_along_axis(logp_BxS[:, None], slot_BxKxT, axis=2)
  at_end_BxKxT = (k_1xKx1 > 0) & (offset_Bx1xT == -1)
  return jnp.where(at_end_BxKxT, first_BxK[..., None], logp_BxKxT)


def packed_token_logps_BxK(graphdef, params, packed: dict, K: int) -> jax.Array:
  """`token_logps_BxK`'s log-probs [B, K, T] of records packed in rows (align_jax/data/packing.py):
  the model runs once over the rows (attention within a record and its branch, `models.Segments`),
  each slot's token is scored from its predecessor's hidden state (`pack_prev_BxS`: the previous
  slot, or for a response's first token the shared prompt's last), and `pack_index_BxKxT` gathers
  record b's entries from its row, b // (B / R). Unscored entries are arbitrary."""
  tokens_RxS, index_BxKxT = packed["pack_tokens_BxS"], packed["pack_index_BxKxT"]
  R, (B, _, T) = tokens_RxS.shape[0], index_BxKxT.shape
  layout = models.Segments(packed["pack_segment_BxS"], packed["pack_branch_BxS"])
  model = nnx.merge(graphdef, params)
  x_RxSxD, _ = model.hidden(tokens_RxS, packed["pack_positions_BxS"], kv_mask_RxS=layout)
  prev_RxSxD = jnp.take_along_axis(x_RxSxD, packed["pack_prev_BxS"][..., None], axis=1)
  logp_RxS = _hidden_logps(model, prev_RxSxD, tokens_RxS)
  logp_RxN = jnp.take_along_axis(logp_RxS, index_BxKxT.reshape(R, -1), axis=1)
  return logp_RxN.reshape(B, K, T)


def next_token_logprobs_BxK(graphdef, params, tokens_BxKxL: jax.Array) -> jax.Array:
  """The whole next-token distribution at every scored position: float32 [B, K, T, V], T = L - 1;
  position t is log π(· | tokens[≤t]), the layout of `token_logps_BxK` (whose entries are these
  at tokens[t + 1])."""
  B, K, L = tokens_BxKxL.shape
  logp_RxLxV = next_token_logprobs(graphdef, params, tokens_BxKxL.reshape(B * K, L))
  return logp_RxLxV[:, :-1].reshape(B, K, L - 1, -1)


def sum_tokens(logp_BxKxT: jax.Array, mask_BxKxT: jax.Array) -> jax.Array:
  """Σ_t mask[t] · logp[t]: token log-probs to sequence log-probs [B, K] (`sequence_logps`)."""
  return jnp.sum(logp_BxKxT * mask_BxKxT, axis=-1)


def sequence_logps(
  graphdef,
  params,
  tokens_BxKxL: jax.Array,
  loss_mask_BxKxL: jax.Array,
  shared_prompt: int = 0,
  packed: dict | None = None,
) -> jax.Array:
  """Σ_t mask[t] · log π(tokens[t] | tokens[<t]) per response: float32 [B, K]
  (`shared_prompt` and `packed` as in `token_logps_BxK`)."""
  return sum_tokens(
    *token_logps_BxK(graphdef, params, tokens_BxKxL, loss_mask_BxKxL, shared_prompt, packed)
  )


def sequence_scores(
  graphdef, params, tokens_BxKxL: jax.Array, loss_mask_BxKxL: jax.Array
) -> jax.Array:
  """A scoring model's outputs at each response's last scored token: float32 [B, K, O].

  The last scored position has seen the prompt and the whole response (reward models read it).
  """
  B, K, L = tokens_BxKxL.shape
  scores_RxLxO, _ = models.apply(graphdef, params, tokens_BxKxL.reshape(B * K, L))
  mask_RxL = loss_mask_BxKxL.reshape(B * K, L) > 0
  last_R = L - 1 - jnp.argmax(mask_RxL[:, ::-1], axis=1)
  picked_RxO = jnp.take_along_axis(scores_RxLxO, last_R[:, None, None], axis=1)[:, 0]
  return picked_RxO.astype(models.wide(picked_RxO.dtype)).reshape(B, K, -1)


AGREEMENT_BAND = (0.999, 1.002)  # MLPerf's trainer/sampler probability-ratio band (PEERS-2026-12).


def agreement(
  logp_BxKxT: jax.Array, sample_logp_BxKxT: jax.Array, mask_BxKxT: jax.Array
) -> dict[str, jax.Array]:
  """How far the trainer's token log-probs are from the sampler's, over the masked tokens.

  Returns scalars: `max_abs_logp_diff` and `mean_abs_logp_diff` of |log π_trainer − log π_sampler|,
  and `ratio_outside_band`, the share of tokens whose ratio π_trainer/π_sampler lies outside
  `AGREEMENT_BAND` [0.999, 1.002]. No gradient flows.
  """
  diff_BxKxT = jax.lax.stop_gradient(logp_BxKxT - sample_logp_BxKxT)
  on_BxKxT = mask_BxKxT > 0
  count = jnp.maximum(jnp.sum(on_BxKxT), 1)
  abs_BxKxT = jnp.where(on_BxKxT, jnp.abs(diff_BxKxT), 0.0)
  ratio_BxKxT = jnp.exp(diff_BxKxT)
  outside_BxKxT = on_BxKxT & ((ratio_BxKxT < AGREEMENT_BAND[0]) | (ratio_BxKxT > AGREEMENT_BAND[1]))
  return {
    "max_abs_logp_diff": jnp.max(abs_BxKxT),
    "mean_abs_logp_diff": jnp.sum(abs_BxKxT) / count,
    "ratio_outside_band": jnp.sum(outside_BxKxT) / count,
  }
