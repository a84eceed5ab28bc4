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
so they shard like the weight. The adapters are the train state's `params`; the base weights are
frozen inputs of the step (the reference of objectives that have one: adapters off) and are read
from `init_checkpoint` on every start, never checkpointed.

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
  """{path: number of input dims} of the weights LoRA adapts, from the params' logical names."""
  plan = {}

  def visit(node, path):
    if isinstance(node, dict):
      for key, child in node.items():
        visit(child, (*path, key))
      return
    if len(node) >= 2 and "embed" in node and any(k in cfg.targets for k in path[:-1]):
      plan[path] = len(node) - 1 if node[-1] == "embed" else 1

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
  return _nest(
    {
      path: {
        "lora_a": (*_get(param_names, path)[:n_in], None),
        "lora_b": (None, *_get(param_names, path)[n_in:]),
      }
      for path, n_in in _plan(param_names, cfg).items()
    }
  )


def init(shapes: dict, param_names: dict, cfg, key: jax.Array) -> dict:
  """Fresh adapters for params of these shapes (arrays or ShapeDtypeStructs): A normal with std
  fan_in^-1/2, B zero; float32 (float64 for a float64 model)."""
  plan = _plan(param_names, cfg)
  flat = {}
  for i, (path, n_in) in enumerate(sorted(plan.items(), key=lambda kv: str(kv[0]))):
    w = _get(shapes, path)
    dtype, in_dims, out_dims = wide(w.dtype), w.shape[:n_in], w.shape[n_in:]
    std = math.prod(in_dims) ** -0.5
    flat[path] = {
      "lora_a": std * jax.random.normal(jax.random.fold_in(key, i), (*in_dims, cfg.rank), dtype),
      "lora_b": jnp.zeros((cfg.rank, *out_dims), dtype),
    }
  return _nest(flat)


def abstract(shapes: dict, param_names: dict, cfg) -> dict:
  """The adapters' ShapeDtypeStructs (e.g. a restore target), without allocating them."""
  return jax.eval_shape(functools.partial(init, shapes, param_names, cfg), jax.random.key(0))


def delta(adapter: dict, scale: float) -> jax.Array:
  """scale · A·B, the shape of the adapted weight: [*in, *out]."""
  return scale * jnp.tensordot(adapter["lora_a"], adapter["lora_b"], axes=1)


def merge(base: dict, adapters: dict, cfg) -> dict:
  """The effective params W + (alpha/rank)·A·B at every adapted weight; other leaves as in base.

  Differentiable in both arguments; the result has base's structure and dtypes (so it is what
  `models.apply`, the sampler and an export take)."""
  scale = cfg.alpha / cfg.rank

  def walk(params, adapted):
    if "lora_a" in adapted:
      return (params.astype(wide(params.dtype)) + delta(adapted, scale)).astype(params.dtype)
    return {k: walk(v, adapted[k]) if k in adapted else v for k, v in params.items()}

  return walk(base, adapters)
