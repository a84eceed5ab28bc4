"""Decoder-only transformer in Flax NNX, used functionally; one code path for every family.

Llama is the default; Gemma 1/2/3, Qwen2/2.5/3, Mistral, Phi-3 and GPT-2 are options of
`ModelConfig` (norm kind, MLP activation and gating, biases, QK-norm, learned positions, embedding
scaling, soft-capping, sandwich norms, sliding-window layers, RoPE scaling), so every family
trains, scores and samples through the same modules. `Transformer.__call__` takes tokens and their
positions, and optionally a KV cache with the slot to write at. Parameters carry logical axis names (`embed`, `mlp`, `heads`,
...); activations are constrained with `act_*` names through `sharding.shard`. Shape letters: R
rows, L tokens of this call (of `pos_embed_LxD`: the learned positions), S cache slots, D width, H
query heads, G KV heads, E head dim, F MLP width, V vocabulary, A layers; Q chunks of U
positions (log-probs and attention over long sequences).

Layers are unrolled (`params["layers"][i]`, one compiled body per layer) or, with
`scan_layers`, stacked: every block parameter has a leading layer axis A (logical name `layers`,
`params["layers"]["attn"]["wq_DxHxE"]` is [A, D, H, E]) and one compiled body runs under
`jax.lax.scan`, remat inside it; a layer's sliding window and RoPE are a scanned per-layer flag.
`stack_layers` / `unstack_layers` convert one layout's parameters into the other's.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from align_jax.sharding import shard
from align_jax.errors import ConfigError

PARAM_AXES = (
  "layers",
  "vocab",
  "embed",
  "mlp",
  "heads",
  "kv_heads",
  "head_dim",
  "norm",
  "scores",
  "positions",
  "bias",
)
ACT_AXES = (
  "act_batch",
  "act_len",
  "act_embed",
  "act_mlp",
  "act_heads",
  "act_kv_heads",
  "act_vocab",
)
FAMILIES = ("llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "gpt2", "mistral", "phi3")
ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


# What a remat block keeps from its forward pass (the rest is recomputed in the backward pass):
# nothing (least memory), dots (every matmul output), dots_no_batch (matmuls without batch
# dimensions, i.e. the projections, not attention's score/value products), everything (no remat).
REMAT_POLICIES = {
  "nothing": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture. Defaults are Llama's choices; the other families are options here.

  `family` names the Hugging Face architecture the parameters correspond to (import / export,
  `models/hf.py`); the computation is decided by the fields alone.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  family: str = "llama"  # One of FAMILIES.
  rope_theta: float = 10_000.0
  # RoPE of the global (non-sliding) layers: "" (none), "linear" (Gemma 3) or "llama3" (Llama 3.1+)
  # frequency scaling by rope_factor; llama3 also uses the next three fields. "longrope" (Phi-3's
  # su / LongRoPE): frequency i divided by rope_short_factor[i], or rope_long_factor[i] in a call
  # whose last position is beyond rope_original_max_len, and cos / sin times rope_attention_factor.
  rope_scaling: str = ""
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  rope_short_factor: tuple[float, ...] = ()
  rope_long_factor: tuple[float, ...] = ()
  rope_attention_factor: float = 1.0
  # Sliding-window layers' own RoPE base, unscaled (Gemma 3); 0: the global layers' RoPE.
  rope_local_theta: float = 0.0
  norm_eps: float = 1e-6
  norm: str = "rms"  # rms | layer (LayerNorm with a bias: GPT-2).
  norm_plus_one: bool = False  # RMSNorm scales by (1 + w) (Gemma); w is stored as HF stores it.
  post_norms: bool = False  # Sandwich norms on the attention and MLP outputs (Gemma 2/3).
  qk_norm: bool = False  # RMSNorm over each query / key head (Qwen3, Gemma 3).
  qkv_bias: bool = False  # Biases on the q, k, v projections (Qwen2, GPT-2).
  out_bias: bool = False  # Bias on the attention output projection (GPT-2).
  mlp_bias: bool = False  # Biases in the MLP (GPT-2).
  mlp_act: str = "silu"  # silu | gelu_tanh | gelu (erf).
  gated_mlp: bool = True  # down(act(x W_gate) * x W_up); False: down(act(x W_up)) (GPT-2).
  embed_scale: bool = False  # Token embeddings times sqrt(D) in the compute dtype (Gemma).
  positions: str = "rope"  # rope | learned (GPT-2: max_positions rows added to the input).
  max_positions: int = 0  # Longest sequence (HF max_position_embeddings; learned rows).
  query_pre_attn_scalar: float = 0.0  # Scores scaled by this ** -0.5 (Gemma 2/3); 0: head_dim.
  attn_softcap: float = 0.0  # Scores -> c·tanh(scores / c) before masking (Gemma 2); 0: off.
  final_softcap: float = 0.0  # Logits -> c·tanh(logits / c) (Gemma 2); 0: off.
  # Local attention to the last sliding_window tokens (0: none); with sliding_window_pattern P > 0
  # layer i is global when (i + 1) % P == 0 (Gemma 2: 2, Gemma 3: 6); P = 0: every layer is local.
  sliding_window: int = 0
  sliding_window_pattern: int = 0
  # Any other pattern (Qwen's layer_types): the 0-based layers that are local; () = the pattern's.
  window_layers: tuple[int, ...] = ()
  tie_embeddings: bool = False
  dtype: str = "float32"  # Activation / matmul dtype (bfloat16 on accelerators).
  param_dtype: str = "float32"  # Storage dtype of parameters.
  remat: bool = False  # Recompute each block's activations in the backward pass ...
  remat_policy: str = "nothing"  # ... except what the policy saves: REMAT_POLICIES.
  # Attention kernel: xla (the einsums below, every backend), cudnn (jax.nn.dot_product_attention's
  # fused cuDNN kernel: GPUs, bf16/fp16, no attn_softcap) or auto (cudnn where it applies). A call
  # cuDNN cannot take (`_cudnn_refusal`) runs the einsums, with one logged line.
  attention_impl: str = "xla"
  # Einsum attention (attention_impl xla) over the queries in chunks of this many positions, each
  # chunk's [R, H, chunk, S] scores recomputed in the backward pass rather than stored; 0: all.
  attention_chunk: int = 512
  # One compiled layer body scanned over stacked parameters (see the module docstring); False:
  # one body per layer (small models, where the layout is params["layers"][i]).
  scan_layers: bool = False
  # Token log-probs (logps.py) from the final hidden states in chunks of this many positions, each
  # chunk's [R, chunk, V] logits recomputed in the backward pass rather than stored; 0: all at once.
  logits_chunk: int = 512
  # 0: a language model (next-token logits over the vocabulary). O > 0: a scoring model (reward
  # models) whose head maps each position's final hidden state to O outputs instead.
  num_scores: int = 0

  def __post_init__(self):
    for key in ("window_layers", "rope_short_factor", "rope_long_factor"):  # JSON gives lists.
      object.__setattr__(self, key, tuple(getattr(self, key)))
    if self.rope_scaling == "longrope" and not (
      len(self.rope_short_factor) == len(self.rope_long_factor) == self.head_dim // 2
    ):
      raise ConfigError(
        f"model.rope_scaling='longrope' needs head_dim/2 = {self.head_dim // 2} short and long "
        f"factors; got {len(self.rope_short_factor)} and {len(self.rope_long_factor)}"
      )
    if any(not 0 <= i < self.n_layers for i in self.window_layers):
      raise ConfigError(f"model.window_layers={self.window_layers}: layers are 0..n_layers-1")
    if self.n_heads % self.n_kv_heads:
      raise ConfigError(
        f"model: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
      )
    choices = {
      "family": FAMILIES,
      "norm": ("rms", "layer"),
      "mlp_act": tuple(ACTIVATIONS),
      "positions": ("rope", "learned"),
      "rope_scaling": ("", "linear", "llama3", "longrope"),
      "attention_impl": ("xla", "cudnn", "auto"),
      "remat_policy": tuple(REMAT_POLICIES),
    }
    for key, allowed in choices.items():
      if getattr(self, key) not in allowed:
        raise ConfigError(f"model.{key}={getattr(self, key)!r} is unknown; known: {list(allowed)}")
    if self.positions == "learned" and self.max_positions < 1:
      raise ConfigError("model.positions='learned' needs model.max_positions >= 1")
    for key in ("logits_chunk", "attention_chunk"):
      if getattr(self, key) < 0:
        raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0 (0: no chunks)")
    if self.sliding_window < 0 or self.sliding_window_pattern < 0:
      raise ConfigError("model.sliding_window and model.sliding_window_pattern must be >= 0")
    if self.attention_impl == "cudnn" and self.attn_softcap:
      raise ConfigError(
        "model.attn_softcap needs model.attention_impl='xla' (the fused kernel "
        "has no score soft-capping)"
      )

  def is_local(self, layer: int) -> bool:
    """Whether layer `layer` (0-based) attends within the sliding window."""
    if self.window_layers:
      return self.sliding_window > 0 and layer in self.window_layers
    P = self.sliding_window_pattern
    return self.sliding_window > 0 and not (P and (layer + 1) % P == 0)


def wide(dtype) -> jnp.dtype:
  """The dtype of numerically sensitive parts (norms, RoPE, softmax, logits): float32, or float64
  for a float64 model (exact tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def _param(rngs: nnx.Rngs, shape, names, dtype, scale: float | str = "fan_in") -> nnx.Param:
  if scale in ("ones", "zeros"):
    value = (jnp.ones if scale == "ones" else jnp.zeros)(shape, dtype)
  else:
    std = shape[0] ** -0.5 if scale == "fan_in" else scale
    value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)).astype(dtype)
  return nnx.Param(value, out_sharding=names)


def normalize(
  cfg: ModelConfig,
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array | None = None,
  kind: str | None = None,
) -> jax.Array:
  """RMSNorm (scale w, or 1 + w for Gemma) or LayerNorm (scale and bias) over the last axis, in the
  wide dtype, cast back (Gemma's order: (x̂ · w) is rounded once)."""
  kind = kind or cfg.norm
  x32 = x.astype(wide(x.dtype))
  if kind == "layer":
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
  w = scale.astype(x32.dtype)
  out = x32 * (1 + w if cfg.norm_plus_one else w)
  if bias is not None:
    out = out + bias.astype(x32.dtype)
  return out.astype(x.dtype)


class Norm(nnx.Module):
  """The normalisation over D: RMSNorm (LayerNorm with a bias when cfg.norm == "layer")."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    init = "zeros" if cfg.norm_plus_one else "ones"
    self.scale_D = _param(rngs, (cfg.d_model,), ("norm",), cfg.param_dtype, init)
    if cfg.norm == "layer":
      self.bias_D = _param(rngs, (cfg.d_model,), ("norm",), cfg.param_dtype, "zeros")
    self.cfg = cfg

  def __call__(self, x_RxLxD: jax.Array) -> jax.Array:
    bias = self.bias_D[...] if self.cfg.norm == "layer" else None
    return normalize(self.cfg, x_RxLxD, self.scale_D[...], bias)


class HeadNorm(nnx.Module):
  """QK-norm: RMSNorm over each head's E features (Qwen3, Gemma 3)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    init = "zeros" if cfg.norm_plus_one else "ones"
    self.scale_E = _param(rngs, (cfg.head_dim,), ("head_dim",), cfg.param_dtype, init)
    self.cfg = cfg

  def __call__(self, x_RxLxHxE: jax.Array) -> jax.Array:
    return normalize(self.cfg, x_RxLxHxE, self.scale_E[...], kind="rms")


def rope_frequencies(
  cfg: ModelConfig, local: bool, dtype, positions_RxL: jax.Array | None = None
) -> jax.Array:
  """Inverse frequencies [E/2] of a layer's RoPE, with the global layers' scaling (HF's rules).

  longrope picks its long factors when the call's last position (max over `positions_RxL`) is
  beyond rope_original_max_len, as transformers' dynamic update does per forward pass."""
  half = cfg.head_dim // 2
  if local and cfg.rope_local_theta:
    return cfg.rope_local_theta ** (-jnp.arange(half, dtype=dtype) / half)
  inv_freq_k = cfg.rope_theta ** (-jnp.arange(half, dtype=dtype) / half)
  if cfg.rope_scaling == "longrope":
    long = jnp.max(positions_RxL) + 1 > cfg.rope_original_max_len
    factor_k = jnp.where(
      long, jnp.asarray(cfg.rope_long_factor, dtype), jnp.asarray(cfg.rope_short_factor, dtype)
    )
    return inv_freq_k / factor_k
  if cfg.rope_scaling == "linear":
    return inv_freq_k / cfg.rope_factor
  if cfg.rope_scaling == "llama3":  # Long wavelengths / factor, short kept, smooth in between.
    wavelen_k = 2 * math.pi / inv_freq_k
    low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    smooth_k = (cfg.rope_original_max_len / wavelen_k - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    smoothed_k = (1 - smooth_k) * inv_freq_k / cfg.rope_factor + smooth_k * inv_freq_k
    scaled_k = jnp.where(wavelen_k > low_wavelen, inv_freq_k / cfg.rope_factor, inv_freq_k)
    medium_k = (wavelen_k >= high_wavelen) & (wavelen_k <= low_wavelen)
    return jnp.where(medium_k, smoothed_k, scaled_k)
  return inv_freq_k


def rope(
  x_RxLxHxE: jax.Array, positions_RxL: jax.Array, inv_freq_k: jax.Array, scale: float = 1.0
) -> jax.Array:
  """Rotary embedding, rotate-half convention (Llama / HF); cos and sin times `scale`."""
  half = x_RxLxHxE.shape[-1] // 2
  dt = wide(x_RxLxHxE.dtype)
  angle_RxLxk = positions_RxL[..., None].astype(dt) * inv_freq_k.astype(dt)
  sin, cos = (scale * f(angle_RxLxk)[:, :, None] for f in (jnp.sin, jnp.cos))
  x = x_RxLxHxE.astype(dt)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_RxLxHxE.dtype)


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap · tanh(x / cap) (Gemma 2's soft-capping); the identity for cap = 0."""
  return cap * jnp.tanh(x / cap) if cap else x


def _fused_attention(cfg: ModelConfig, L: int, S: int, masked: bool) -> bool:
  """Whether an attention call of L queries over S keys runs through cuDNN's fused kernel
  (model.attention_impl); where cuDNN cannot take it, the einsum path, logged once per reason."""
  if cfg.attention_impl == "xla":
    return False
  if cfg.attention_impl == "auto" and jax.default_backend() != "gpu":
    return False
  why = _cudnn_refusal(cfg, L, S, masked)
  if why:
    _log_fallback(cfg.attention_impl, why)
  return not why


def _cudnn_refusal(cfg: ModelConfig, L: int, S: int, masked: bool) -> str:
  """Why cuDNN's fused attention (jax.nn.dot_product_attention, implementation='cudnn') cannot
  take this call, or '': it runs on GPUs, in bfloat16/float16, with head dims up to 256 in
  multiples of 8, without score soft-caps, and with a mask (given to it as a bias) only for even
  lengths."""
  if jax.default_backend() != "gpu":
    return f"needs a GPU (the backend is {jax.default_backend()})"
  if cfg.dtype not in ("bfloat16", "float16"):
    return f"takes bfloat16 or float16 (model.dtype={cfg.dtype})"
  if cfg.attn_softcap:
    return f"has no score soft-cap (model.attn_softcap={cfg.attn_softcap})"
  if cfg.head_dim > 256 or cfg.head_dim % 8:
    return f"needs a head dim <= 256 and a multiple of 8 (model.head_dim={cfg.head_dim})"
  if masked and (L % 2 or S % 2):
    return f"takes a mask only with even lengths ({L} queries, {S} keys)"
  return ""


@functools.cache
def _log_fallback(impl: str, why: str) -> None:
  logging.warning("model.attention_impl=%s: cuDNN's fused attention %s; the einsum path", impl, why)


class Attention(nnx.Module):
  """Causal grouped-query attention with an optional KV cache; `local`: in the sliding window
  (None: the caller passes each call's flag, a traced bool in a scan over layers)."""

  def __init__(self, cfg: ModelConfig, local: bool | None = False, *, rngs: nnx.Rngs):
    D, H, G, E, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    self.wq_DxHxE = _param(rngs, (D, H, E), ("embed", "heads", "head_dim"), pd)
    self.wk_DxGxE = _param(rngs, (D, G, E), ("embed", "kv_heads", "head_dim"), pd)
    self.wv_DxGxE = _param(rngs, (D, G, E), ("embed", "kv_heads", "head_dim"), pd)
    self.wo_HxExD = _param(rngs, (H, E, D), ("heads", "head_dim", "embed"), pd, (H * E) ** -0.5)
    if cfg.qkv_bias:
      self.bq_HxE = _param(rngs, (H, E), ("heads", "head_dim"), pd, "zeros")
      self.bk_GxE = _param(rngs, (G, E), ("kv_heads", "head_dim"), pd, "zeros")
      self.bv_GxE = _param(rngs, (G, E), ("kv_heads", "head_dim"), pd, "zeros")
    if cfg.out_bias:
      self.bo_D = _param(rngs, (D,), ("bias",), pd, "zeros")
    if cfg.qk_norm:
      self.q_norm = HeadNorm(cfg, rngs=rngs)
      self.k_norm = HeadNorm(cfg, rngs=rngs)
    self.cfg = cfg
    self.local = local

  def _project(self, x_RxLxD, w, b):
    dt = self.cfg.dtype
    out = jnp.einsum("rld,dnk->rlnk", x_RxLxD, w[...].astype(dt))
    return out if b is None else out + b[...].astype(dt)

  def __call__(self, x_RxLxD, positions_RxL, cache, cache_index, kv_mask_RxS, local=None):
    cfg, dt = self.cfg, self.cfg.dtype
    local = self.local if local is None else local  # A Python bool, or a traced one (scan).
    static = isinstance(local, bool)
    # The window applies to local layers; a traced flag selects it per layer below.
    window = cfg.sliding_window if (local if static else True) else 0
    bias = cfg.qkv_bias
    q_RxLxHxE = self._project(x_RxLxD, self.wq_DxHxE, self.bq_HxE if bias else None)
    k_RxLxGxE = self._project(x_RxLxD, self.wk_DxGxE, self.bk_GxE if bias else None)
    v_RxLxGxE = self._project(x_RxLxD, self.wv_DxGxE, self.bv_GxE if bias else None)
    if cfg.qk_norm:
      q_RxLxHxE, k_RxLxGxE = self.q_norm(q_RxLxHxE), self.k_norm(k_RxLxGxE)
    if cfg.positions == "rope":
      args = (wide(dt), positions_RxL)
      if static:
        inv_freq_k = rope_frequencies(cfg, local, *args)
      else:
        inv_freq_k = jnp.where(
          local, rope_frequencies(cfg, True, *args), rope_frequencies(cfg, False, *args)
        )
      scale = cfg.rope_attention_factor if cfg.rope_scaling == "longrope" else 1.0
      q_RxLxHxE = rope(q_RxLxHxE, positions_RxL, inv_freq_k, scale)
      k_RxLxGxE = rope(k_RxLxGxE, positions_RxL, inv_freq_k, scale)
    q_RxLxHxE = shard(q_RxLxHxE, ("act_batch", "act_len", "act_heads", None))
    k_RxLxGxE = shard(k_RxLxGxE, ("act_batch", "act_len", "act_kv_heads", None))
    v_RxLxGxE = shard(v_RxLxGxE, ("act_batch", "act_len", "act_kv_heads", None))

    L = x_RxLxD.shape[1]
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def in_window(distance):  # Of a query from a key; layers without a window: everything.
      if not window:
        return True
      return distance < window if static else (distance < window) | ~local

    if isinstance(kv_mask_RxS, SharedPrompt):  # Training on shared-prompt rows.
      out_RxLxHxE = _shared_prompt_attention(
        cfg, kv_mask_RxS, q_RxLxHxE, k_RxLxGxE, v_RxLxGxE, positions_RxL, in_window, scale
      )
      new_cache = None
    elif isinstance(kv_mask_RxS, Segments):  # Training on packed rows.
      mask_RxLxL = kv_mask_RxS.mask(positions_RxL, in_window)
      out_RxLxHxE = _attention(cfg, q_RxLxHxE, k_RxLxGxE, v_RxLxGxE, mask_RxLxL, scale)
      new_cache = None
    else:
      if cache is None:  # Training / scoring: keys are this call's tokens.
        k_RxSxGxE, v_RxSxGxE, new_cache = k_RxLxGxE, v_RxLxGxE, None
      else:  # Sampling: write this call's keys at `cache_index`, attend to the cache.
        k_RxSxGxE = jax.lax.dynamic_update_slice_in_dim(
          cache["k"], k_RxLxGxE.astype(cache["k"].dtype), cache_index, axis=1
        )
        v_RxSxGxE = jax.lax.dynamic_update_slice_in_dim(
          cache["v"], v_RxLxGxE.astype(cache["v"].dtype), cache_index, axis=1
        )
        new_cache = {"k": k_RxSxGxE, "v": v_RxSxGxE}
      S = k_RxSxGxE.shape[1]
      q_slot_L = cache_index + jnp.arange(L)
      mask_RxLxS = (jnp.arange(S)[None, :] <= q_slot_L[:, None])[None]
      # Slots, like HF's cache positions (left padding is masked and contiguous).
      mask_RxLxS = mask_RxLxS & in_window(q_slot_L[:, None] - jnp.arange(S)[None, :])
      if kv_mask_RxS is not None:
        mask_RxLxS = mask_RxLxS & kv_mask_RxS[:, None, :]
      # Plain causal training passes no mask, so a fused kernel skips the upper triangle.
      plain = cache is None and kv_mask_RxS is None and not window
      out_RxLxHxE = _attention(
        cfg, q_RxLxHxE, k_RxSxGxE, v_RxSxGxE, None if plain else mask_RxLxS, scale
      )
    out_RxLxD = jnp.einsum("rlhk,hkd->rld", out_RxLxHxE, self.wo_HxExD[...].astype(dt))
    if cfg.out_bias:
      out_RxLxD = out_RxLxD + self.bo_D[...].astype(dt)
    return shard(out_RxLxD, ("act_batch", "act_len", "act_embed")), new_cache


def _attention(cfg, q_RxLxHxE, k_RxSxGxE, v_RxSxGxE, mask_RxLxS, scale):
  """Attention through the fused kernel or the einsum path (in query chunks when
  model.attention_chunk is set); mask None: plain causal."""
  L, S = q_RxLxHxE.shape[1], k_RxSxGxE.shape[1]
  if _fused_attention(cfg, L, S, mask_RxLxS is not None):
    return _library_attention(cfg, q_RxLxHxE, k_RxSxGxE, v_RxSxGxE, mask_RxLxS, scale, "cudnn")
  if mask_RxLxS is None:
    mask_RxLxS = (jnp.arange(S)[None, :] <= jnp.arange(L)[:, None])[None]
  attend = functools.partial(_attend, cfg, k_RxSxGxE=k_RxSxGxE, v_RxSxGxE=v_RxSxGxE, scale=scale)
  if cfg.attention_chunk and L > cfg.attention_chunk:
    return _query_chunks(attend, cfg.attention_chunk, q_RxLxHxE, mask_RxLxS)
  return attend(q_RxLxHxE, mask_RxLxS)


def _library_attention(cfg, q_RxLxHxE, k_RxSxGxE, v_RxSxGxE, mask_RxLxS, scale, implementation):
  """`jax.nn.dot_product_attention` with this model's mask (None: plain causal), one [L, S] mask
  per row broadcast over the heads; implementation cudnn on GPUs (xla: the same call in XLA, which
  tests compare with the einsum path)."""
  dt = cfg.dtype
  return jax.nn.dot_product_attention(
    q_RxLxHxE,
    k_RxSxGxE.astype(dt),
    v_RxSxGxE.astype(dt),
    mask=None if mask_RxLxS is None else mask_RxLxS[:, None],
    is_causal=mask_RxLxS is None,
    scale=scale,
    implementation=implementation,
  )


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["start_R"], meta_fields=["length", "width"]
)
@dataclasses.dataclass(frozen=True)
class SharedPrompt:
  """The layout of shared-prompt rows (`logps.shared_rows`), passed as a training call's
  `kv_mask_RxS`: a row's first `length` slots are an ordinary row (its prompt, the first
  start_R tokens, then the first response), followed by blocks of `width` slots, one response
  each, continuing from the prompt's end (their positions say where); a block's slots past
  `length` − start_R are padding. A response sees the prompt and its own past, never another
  response."""

  start_R: jax.Array
  length: int
  width: int


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["segment_RxS", "branch_RxS"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class Segments:
  """The layout of packed rows (align_jax/data/packing.py), passed as a training call's
  `kv_mask_RxS`: a slot attends to the earlier slots of its own segment (id > 0; 0 is padding)
  on its own branch or on branch 0 (a shared prompt), within the sliding window measured in the
  slots' positions (which restart per record)."""

  segment_RxS: jax.Array
  branch_RxS: jax.Array

  def mask(self, positions_RxS: jax.Array, in_window) -> jax.Array:
    """[R, S, S]: query slot i may attend key slot j."""
    seg_q, seg_k = self.segment_RxS[:, :, None], self.segment_RxS[:, None, :]
    branch_q, branch_k = self.branch_RxS[:, :, None], self.branch_RxS[:, None, :]
    S = seg_q.shape[1]
    causal_SxS = jnp.arange(S)[None, :] <= jnp.arange(S)[:, None]
    return (
      causal_SxS[None]
      & (seg_q == seg_k)
      & (seg_k > 0)
      & ((branch_k == 0) | (branch_k == branch_q))
      & in_window(positions_RxS[:, :, None] - positions_RxS[:, None, :])
    )


def _shared_prompt_attention(
  cfg, layout, q_RxSxHxE, k_RxSxGxE, v_RxSxGxE, positions_RxS, in_window, scale
):
  """Attention over shared-prompt rows (`SharedPrompt`) at the cost of the rows it stands for:
  the first `length` slots attend causally among themselves; each further block's W queries
  attend to the prompt's keys and their block's own causally (scores [W, length + W] per block,
  not [S, S] per row). Sliding windows are measured in positions."""
  L, W, start_R = layout.length, layout.width, layout.start_R
  R, S, H, E = q_RxSxHxE.shape
  G, N = k_RxSxGxE.shape[2], (S - L) // W
  pos_RxL, pos_RxNxW = positions_RxS[:, :L], positions_RxS[:, L:].reshape(R, N, W)
  causal_LxL = jnp.arange(L)[None, :] <= jnp.arange(L)[:, None]
  mask_RxLxL = causal_LxL[None] & in_window(pos_RxL[:, :, None] - pos_RxL[:, None, :])
  first_RxLxHxE = _attention(
    cfg, q_RxSxHxE[:, :L], k_RxSxGxE[:, :L], v_RxSxGxE[:, :L], mask_RxLxL, scale
  )

  def blocks(x_RxSxGxE):  # [R·N, L + W, G, E]: the prompt's keys, then the block's own.
    own_RxNxWxGxE = x_RxSxGxE[:, L:].reshape(R, N, W, G, E)
    prompt_RxNxLxGxE = jnp.broadcast_to(x_RxSxGxE[:, None, :L], (R, N, L, G, E))
    both = jnp.concatenate([prompt_RxNxLxGxE, own_RxNxWxGxE], axis=2)
    return both.reshape(R * N, L + W, G, E)

  key_pos_RxNxT = jnp.concatenate([jnp.broadcast_to(pos_RxL[:, None], (R, N, L)), pos_RxNxW], 2)
  prompt_Rx1x1xL = (jnp.arange(L) < start_R[:, None])[:, None, None, :]
  real_Rx1xW = (start_R[:, None] + jnp.arange(W)[None, :] < L)[:, None, :]
  own_RxWxW = (jnp.arange(W)[None, :] <= jnp.arange(W)[:, None])[None] & real_Rx1xW
  mask_RxNxWxT = jnp.concatenate(
    [
      jnp.broadcast_to(prompt_Rx1x1xL, (R, N, W, L)),
      jnp.broadcast_to(own_RxWxW[:, None], (R, N, W, W)),
    ],
    axis=-1,
  ) & in_window(pos_RxNxW[..., None] - key_pos_RxNxT[:, :, None, :])
  rest = _attention(
    cfg,
    q_RxSxHxE[:, L:].reshape(R * N, W, H, E),
    blocks(k_RxSxGxE),
    blocks(v_RxSxGxE),
    mask_RxNxWxT.reshape(R * N, W, L + W),
    scale,
  )
  return jnp.concatenate([first_RxLxHxE, rest.reshape(R, N * W, H, E)], axis=1)


def _attend(cfg, q_RxLxHxE, mask_RxLxS, *, k_RxSxGxE, v_RxSxGxE, scale):
  """softmax(softcap(q·kᵀ·scale) masked)·v per query head, KV heads shared by their group.

  The N query heads of a group are stacked along the queries ([R, G, N·L, E]) and the keys and
  values are [R, G, S, E]: both products are plain batched matmuls over (R, G), so XLA moves the
  small q, k, v and outputs, not the [·, L, S] scores (half the transposes of an einsum in the
  [R, L, H, E] layout; 18 % less time for a tiny Llama's attention forward and backward on CPU)."""
  dt, G, E = cfg.dtype, cfg.n_kv_heads, cfg.head_dim
  R, L, H, _ = q_RxLxHxE.shape
  N, S = H // G, k_RxSxGxE.shape[1]
  q_RxGxQxE = q_RxLxHxE.reshape(R, L, G, N, E).transpose(0, 2, 3, 1, 4).reshape(R, G, N * L, E)
  k_RxGxSxE = k_RxSxGxE.astype(dt).transpose(0, 2, 1, 3)
  v_RxGxSxE = v_RxSxGxE.astype(dt).transpose(0, 2, 1, 3)
  scores = (
    jnp.einsum("rgqe,rgse->rgqs", q_RxGxQxE, k_RxGxSxE, preferred_element_type=wide(dt)) * scale
  )
  M = mask_RxLxS.shape[0]  # R, or 1 (one mask for every row).
  mask_Mx1xQxS = jnp.broadcast_to(mask_RxLxS[:, None, None], (M, 1, N, L, S)).reshape(
    M, 1, N * L, S
  )
  scores = jnp.where(mask_Mx1xQxS, softcap(scores, cfg.attn_softcap), -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  out_RxGxQxE = jnp.einsum("rgqs,rgse->rgqe", probs, v_RxGxSxE)
  return out_RxGxQxE.reshape(R, G, N, L, E).transpose(0, 3, 1, 2, 4).reshape(R, L, H, E)


def _query_chunks(attend, U: int, q_RxLxHxE, mask_RxLxS):
  """`attend` over the queries in Q chunks of U (each query's softmax is its own), each chunk's
  [R, H, U, S] scores recomputed in the backward pass rather than stored (`lax.map` of a
  `jax.checkpoint`): the memory of one chunk's scores instead of all L rows'."""
  R, L, H, E = q_RxLxHxE.shape
  Q = math.ceil(L / U)
  pad = Q * U - L  # Padded queries see no key (uniform weights) and are dropped.
  q_QxRxUxHxE = (
    jnp.pad(q_RxLxHxE, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(R, Q, U, H, E).swapaxes(0, 1)
  )
  mask_QxRxUxS = (  # Its rows may be 1 (broadcast over R).
    jnp.pad(mask_RxLxS, ((0, 0), (0, pad), (0, 0)))
    .reshape(mask_RxLxS.shape[0], Q, U, -1)
    .swapaxes(0, 1)
  )

  @jax.checkpoint
  def one_chunk(xs):
    q_RxUxHxE, mask_RxUxS = xs
    return attend(shard(q_RxUxHxE, ("act_batch", "act_len", "act_heads", None)), mask_RxUxS)

  out_QxRxUxHxE = jax.lax.map(one_chunk, (q_QxRxUxHxE, mask_QxRxUxS))
  return out_QxRxUxHxE.swapaxes(0, 1).reshape(R, Q * U, H, E)[:, :L]


class Mlp(nnx.Module):
  """Gated MLP down(act(x W_gate) * x W_up) (SwiGLU, GeGLU), or down(act(x W_up)) (GPT-2)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, F, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    if cfg.gated_mlp:
      self.wgate_DxF = _param(rngs, (D, F), ("embed", "mlp"), pd)
    self.wup_DxF = _param(rngs, (D, F), ("embed", "mlp"), pd)
    self.wdown_FxD = _param(rngs, (F, D), ("mlp", "embed"), pd)
    if cfg.mlp_bias:
      if cfg.gated_mlp:
        self.bgate_F = _param(rngs, (F,), ("mlp",), pd, "zeros")
      self.bup_F = _param(rngs, (F,), ("mlp",), pd, "zeros")
      self.bdown_D = _param(rngs, (D,), ("bias",), pd, "zeros")
    self.cfg = cfg

  def __call__(self, x_RxLxD: jax.Array) -> jax.Array:
    cfg, dt, act = self.cfg, self.cfg.dtype, ACTIVATIONS[self.cfg.mlp_act]

    def linear(x, w, b):  # Parameter names: the bias is there iff cfg.mlp_bias.
      out = x @ getattr(self, w)[...].astype(dt)
      return out + getattr(self, b)[...].astype(dt) if cfg.mlp_bias else out

    up_RxLxF = linear(x_RxLxD, "wup_DxF", "bup_F")
    h_RxLxF = (
      act(linear(x_RxLxD, "wgate_DxF", "bgate_F")) * up_RxLxF if cfg.gated_mlp else act(up_RxLxF)
    )
    h_RxLxF = shard(h_RxLxF, ("act_batch", "act_len", "act_mlp"))
    return shard(linear(h_RxLxF, "wdown_FxD", "bdown_D"), ("act_batch", "act_len", "act_embed"))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, local: bool | None = False, *, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg, rngs=rngs)
    self.attn = Attention(cfg, local, rngs=rngs)
    self.mlp_norm = Norm(cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    if cfg.post_norms:
      self.post_attn_norm = Norm(cfg, rngs=rngs)
      self.post_mlp_norm = Norm(cfg, rngs=rngs)
    self.post_norms = cfg.post_norms

  def __call__(self, x_RxLxD, positions_RxL, cache, cache_index, kv_mask_RxS, local=None):
    h_RxLxD, new_cache = self.attn(
      self.attn_norm(x_RxLxD), positions_RxL, cache, cache_index, kv_mask_RxS, local
    )
    x_RxLxD = x_RxLxD + (self.post_attn_norm(h_RxLxD) if self.post_norms else h_RxLxD)
    h_RxLxD = self.mlp(self.mlp_norm(x_RxLxD))
    return x_RxLxD + (self.post_mlp_norm(h_RxLxD) if self.post_norms else h_RxLxD), new_cache


class Transformer(nnx.Module):
  """Token ids -> next-token logits (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_VxD = _param(
      rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype, 1.0
    )
    if cfg.positions == "learned":
      self.pos_embed_LxD = _param(
        rngs, (cfg.max_positions, cfg.d_model), ("positions", "embed"), cfg.param_dtype, 1.0
      )
    if cfg.scan_layers:
      self.layers = _stacked_blocks(cfg, rngs)
    else:
      self.layers = nnx.List([Block(cfg, cfg.is_local(i), rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = Norm(cfg, rngs=rngs)
    if cfg.num_scores:
      self.score_DxO = _param(
        rngs, (cfg.d_model, cfg.num_scores), ("embed", "scores"), cfg.param_dtype
      )
    elif not cfg.tie_embeddings:
      self.unembed_DxV = _param(
        rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype
      )

  def __call__(
    self,
    tokens_RxL: jax.Array,
    positions_RxL: jax.Array | None = None,
    *,
    cache: list[dict] | dict | None = None,
    cache_index: jax.Array | int = 0,
    kv_mask_RxS: jax.Array | None = None,
  ):
    """Returns (logits_RxLxV float32, new cache or None); a scoring model returns (scores_RxLxO, None).

    Args:
      tokens_RxL: token ids.
      positions_RxL: positions (RoPE angles or learned rows); defaults to 0..L-1.
      cache: the KV cache of `init_cache` (per layer {"k", "v"} [R, S, G, E], or stacked
        [A, R, S, G, E] with scan_layers), or None.
      cache_index: the cache slot of this call's first token.
      kv_mask_RxS: False for key slots that must not be attended (padding); or, for a training
        call (no cache), the `SharedPrompt` layout of shared-prompt rows or the `Segments` of
        packed rows.
    """
    x_RxLxD, new_cache = self.hidden(
      tokens_RxL, positions_RxL, cache=cache, cache_index=cache_index, kv_mask_RxS=kv_mask_RxS
    )
    if self.cfg.num_scores:
      return jnp.einsum(
        "rld,do->rlo",
        x_RxLxD,
        self.score_DxO[...].astype(self.cfg.dtype),
        preferred_element_type=wide(self.cfg.dtype),
      ), None
    return unembed(self.cfg, x_RxLxD, self.unembed_weight()), new_cache

  def hidden(
    self,
    tokens_RxL: jax.Array,
    positions_RxL: jax.Array | None = None,
    *,
    cache: list[dict] | dict | None = None,
    cache_index: jax.Array | int = 0,
    kv_mask_RxS: jax.Array | None = None,
  ):
    """(final hidden states x_RxLxD after the final norm, new cache or None): `__call__` without
    the output head (arguments as there)."""
    cfg = self.cfg
    if positions_RxL is None:
      positions_RxL = jnp.broadcast_to(jnp.arange(tokens_RxL.shape[1]), tokens_RxL.shape)
    x_RxLxD = self.embed_VxD[...].astype(cfg.dtype)[tokens_RxL]
    if cfg.embed_scale:
      x_RxLxD = x_RxLxD * jnp.asarray(cfg.d_model**0.5, cfg.dtype)
    if cfg.positions == "learned":
      x_RxLxD = x_RxLxD + self.pos_embed_LxD[...].astype(cfg.dtype)[positions_RxL]
    x_RxLxD = shard(x_RxLxD, ("act_batch", "act_len", "act_embed"))
    args = (positions_RxL, cache, cache_index, kv_mask_RxS)
    if cfg.scan_layers:
      x_RxLxD, new_cache = _scan_blocks(cfg, self.layers, x_RxLxD, *args)
    else:
      x_RxLxD, new_cache = _unrolled_blocks(cfg, self.layers, x_RxLxD, *args)
    return self.final_norm(x_RxLxD), (None if cache is None else new_cache)

  def unembed_weight(self) -> jax.Array:
    """W [D, V] of the output projection (the embedding table's transpose when tied)."""
    return self.embed_VxD[...].T if self.cfg.tie_embeddings else self.unembed_DxV[...]


def unembed(cfg: ModelConfig, x_RxLxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
  """Next-token logits softcap(x·W) in the wide dtype [R, L, V], vocabulary over act_vocab."""
  logits_RxLxV = softcap(
    jnp.einsum(
      "rld,dv->rlv", x_RxLxD, w_DxV.astype(cfg.dtype), preferred_element_type=wide(cfg.dtype)
    ),
    cfg.final_softcap,
  )
  return shard(logits_RxLxV, ("act_batch", "act_len", "act_vocab"))


def _unrolled_blocks(cfg, layers, x_RxLxD, positions_RxL, cache, cache_index, kv_mask_RxS):
  """The blocks one after another (one compiled body each); the cache is a list per layer."""
  new_cache = []
  for i, block in enumerate(layers):
    layer_cache = None if cache is None else cache[i]
    if cfg.remat:
      call = nnx.remat(
        lambda b, *a: b(*a), prevent_cse=True, policy=REMAT_POLICIES[cfg.remat_policy]
      )
      x_RxLxD, c = call(block, x_RxLxD, positions_RxL, layer_cache, cache_index, kv_mask_RxS)
    else:
      x_RxLxD, c = block(x_RxLxD, positions_RxL, layer_cache, cache_index, kv_mask_RxS)
    new_cache.append(c)
  return x_RxLxD, new_cache


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """N blocks as one Block whose parameters have a leading layer axis (logical name `layers`);
  each layer's slice is initialised from its own key."""

  @nnx.split_rngs(splits=cfg.n_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(rngs):
    return Block(cfg, None, rngs=rngs)

  return make(rngs)


def _scan_blocks(cfg, layers, x_RxLxD, positions_RxL, cache, cache_index, kv_mask_RxS):
  """One compiled block body scanned over the stacked parameters, with layer i's local flag.

  The cache {"k", "v"} [A, R, S, G, E] is carried through the scan; each layer writes only this
  call's L new slots of its own row (an in-place update of the carry).
  """
  graphdef, stacked = nnx.split(layers)
  local_A = jnp.asarray([cfg.is_local(i) for i in range(cfg.n_layers)])

  def body(carry, xs):
    x_RxLxD, cache = carry
    layer_params, local, i = xs
    block = nnx.merge(graphdef, layer_params)
    layer_cache = None if cache is None else {k: v[i] for k, v in cache.items()}
    x_RxLxD, new = block(x_RxLxD, positions_RxL, layer_cache, cache_index, kv_mask_RxS, local)
    if cache is not None:
      L = x_RxLxD.shape[1]
      cache = {
        k: jax.lax.dynamic_update_slice(
          v,
          jax.lax.dynamic_slice_in_dim(new[k], cache_index, L, axis=1)[None],
          (i, 0, cache_index, 0, 0),
        )
        for k, v in cache.items()
      }
    return (x_RxLxD, cache), None

  if cfg.remat:
    body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat_policy])
  (x_RxLxD, new_cache), _ = jax.lax.scan(
    body, (x_RxLxD, cache), (stacked, local_A, jnp.arange(cfg.n_layers))
  )
  return x_RxLxD, new_cache


def init_cache(cfg: ModelConfig, rows: int, slots: int) -> list[dict] | dict:
  """An empty KV cache in the compute dtype: per layer {"k", "v"} of shape [rows, slots, G, E], or
  with scan_layers one {"k", "v"} of shape [A, rows, slots, G, E]."""
  shape = (rows, slots, cfg.n_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.n_layers, *shape)
    return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
  return [
    {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}
    for _ in range(cfg.n_layers)
  ]


def stack_layers(params: dict) -> dict:
  """Unrolled parameters (`params["layers"][i]`) in the scan_layers layout: each block
  parameter stacked over the layers on a new leading axis."""
  layers = params["layers"]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in range(len(layers))))
  return {**params, "layers": stacked}


def unstack_layers(params: dict) -> dict:
  """Stacked parameters (scan_layers) in the unrolled layout `params["layers"][i]`."""
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  layers = {i: jax.tree.map(lambda x: x[i], params["layers"]) for i in range(n)}
  return {**params, "layers": layers}


def _build(cfg: ModelConfig, seed: int) -> Transformer:
  with nnx.use_eager_sharding(False):  # Sharding is applied by the caller's jit out_shardings.
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: ModelConfig):
  """(graphdef, shapes, logical names) of the model, without allocating parameters."""
  static = {}

  def build():  # Traced by jax.eval_shape; the graph and names are static and captured.
    graphdef, state = nnx.split(_build(cfg, 0))
    names = jax.tree.map(
      lambda v: tuple(v.get_metadata()["out_sharding"]),
      state,
      is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
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
