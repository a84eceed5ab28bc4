"""A run's initial parameters, created or read directly into their shardings.

Sources, by `init_checkpoint`: none (a fresh init from the seed), an Orbax parameters directory or
a Hugging Face directory (`lm_dir`; the testbed's cached base LM is an Orbax directory). A scoring
model (`num_scores > 0`, reward models) takes a language model's body and a freshly initialised
head. With LoRA the loaded model is the frozen base and the trainable parameters are adapters.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import checkpoint, sharding
from align_jax.models import hf, lora
from align_jax.models.transformer import ModelConfig, abstract, init_params, stack_layers
from align_jax.models.transformer import unstack_layers


@dataclasses.dataclass(frozen=True)
class RunModel:
  """The model of a run: its structure, shardings and starting parameters."""

  graphdef: object
  shapes: dict  # ShapeDtypeStructs of the whole model's parameters.
  names: dict  # Logical axis names of each parameter.
  shardings: dict  # NamedShardings of the whole model's parameters.
  trainable: dict  # What the optimizer updates: the parameters, or LoRA adapters.
  ref_params: dict | None  # The frozen reference (LoRA: the frozen base); None if unused.
  merge: Callable | None  # LoRA: (base, adapters) -> the policy's parameters; else None.


def read_lm(path: str, model_cfg: ModelConfig, shardings: dict) -> dict:
  """A language model's parameters from a Hugging Face directory or an Orbax params directory.

  Both layouts of the layers read both: an HF directory holds one tensor per layer; an Orbax
  params directory saved in the other layout (unrolled vs scan_layers) is read as saved and
  stacked or unstacked into `shardings`."""
  if hf.is_hf_dir(path):
    return hf.load_params(path, model_cfg, shardings)
  saved_stacked = "0" not in checkpoint.saved_tree(path).get("layers", {"0": None})
  if saved_stacked == model_cfg.scan_layers:
    _, shapes, _ = abstract(model_cfg)
    return checkpoint.load_params(path, checkpoint.abstract_like(shapes, shardings))
  saved_cfg = dataclasses.replace(model_cfg, scan_layers=saved_stacked)
  _, saved_shapes, _ = abstract(saved_cfg)
  with_layer = lambda s: NamedSharding(s.mesh, P(None, *s.spec))  # Stacked: a leading N axis.
  without_layer = lambda s: NamedSharding(s.mesh, P(*s.spec[1:]))
  if saved_stacked:  # Saved stacked, wanted unrolled.
    layers = jax.tree.map(with_layer, shardings["layers"][0])
    convert = unstack_layers
  else:
    one = jax.tree.map(without_layer, shardings["layers"])
    layers = {i: one for i in range(model_cfg.n_layers)}
    convert = stack_layers
  saved = checkpoint.load_params(
    path, checkpoint.abstract_like(saved_shapes, {**shardings, "layers": layers})
  )
  return jax.jit(convert, out_shardings=shardings)(saved)


def build(cfg, *, lm_dir: str, needs_ref: bool, mesh, table: dict) -> RunModel:
  """The run's model (`cfg.model`, `cfg.lora`): parameters from `lm_dir` ('' = fresh from
  `cfg.seed`), sharded by `table`.

  The reference is a second, separately loaded copy (never aliased with the trained buffers),
  loaded only when `needs_ref`; with LoRA it is the frozen base itself.
  """
  model_cfg, lora_cfg, seed = ModelConfig(**cfg.model), cfg.lora, cfg.seed
  graphdef, shapes, names = abstract(model_cfg)
  shardings = sharding.tree_shardings(names, mesh, table)
  sharding.log_param_shardings(shapes, shardings)
  init_fn = jax.jit(functools.partial(init_params, model_cfg), out_shardings=shardings)

  def load():  # Each call returns its own buffers.
    if not lm_dir:
      return init_fn(jax.random.key(seed))
    if not model_cfg.num_scores:
      return read_lm(lm_dir, model_cfg, shardings)
    lm_cfg = dataclasses.replace(model_cfg, num_scores=0)  # A body, and a fresh scoring head.
    body = read_lm(lm_dir, lm_cfg, sharding.tree_shardings(abstract(lm_cfg)[2], mesh, table))
    head = init_fn(jax.random.key(seed))["score_DxO"]
    return {**{k: v for k, v in body.items() if k != "unembed_DxV"}, "score_DxO": head}

  params = load()
  if not lora.enabled(lora_cfg):
    return RunModel(
      graphdef,
      shapes,
      names,
      shardings,
      trainable=params,
      ref_params=load() if needs_ref else None,
      merge=None,
    )
  adapter_shardings = sharding.tree_shardings(lora.names(names, lora_cfg), mesh, table)
  adapters = jax.jit(
    functools.partial(lora.init, shapes, names, lora_cfg), out_shardings=adapter_shardings
  )(jax.random.fold_in(jax.random.key(seed), 1))
  sharding.log_param_shardings(adapters, adapter_shardings)
  return RunModel(
    graphdef,
    shapes,
    names,
    shardings,
    trainable=adapters,
    ref_params=params,
    merge=functools.partial(lora.merge, cfg=lora_cfg),
  )


def abstract_build(cfg, *, needs_ref: bool, mesh, table: dict) -> RunModel:
  """`build` without parameters: the same RunModel with ShapeDtypeStructs carrying the shardings
  in place of arrays (what an ahead-of-time compile takes, align_jax/plan.py)."""
  model_cfg, lora_cfg = ModelConfig(**cfg.model), cfg.lora
  graphdef, shapes, names = abstract(model_cfg)
  shardings = sharding.tree_shardings(names, mesh, table)
  params = checkpoint.abstract_like(shapes, shardings)
  if not lora.enabled(lora_cfg):
    ref = params if needs_ref else None
    return RunModel(graphdef, shapes, names, shardings, params, ref, merge=None)
  adapter_shardings = sharding.tree_shardings(lora.names(names, lora_cfg), mesh, table)
  adapters = checkpoint.abstract_like(lora.abstract(shapes, names, lora_cfg), adapter_shardings)
  merge = functools.partial(lora.merge, cfg=lora_cfg)
  return RunModel(graphdef, shapes, names, shardings, adapters, params, merge)
