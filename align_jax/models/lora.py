"""LoRA (Hu et al. 2021, arXiv 2106.09685) as a pure transformation of the params pytree.

A targeted weight W of shape [*in, *out] (its input dims as in the model's einsum, then its output
dims) gets two adapters, A [*in, R] and B [R, *out], and the model runs on the effective weight

    W' = W + (alpha / R) · A·B        (A·B contracts R: tensordot over one axis)

computed by `merge` before `apply`; the model code is unchanged. A starts normal with std
fan_in^-1/2, B at zero, so W' = W exactly at step 0. Targets: `attn` (every attention projection,
e.g. wq_DxHxE, whose input is D, and wo_HxExD, whose inputs are H and E) and `mlp` (the MLP
projections); a projection is a weight of at least two dims with an `embed` axis inside an `attn`
or `mlp` module (biases, norms, embeddings and heads are never adapted). A weight's inputs are all
dims but the last when its last axis is `embed` (it writes the residual stream), else its first.

Adapters mirror the params tree: `{"layers": {0: {"attn": {"wq_DxHxE": {"lora_a": A, "lora_b":
B}}}}}`; they carry the weight's logical names on their in/out dims (the rank dim is replicated),
so they shard like the weight. A stacked weight (scan_layers: a leading `layers` axis) gets
stacked adapters, one pair per layer: A [layers, *in, R], B [layers, R, *out]. The adapters are
the train state's `params`; the base weights are frozen inputs of the step (the reference of
objectives that have one: adapters off) and are read from `init_checkpoint` on every start, never
checkpointed.

Config (`config_lib.base().lora`): rank (0: off), alpha, targets.
"""

import functools
import math

import jax
import jax.numpy as jnp

from align_jax.models.transformer import wide
from align_jax.errors import ConfigError

TARGETS = ("attn", "mlp")


def enabled(cfg) -> bool:
  return cfg.rank > 0


def check(cfg) -> None:
  """Raises ValueError naming the bad `lora.*` setting."""
  if cfg.rank < 0:
    raise ConfigError(f"lora.rank={cfg.rank} must be >= 0 (0 turns LoRA off)")
  if not enabled(cfg):
    return
  if cfg.alpha <= 0:
    raise ConfigError(f"lora.alpha={cfg.alpha} must be > 0")
  unknown = sorted(set(cfg.targets) - set(TARGETS))
  if unknown or not cfg.targets:
    raise ConfigError(f"lora.targets {tuple(cfg.targets)}: use a non-empty subset of {TARGETS}")


def _plan(names: dict, cfg) -> dict:
  """{path: (stacked layer dims (0 or 1), number of input dims)} of the weights LoRA adapts, from
  the params' logical names."""
  plan = {}

  def visit(node, path):
    if isinstance(node, dict):
      for key, child in node.items():
        visit(child, (*path, key))
      return
    n = 1 if node[:1] == ("layers",) else 0
    node = node[n:]
    if len(node) >= 2 and "embed" in node and any(k in cfg.targets for k in path[:-1]):
      plan[path] = (n, len(node) - 1 if node[-1] == "embed" else 1)

  visit(names, ())
  if not plan:
    raise ConfigError(f"lora.targets {tuple(cfg.targets)} match no weight of the model")
  return plan


def _nest(flat: dict) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def names(param_names: dict, cfg) -> dict:
  """The adapters' logical axis names, given the params' (leaves: tuples of names)."""
  out = {}
  for path, (n, n_in) in _plan(param_names, cfg).items():
    w = _get(param_names, path)
    out[path] = {"lora_a": (*w[: n + n_in], None), "lora_b": (*w[:n], None, *w[n + n_in :])}
  return _nest(out)


def init(shapes: dict, param_names: dict, cfg, key: jax.Array) -> dict:
  """Fresh adapters for params of these shapes (arrays or ShapeDtypeStructs): A normal with std
  fan_in^-1/2, B zero; float32 (float64 for a float64 model)."""
  plan = _plan(param_names, cfg)
  flat = {}
  for i, (path, (n, n_in)) in enumerate(sorted(plan.items(), key=lambda kv: str(kv[0]))):
    w = _get(shapes, path)
    dtype, layer_dims = wide(w.dtype), w.shape[:n]
    in_dims, out_dims = w.shape[n : n + n_in], w.shape[n + n_in :]
    std = math.prod(in_dims) ** -0.5
    a_shape = (*layer_dims, *in_dims, cfg.rank)
    flat[path] = {
      "lora_a": std * jax.random.normal(jax.random.fold_in(key, i), a_shape, dtype),
      "lora_b": jnp.zeros((*layer_dims, cfg.rank, *out_dims), dtype),
    }
  return _nest(flat)


def abstract(shapes: dict, param_names: dict, cfg) -> dict:
  """The adapters' ShapeDtypeStructs (e.g. a restore target), without allocating them."""
  return jax.eval_shape(functools.partial(init, shapes, param_names, cfg), jax.random.key(0))


def delta(adapter: dict, scale: float, stacked: bool = False) -> jax.Array:
  """scale · A·B, the shape of the adapted weight: [*in, *out] ([layers, *in, *out] when stacked:
  one product per layer)."""
  product = lambda a, b: jnp.tensordot(a, b, axes=1)
  return scale * (jax.vmap(product) if stacked else product)(adapter["lora_a"], adapter["lora_b"])


def merge(base: dict, adapters: dict, cfg) -> dict:
  """The effective params W + (alpha/rank)·A·B at every adapted weight; other leaves as in base.

  Differentiable in both arguments; the result has base's structure and dtypes (so it is what
  `models.apply`, the sampler and an export take)."""
  scale = cfg.alpha / cfg.rank

  def walk(params, adapted):
    if "lora_a" in adapted:  # A stacked weight has one more dim than A·B contracts away.
      stacked = adapted["lora_a"].ndim + adapted["lora_b"].ndim - 2 > params.ndim
      update = delta(adapted, scale, stacked)
      return (params.astype(wide(params.dtype)) + update).astype(params.dtype)
    return {k: walk(v, adapted[k]) if k in adapted else v for k, v in params.items()}

  return walk(base, adapters)
