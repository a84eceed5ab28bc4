"""Jitted batched sampling: one prefill of the prompts, then a `lax.while_loop` of one-token decode
steps with a KV cache, with temperature, top-k, top-p, EOS and a token budget. It returns the
tokens, the log-prob of every generated token under the distribution it was actually drawn from
(after the temperature / top-k / top-p transformation and renormalisation; so at temperature 1
without truncation they equal the teacher-forced `logps.token_logps` of the same tokens), and a
mask of the generated tokens. Everything is pure jax on arrays (no host syncs, no Python loop over
tokens), so rows may be sharded over the mesh's batch axes. Shape letters: R rows, P prompt
tokens, N new tokens, L = P + N, S cache slots (= L), V vocabulary.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax import models
from align_jax.sharding import shard


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample; hashable, so it is a static argument of the jitted `sample`.

  Built from the run config with `SamplingConfig(**cfg.sampling)`.

  Attributes:
    max_new_tokens: N, tokens generated per row (fewer are unmasked when EOS comes first).
    temperature: T ≥ 0; logits are divided by T. T = 0 is greedy decoding (first argmax on ties).
    top_k: keep the k most probable tokens (0 = all). Ties: every token as probable as the
      k-th is kept, so more than k may survive.
    top_p: nucleus mass in (0, 1]; keep the smallest set of most probable tokens whose mass is
      ≥ top_p (the top token always survives). Ties: every token as probable as the least
      probable kept one is kept too. 1 = no truncation.
    eos_id: end-of-sequence token, or -1 for none. The EOS token itself is unmasked.
    pad_id: the token written after EOS (those positions have mask 0 and log-prob 0).
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int = -1
  pad_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k={self.top_k} must be >= 0 (0 = no top-k)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")


def _renormalise(logp_RxV: jax.Array, keep_RxV: jax.Array) -> jax.Array:
  """log of p restricted to `keep` and renormalised; -inf outside `keep`."""
  masked_RxV = jnp.where(keep_RxV, logp_RxV, -jnp.inf)
  return masked_RxV - jax.nn.logsumexp(masked_RxV, axis=-1, keepdims=True)


def transform_logits(
  logits_RxV: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
  """Log-probs of the distribution the sampler draws from, float32 [R, V].

  In order: q = softmax(logits / T); top-k keeps the k largest q (ties at the k-th value all
  kept) and renormalises; top-p sorts the result in decreasing order and keeps token j iff the
  mass strictly before it is < top_p (the smallest prefix with mass ≥ top_p; ties with the
  least probable kept token all kept) and renormalises. Masked tokens get -inf. T = 0 gives the
  greedy one-hot: 0 on the first argmax, -inf elsewhere (top-k/top-p then change nothing).

  Args:
    logits_RxV: next-token logits.
    temperature: T ≥ 0 (a Python number: it selects the code path).
    top_k: 0 or the number of tokens kept.
    top_p: nucleus mass in (0, 1].

  Returns:
    logp_RxV with logsumexp 0 over V in every row.

  Example: q = [.5, .2, .2, .1] with top_k=2 or top_p=0.6 both keep [.5, .2, .2] (tie) and give
  [5/9, 2/9, 2/9, 0]; top_p=0.4 keeps only the top token.
  """
  logits_RxV = logits_RxV.astype(jnp.float32)
  V = logits_RxV.shape[-1]
  if temperature == 0:
    best_R = jnp.argmax(logits_RxV, axis=-1)
    return jnp.where(jnp.arange(V) == best_R[:, None], 0.0, -jnp.inf)
  logp_RxV = jax.nn.log_softmax(logits_RxV / temperature, axis=-1)
  if 0 < top_k < V:
    kth_Rx1 = jax.lax.top_k(logp_RxV, top_k)[0][:, -1:]
    logp_RxV = _renormalise(logp_RxV, logp_RxV >= kth_Rx1)
  if top_p < 1.0:
    sorted_RxV = -jnp.sort(-logp_RxV, axis=-1)  # Decreasing.
    mass_RxV = jnp.exp(sorted_RxV)
    before_RxV = jnp.cumsum(mass_RxV, axis=-1) - mass_RxV  # Mass strictly before; 0 for the top.
    least_kept_Rx1 = jnp.min(
      jnp.where(before_RxV < top_p, sorted_RxV, jnp.inf), axis=-1, keepdims=True
    )
    logp_RxV = _renormalise(logp_RxV, logp_RxV >= least_kept_Rx1)
  return logp_RxV


def _shard_cache(cache: list[dict] | dict) -> list[dict] | dict:
  """Cache [R, S, G, K] (stacked: [A, R, S, G, K]): rows over the batch axes, KV heads over
  tensor (as attention computes)."""
  names = ("act_batch", None, "act_kv_heads", None)
  return jax.tree.map(lambda x: shard(x, (None,) * (x.ndim - 4) + names), cache)


def _prefill(graphdef, params, prompts_BxP, prompt_mask_BxP, N: int, samples: int):
  """One forward over each prompt into a KV cache of P + N slots, then each prompt's cache, last
  logits, next position and key mask repeated for its `samples` rows (rows b·n .. b·n + n − 1):
  (cache, logits_RxV, next_position_R, kv_mask_RxS or None)."""
  B, P = prompts_BxP.shape
  if prompt_mask_BxP is None:
    positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    next_position_B = jnp.full((B,), P, jnp.int32)
    kv_mask_BxS = None
  else:
    real_BxP = prompt_mask_BxP.astype(bool)
    count_BxP = jnp.cumsum(real_BxP, axis=1, dtype=jnp.int32)
    positions_BxP = jnp.maximum(count_BxP - 1, 0)
    next_position_B = count_BxP[:, -1]
    kv_mask_BxS = jnp.concatenate([real_BxP, jnp.ones((B, N), bool)], axis=1)
  model = nnx.merge(graphdef, params)
  cache = _shard_cache(models.init_cache(model.cfg, B, P + N))
  # The prefill needs the logits of the prompt's last position only (not [B, P, V]).
  x_BxPxD, cache = model.hidden(
    prompts_BxP, positions_BxP, cache=cache, cache_index=0, kv_mask_RxS=kv_mask_BxS
  )
  logits_BxV = models.unembed(model.cfg, x_BxPxD[:, -1:], model.unembed_weight())[:, 0]
  repeat = functools.partial(jnp.repeat, repeats=samples, total_repeat_length=B * samples)
  cache = _shard_cache(jax.tree.map(lambda x: repeat(x, axis=x.ndim - 4), cache))
  kv_mask_RxS = None if kv_mask_BxS is None else repeat(kv_mask_BxS, axis=0)
  return cache, repeat(logits_BxV, axis=0), repeat(next_position_B, axis=0), kv_mask_RxS


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "samples"))
def sample(
  graphdef,
  params: dict,
  prompts_RxP: jax.Array,
  rng: jax.Array,
  cfg: SamplingConfig,
  prompt_mask_RxP: jax.Array | None = None,
  samples: int = 1,
) -> dict[str, jax.Array]:
  """Samples N = cfg.max_new_tokens tokens after each prompt, `samples` times per prompt.

  Step i draws token i of every row from `transform_logits` of the model's next-token logits with
  the key `fold_in(rng, i)`; a row stops at its first EOS (later tokens are `cfg.pad_id`, masked).
  The loop exits early once every row has stopped. Jitted with `graphdef` and `cfg` static; under
  `jax.set_mesh` and `sharding.use_rules`, rows follow the sharding of `prompts_RxP`.

  Args:
    graphdef: the model's graph definition (from `models.abstract`).
    params: the model's parameters.
    prompts_RxP: int prompt tokens, all rows of one length P ≥ 1.
    rng: a PRNG key.
    cfg: the sampling settings.
    prompt_mask_RxP: optional, for left-padded prompts: 1 on real tokens, 0 on padding at the
      left (each row needs ≥ 1 real token). RoPE positions then count real tokens per row, so a
      row samples as if it had no padding.
    samples: n rows per prompt from one prefill: the prompts' KV cache and last logits are
      computed once and repeated (the rows of `jnp.repeat(prompts_RxP, n, axis=0)`, drawn as
      they would be from those rows).

  Returns (R below counts the output rows, n per prompt):
    "tokens_RxL": int32 prompts followed by the generated tokens, L = P + N.
    "logp_RxN": float32 log-prob of each generated token under the transformed distribution it
      was drawn from; 0 where the mask is 0. Column n scores token P + n, i.e. column P - 1 + n
      of `logps.token_logps` (the rollout's sample_token_logp_BxKxT uses that layout).
    "mask_RxN": float32, 1 for generated tokens up to and including the first EOS, 0 after.
  """
  P, N = prompts_RxP.shape[1], cfg.max_new_tokens
  prompts_BxP = prompts_RxP.astype(jnp.int32)  # B prompts; R = n·B rows out.
  cache, logits_RxV, next_position_R, kv_mask_RxS = _prefill(
    graphdef, params, prompts_BxP, prompt_mask_RxP, N, samples
  )
  prompts_RxP = jnp.repeat(prompts_BxP, samples, axis=0)
  R = prompts_RxP.shape[0]

  def step(carry):
    i, cache, logits_RxV, tokens_RxN, logp_RxN, mask_RxN, done_R = carry
    logp_RxV = transform_logits(logits_RxV, cfg.temperature, cfg.top_k, cfg.top_p)
    token_R = jax.random.categorical(jax.random.fold_in(rng, i), logp_RxV, axis=-1)
    token_logp_R = jnp.take_along_axis(logp_RxV, token_R[:, None], axis=-1)[:, 0]
    token_R = jnp.where(done_R, cfg.pad_id, token_R).astype(jnp.int32)
    token_logp_R = jnp.where(done_R, 0.0, token_logp_R)
    tokens_RxN = jax.lax.dynamic_update_slice_in_dim(tokens_RxN, token_R[:, None], i, axis=1)
    logp_RxN = jax.lax.dynamic_update_slice_in_dim(logp_RxN, token_logp_R[:, None], i, axis=1)
    alive_Rx1 = (~done_R).astype(jnp.float32)[:, None]
    mask_RxN = jax.lax.dynamic_update_slice_in_dim(mask_RxN, alive_Rx1, i, axis=1)
    if cfg.eos_id >= 0:
      done_R = done_R | (token_R == cfg.eos_id)
    # The next step's logits; the last step computes one it does not use.
    logits_Rx1xV, cache = models.apply(
      graphdef,
      params,
      token_R[:, None],
      positions_RxL=(next_position_R + i)[:, None],
      cache=cache,
      cache_index=P + i,
      kv_mask_RxS=kv_mask_RxS,
    )
    return (i + 1, _shard_cache(cache), logits_Rx1xV[:, 0], tokens_RxN, logp_RxN, mask_RxN, done_R)

  def keep_going(carry):
    i, done_R = carry[0], carry[-1]
    return (i < N) & ~jnp.all(done_R)

  init = (
    jnp.int32(0),
    cache,
    logits_RxV.astype(jnp.float32),
    shard(jnp.full((R, N), cfg.pad_id, jnp.int32), ("act_batch", None)),
    shard(jnp.zeros((R, N), jnp.float32), ("act_batch", None)),
    shard(jnp.zeros((R, N), jnp.float32), ("act_batch", None)),
    jnp.zeros((R,), bool),
  )
  _, _, _, tokens_RxN, logp_RxN, mask_RxN, _ = jax.lax.while_loop(keep_going, step, init)
  return {
    "tokens_RxL": jnp.concatenate([prompts_RxP, tokens_RxN], axis=1),
    "logp_RxN": logp_RxN,
    "mask_RxN": mask_RxN,
  }
