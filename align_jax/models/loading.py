"""A run's initial parameters, created or read directly into their shardings.

Sources, by `init_checkpoint`: none (a fresh init from the seed), an Orbax parameters directory or
a Hugging Face directory (`lm_dir`; the testbed's cached base LM is an Orbax directory). A scoring
model (`num_scores > 0`, reward models) takes a language model's body and a freshly initialised
head. With LoRA the loaded model is the frozen base and the trainable parameters are adapters.
A teacher (`teacher.*`, on-policy distillation) is a frozen LM of its own architecture.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import checkpoint, sharding
from align_jax.errors import ConfigError
from align_jax.models import hf, lora, presets
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


# -------------------------------------------------------------------------------------------------
# A teacher: a frozen language model of its own architecture (on-policy distillation).


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher LM: its structure, parameters and their shardings."""

  graphdef: object
  params: dict
  shardings: dict
  model: ModelConfig


def teacher_model(cfg, path: str) -> ModelConfig:
  """The teacher's architecture: a run workdir's (its config.json's `model`), a Hugging Face
  directory's, the preset `teacher.model`, or the student's; a ConfigError unless its vocabulary
  is the student's (the divergences compare distributions over one vocabulary)."""
  fields = cfg.model.to_dict()
  if cfg.teacher.model:
    fields = presets.preset(cfg.teacher.model).to_dict()
  if path and os.path.isfile(os.path.join(path, "config.json")) and not hf.is_hf_dir(path):
    with open(os.path.join(path, "config.json")) as f:
      run = json.load(f)
    if run.get("lora", {}).get("rank", 0):
      raise ConfigError(f"teacher.path {path!r} is a LoRA run: use a run that trains every weight")
    fields = run["model"]
  elif path and hf.is_hf_dir(path):
    fields = hf.model_config(path, fields)
  model_cfg = ModelConfig(**{**fields, "num_scores": 0})
  if model_cfg.vocab_size != cfg.model.vocab_size:
    raise ConfigError(
      f"teacher (teacher.path={path!r}, teacher.model={cfg.teacher.model!r}) has a vocabulary "
      f"of {model_cfg.vocab_size} tokens, the student {cfg.model.vocab_size}: distillation "
      "needs one vocabulary"
    )
  return model_cfg


def build_teacher(cfg, *, path: str, mesh, table: dict) -> Teacher:
  """The teacher at `path`: a run workdir (its newest checkpoint's parameters), an Orbax params or
  Hugging Face directory, or `init:<seed>` (a fresh random init, for tests), sharded by `table`."""
  model_cfg = teacher_model(cfg, path)
  graphdef, shapes, names = abstract(model_cfg)
  shardings = sharding.tree_shardings(names, mesh, table)
  if path.startswith("init:"):
    seed = int(path.split(":", 1)[1])
    init = jax.jit(functools.partial(init_params, model_cfg), out_shardings=shardings)
    return Teacher(graphdef, init(jax.random.key(seed)), shardings, model_cfg)
  checkpoints = os.path.join(path, "checkpoints")
  if os.path.isdir(checkpoints):  # A run's workdir.
    abstract_params = checkpoint.abstract_like(shapes, shardings)
    _, params = checkpoint.load_state_params(checkpoints, abstract_params)
    return Teacher(graphdef, params, shardings, model_cfg)
  return Teacher(graphdef, read_lm(path, model_cfg, shardings), shardings, model_cfg)
