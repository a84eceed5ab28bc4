"""Decoder-only transformer in Flax NNX (Llama family), used functionally.

One code path serves training and sampling: `Transformer.__call__` takes tokens and their
positions, and optionally a KV cache with the slot to write at. Parameters carry logical axis names
(`embed`, `mlp`, `heads`, ...); activations are constrained with `act_*` names through
`sharding.shard`. Shape letters: R rows, L tokens of this call, S cache slots, D width, H query
heads, G KV heads, K head dim, F MLP width, V vocabulary.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from align_jax.sharding import shard

PARAM_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "scores")
ACT_AXES = ("act_batch", "act_len", "act_embed", "act_mlp", "act_heads", "act_kv_heads",
            "act_vocab")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture. Defaults are Llama's choices; other families become options here."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dtype: str = "float32"         # Activation / matmul dtype (bfloat16 on accelerators).
  param_dtype: str = "float32"   # Storage dtype of parameters.
  remat: bool = False            # Recompute each block's activations in the backward pass.
  # 0: a language model (next-token logits over the vocabulary). O > 0: a scoring model (reward
  # models) whose head maps each position's final hidden state to O outputs instead.
  num_scores: int = 0

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model: n_heads={self.n_heads} is not a multiple of "
                       f"n_kv_heads={self.n_kv_heads}")


def wide(dtype) -> jnp.dtype:
  """The dtype of numerically sensitive parts (norms, RoPE, softmax, logits): float32, or float64
  for a float64 model (exact tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def _param(rngs: nnx.Rngs, shape, names, dtype, scale: float | str = "fan_in") -> nnx.Param:
  if scale == "ones":
    value = jnp.ones(shape, dtype)
  else:
    std = shape[0] ** -0.5 if scale == "fan_in" else scale
    value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)).astype(dtype)
  return nnx.Param(value, out_sharding=names)


class RMSNorm(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.scale_D = _param(rngs, (cfg.d_model,), ("norm",), cfg.param_dtype, "ones")
    self.eps = cfg.norm_eps

  def __call__(self, x_RxLxD: jax.Array) -> jax.Array:
    x = x_RxLxD.astype(wide(x_RxLxD.dtype))
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale_D[...].astype(x.dtype)).astype(x_RxLxD.dtype)


def rope(x_RxLxNxK: jax.Array, positions_RxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention (Llama / HF)."""
  half = x_RxLxNxK.shape[-1] // 2
  dt = wide(x_RxLxNxK.dtype)
  inv_freq = theta ** (-jnp.arange(half, dtype=dt) / half)
  angle_RxLxk = positions_RxL[..., None].astype(dt) * inv_freq
  sin, cos = jnp.sin(angle_RxLxk)[:, :, None], jnp.cos(angle_RxLxk)[:, :, None]
  x = x_RxLxNxK.astype(dt)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_RxLxNxK.dtype)


class Attention(nnx.Module):
  """Causal grouped-query attention with an optional KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, H, G, K, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    self.wq_DxHxK = _param(rngs, (D, H, K), ("embed", "heads", "head_dim"), pd)
    self.wk_DxGxK = _param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), pd)
    self.wv_DxGxK = _param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), pd)
    self.wo_HxKxD = _param(rngs, (H, K, D), ("heads", "head_dim", "embed"), pd, (H * K) ** -0.5)
    self.cfg = cfg

  def __call__(self, x_RxLxD, positions_RxL, cache, cache_index, kv_mask_RxS):
    cfg, dt = self.cfg, self.cfg.dtype
    q_RxLxHxK = jnp.einsum("rld,dhk->rlhk", x_RxLxD, self.wq_DxHxK[...].astype(dt))
    k_RxLxGxK = jnp.einsum("rld,dgk->rlgk", x_RxLxD, self.wk_DxGxK[...].astype(dt))
    v_RxLxGxK = jnp.einsum("rld,dgk->rlgk", x_RxLxD, self.wv_DxGxK[...].astype(dt))
    q_RxLxHxK = shard(rope(q_RxLxHxK, positions_RxL, cfg.rope_theta),
                      ("act_batch", "act_len", "act_heads", None))
    k_RxLxGxK = shard(rope(k_RxLxGxK, positions_RxL, cfg.rope_theta),
                      ("act_batch", "act_len", "act_kv_heads", None))
    v_RxLxGxK = shard(v_RxLxGxK, ("act_batch", "act_len", "act_kv_heads", None))

    L = x_RxLxD.shape[1]
    if cache is None:  # Training / scoring: keys are this call's tokens.
      k_RxSxGxK, v_RxSxGxK, new_cache = k_RxLxGxK, v_RxLxGxK, None
    else:              # Sampling: write this call's keys at `cache_index`, attend to the cache.
      k_RxSxGxK = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_RxLxGxK.astype(
          cache["k"].dtype), cache_index, axis=1)
      v_RxSxGxK = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_RxLxGxK.astype(
          cache["v"].dtype), cache_index, axis=1)
      new_cache = {"k": k_RxSxGxK, "v": v_RxSxGxK}
    S = k_RxSxGxK.shape[1]
    q_slot_L = cache_index + jnp.arange(L)
    mask_RxLxS = (jnp.arange(S)[None, :] <= q_slot_L[:, None])[None]
    if kv_mask_RxS is not None:
      mask_RxLxS = mask_RxLxS & kv_mask_RxS[:, None, :]

    G, K = cfg.n_kv_heads, cfg.head_dim
    q_RxLxGxNxK = q_RxLxHxK.reshape(*q_RxLxHxK.shape[:2], G, cfg.n_heads // G, K)
    scores = jnp.einsum("rlgnk,rsgk->rgnls", q_RxLxGxNxK, k_RxSxGxK.astype(dt),
                        preferred_element_type=wide(dt)) * K ** -0.5
    scores = jnp.where(mask_RxLxS[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out_RxLxGxNxK = jnp.einsum("rgnls,rsgk->rlgnk", probs, v_RxSxGxK.astype(dt))
    out_RxLxHxK = out_RxLxGxNxK.reshape(q_RxLxHxK.shape)
    out_RxLxD = jnp.einsum("rlhk,hkd->rld", out_RxLxHxK, self.wo_HxKxD[...].astype(dt))
    return shard(out_RxLxD, ("act_batch", "act_len", "act_embed")), new_cache


class Mlp(nnx.Module):
  """Gated MLP: down(silu(x W_gate) * x W_up) (SwiGLU)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, F, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    self.wgate_DxF = _param(rngs, (D, F), ("embed", "mlp"), pd)
    self.wup_DxF = _param(rngs, (D, F), ("embed", "mlp"), pd)
    self.wdown_FxD = _param(rngs, (F, D), ("mlp", "embed"), pd)
    self.dtype = cfg.dtype

  def __call__(self, x_RxLxD: jax.Array) -> jax.Array:
    dt = self.dtype
    gate_RxLxF = x_RxLxD @ self.wgate_DxF[...].astype(dt)
    up_RxLxF = x_RxLxD @ self.wup_DxF[...].astype(dt)
    h_RxLxF = shard(jax.nn.silu(gate_RxLxF) * up_RxLxF, ("act_batch", "act_len", "act_mlp"))
    return shard(h_RxLxF @ self.wdown_FxD[...].astype(dt), ("act_batch", "act_len", "act_embed"))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_RxLxD, positions_RxL, cache, cache_index, kv_mask_RxS):
    h_RxLxD, new_cache = self.attn(self.attn_norm(x_RxLxD), positions_RxL, cache, cache_index,
                                   kv_mask_RxS)
    x_RxLxD = x_RxLxD + h_RxLxD
    return x_RxLxD + self.mlp(self.mlp_norm(x_RxLxD)), new_cache


class Transformer(nnx.Module):
  """Token ids -> next-token logits (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_VxD = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                            cfg.param_dtype, 1.0)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    if cfg.num_scores:
      self.score_DxO = _param(rngs, (cfg.d_model, cfg.num_scores), ("embed", "scores"),
                              cfg.param_dtype)
    elif not cfg.tie_embeddings:
      self.unembed_DxV = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                cfg.param_dtype)

  def __call__(self, tokens_RxL: jax.Array, positions_RxL: jax.Array | None = None, *,
               cache: list[dict] | None = None, cache_index: jax.Array | int = 0,
               kv_mask_RxS: jax.Array | None = None):
    """Returns (logits_RxLxV float32, new cache or None); a scoring model returns (scores_RxLxO, None).

    Args:
      tokens_RxL: token ids.
      positions_RxL: RoPE positions; defaults to 0..L-1.
      cache: per-layer {"k", "v"} arrays [R, S, G, K] (see `init_cache`), or None.
      cache_index: the cache slot of this call's first token.
      kv_mask_RxS: False for key slots that must not be attended (padding).
    """
    cfg = self.cfg
    if positions_RxL is None:
      positions_RxL = jnp.broadcast_to(jnp.arange(tokens_RxL.shape[1]), tokens_RxL.shape)
    x_RxLxD = self.embed_VxD[...].astype(cfg.dtype)[tokens_RxL]
    x_RxLxD = shard(x_RxLxD, ("act_batch", "act_len", "act_embed"))
    new_cache = []
    for i, block in enumerate(self.layers):
      layer_cache = None if cache is None else cache[i]
      if cfg.remat:
        call = nnx.remat(lambda b, *a: b(*a), prevent_cse=True)
        x_RxLxD, c = call(block, x_RxLxD, positions_RxL, layer_cache, cache_index, kv_mask_RxS)
      else:
        x_RxLxD, c = block(x_RxLxD, positions_RxL, layer_cache, cache_index, kv_mask_RxS)
      new_cache.append(c)
    x_RxLxD = self.final_norm(x_RxLxD)
    if cfg.num_scores:
      return jnp.einsum("rld,do->rlo", x_RxLxD, self.score_DxO[...].astype(cfg.dtype),
                        preferred_element_type=wide(cfg.dtype)), None
    w_DxV = (self.embed_VxD[...].T if cfg.tie_embeddings else self.unembed_DxV[...])
    logits_RxLxV = jnp.einsum("rld,dv->rlv", x_RxLxD, w_DxV.astype(cfg.dtype),
                              preferred_element_type=wide(cfg.dtype))
    logits_RxLxV = shard(logits_RxLxV, ("act_batch", "act_len", "act_vocab"))
    return logits_RxLxV, (None if cache is None else new_cache)


def init_cache(cfg: ModelConfig, rows: int, slots: int) -> list[dict]:
  """An empty KV cache: per layer {"k", "v"} of shape [rows, slots, G, K] in the compute dtype."""
  shape = (rows, slots, cfg.n_kv_heads, cfg.head_dim)
  return [{"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
          for _ in range(cfg.n_layers)]


def _build(cfg: ModelConfig, seed: int) -> Transformer:
  with nnx.use_eager_sharding(False):  # Sharding is applied by the caller's jit out_shardings.
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: ModelConfig):
  """(graphdef, shapes, logical names) of the model, without allocating parameters."""
  static = {}

  def build():  # Traced by jax.eval_shape; the graph and names are static and captured.
    graphdef, state = nnx.split(_build(cfg, 0))
    names = jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), state,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))
    static.update(graphdef=graphdef, names=nnx.to_pure_dict(names))
    return nnx.to_pure_dict(state)

  shapes = jax.eval_shape(build)
  return static["graphdef"], shapes, static["names"]


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """Fresh parameters as a plain nested dict (jit this with out_shardings to create them sharded)."""
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(params=key))
  return nnx.to_pure_dict(nnx.state(model))


def apply(graphdef, params: dict, tokens_RxL: jax.Array, **kwargs):
  """Runs the model given as (graphdef, params); see Transformer.__call__."""
  return nnx.merge(graphdef, params)(tokens_RxL, **kwargs)
