"""align_jax's real step, built for benchmarks the way train.py builds it.

A run config comes from `configs/<name>.py` (so the objective's loss settings and the optimizer
are the shipped ones); the model is swapped for a benchmark size; batches are random token ids of
fixed lengths (the step's cost does not depend on their values). `Step` jits `step.train_step`
with train.py's shardings and donation and feeds it host batches through `pipeline.to_global`,
as the training loop does; `build_rollout` jits the on-policy rollout as train.py does.
"""

import dataclasses
import functools
import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import models, objectives, rollout, sampling, sharding, step
from align_jax.data import pipeline
from align_jax.data import records as run_records
from experiments.benchmarks.report import ROOT

# The CPU benchmark model: a 2-layer Llama (GQA, SwiGLU, RoPE, untied embeddings), 2.5M
# parameters; peers.py builds the same shape in Tunix and TRL.
TINY_LLAMA = dict(
  vocab_size=1024,
  d_model=256,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  head_dim=64,
  mlp_dim=1024,
  rope_theta=10_000.0,
  norm_eps=1e-6,
)


def model_config(preset: str, **overrides) -> models.ModelConfig:
  """`tiny_llama` (TINY_LLAMA) or any align_jax preset (e.g. llama_1b), with field overrides."""
  base = (
    models.preset("tiny").to_dict() | TINY_LLAMA
    if preset == "tiny_llama"
    else models.preset(preset).to_dict()
  )
  return models.ModelConfig(**(base | {k: v for k, v in overrides.items() if v is not None}))


def run_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), as the CLI builds it."""
  spec = importlib.util.spec_from_file_location(
    f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def records(
  rng: np.random.Generator, rows: int, k: int, prompt_len: int, response_len: int, vocab: int
) -> dict[str, np.ndarray]:
  """`rows` host records of k responses each: random tokens, the response tokens scored, random
  distinct scores (ranked lists; pairs ignore them)."""
  L = prompt_len + response_len
  tokens = rng.integers(0, vocab, (rows, k, L), dtype=np.int32)
  tokens[:, :, :prompt_len] = tokens[:, :1, :prompt_len]  # One prompt per record.
  mask = np.zeros((rows, k, L), np.float32)
  mask[:, :, prompt_len:] = 1.0
  return {
    "tokens_KxL": tokens,
    "loss_mask_KxL": mask,
    "score_K": rng.permutation(np.tile(np.arange(k, dtype=np.float32), (rows, 1)).T).T,
    "response_mask_K": np.ones((rows, k), np.float32),
  }


def _batch_shardings(keys, mesh) -> dict:
  """Rows over data x fsdp; the rank of each field is read from its shape suffix (BxKxL: 3)."""
  return {k: sharding.batch_sharding(mesh, k.rpartition("_")[2].count("x") + 1) for k in keys}


@dataclasses.dataclass
class Step:
  """A jitted align_jax update on one mesh, its state and frozen reference."""

  cfg: object
  model_cfg: models.ModelConfig
  mesh: jax.sharding.Mesh
  table: dict
  graphdef: object
  state: step.TrainState
  ref_params: dict | None
  param_shardings: dict
  state_shardings: object
  update_fn: object  # step.train_step with its static arguments bound (not jitted).
  fields: tuple  # Record fields of offline batches.
  _jitted: dict = dataclasses.field(default_factory=dict)

  def jitted(self, batch_keys):
    """The update jitted as train.py jits it: explicit shardings, the state donated."""
    keys = tuple(sorted(batch_keys))
    if keys not in self._jitted:
      self._jitted[keys] = jax.jit(
        self.update_fn,
        in_shardings=(
          self.state_shardings,
          _batch_shardings(keys, self.mesh),
          self.param_shardings if self.ref_params is not None else None,
        ),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=0,
      )
    return self._jitted[keys]

  def device_batch(self, host_batch: dict) -> dict:
    """train.py's one host -> device copy of an offline batch."""
    with sharding.use_rules(self.table):  # Rows over the act_batch rule's axes.
      return pipeline.to_global({k: host_batch[k] for k in self.fields}, self.mesh)

  def update(self, batch: dict) -> dict:
    """One update on a device batch; returns the device metrics."""
    with jax.set_mesh(self.mesh), sharding.use_rules(self.table):
      self.state, metrics = self.jitted(batch)(self.state, batch, self.ref_params)
    return metrics

  def __call__(self, host_batch: dict) -> dict:
    """One update from a host batch (the loop body of train.py)."""
    with jax.set_mesh(self.mesh), sharding.use_rules(self.table):
      return self.update(self.device_batch(host_batch))


def update(cfg, model_cfg: models.ModelConfig, shared_prompt: int = 0, rows: int = 2, length=0):
  """(graphdef, optax transformation, `step.train_step` with its static arguments bound), as
  train.py binds them for `cfg` with the model `model_cfg` (`shared_prompt`: the prompt length of
  batches of `rows` responses of `length` tokens, shared as data.share_prompt decides,
  `records.prompt_shared`)."""
  graphdef, _, _ = models.abstract(model_cfg)
  optim = types.SimpleNamespace(**cfg.optim.to_dict(), total_steps=cfg.total_steps)
  tx = step.optimizer(optim)
  return (
    graphdef,
    tx,
    functools.partial(
      step.train_step,
      graphdef=graphdef,
      objective=objectives.get(cfg.objective),
      loss_cfg=cfg.loss.to_dict(),
      tx=tx,
      lr_fn=step.learning_rate(optim),
      shared_prompt=run_records.prompt_shared(cfg, shared_prompt, rows, length),
      log_steps=(max(cfg.log_every, 1), cfg.total_steps),
    ),
  )


def build_step(
  cfg, model_cfg: models.ModelConfig, shared_prompt: int = 0, rows: int = 2, length: int = 0
) -> Step:
  """train.py's model, state and `train_step` for `cfg` with the model `model_cfg`; batches of
  `rows` responses of `length` tokens whose prompts are `shared_prompt` tokens share them as
  data.share_prompt decides."""
  objective = objectives.get(cfg.objective)
  mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
  table = sharding.check_rules(
    cfg.rules, mesh, set(models.transformer.PARAM_AXES) | set(models.transformer.ACT_AXES)
  )
  fields = ("tokens_KxL", "loss_mask_KxL") + (
    ("score_K", "response_mask_K") if objective.data == "lists" else ()
  )
  graphdef, tx, update_fn = update(cfg, model_cfg, shared_prompt, rows, length)
  with jax.set_mesh(mesh), sharding.use_rules(table):
    replicated = sharding.replicated(mesh)
    _, _, names = models.abstract(model_cfg)
    param_shardings = sharding.tree_shardings(names, mesh, table)
    init_fn = jax.jit(
      functools.partial(models.init_params, model_cfg), out_shardings=param_shardings
    )
    params = init_fn(jax.random.key(cfg.seed))
    ref_params = init_fn(jax.random.key(cfg.seed)) if objective.needs_ref else None
    state = jax.jit(lambda p: step.init_state(p, tx, cfg.seed))(params)
    state_shardings = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated,
      state,
    )
    state = jax.device_put(state, state_shardings)
  return Step(
    cfg,
    model_cfg,
    mesh,
    table,
    graphdef,
    state,
    ref_params,
    param_shardings,
    state_shardings,
    update_fn,
    fields,
  )


def _rule_score(tokens_BxKxL, loss_mask_BxKxL, prompt_index_B, ref_logp_BxK, reward_params):
  """A stand-in reward for benchmarks: the share of even token ids in the response (a rule
  reward costs nothing beside the sampler); the target is the reference."""
  del prompt_index_B, reward_params
  low = (tokens_BxKxL % 2 == 0).astype(jnp.float32) * loss_mask_BxKxL
  reward_BxK = low.sum(-1) / jnp.maximum(loss_mask_BxKxL.sum(-1), 1.0)
  return {"reward_BxK": reward_BxK, "target_logp_BxK": ref_logp_BxK}


def build_rollout(s: Step, batch_size: int, prompt_len: int):
  """train.py's jitted rollout for the on-policy config of `s` (anchor: the frozen reference):
  (state, prompts_BxP, prompt_index_B, ref_params) -> the step's batch."""
  cfg = s.cfg
  roll = functools.partial(
    rollout.rollout,
    graphdef=s.graphdef,
    sampling_cfg=sampling.SamplingConfig(**cfg.sampling),
    num_policy=cfg.rollout.num_policy,
    num_anchor=cfg.rollout.num_anchor,
    anchor_is_ref=True,
    score_fn=_rule_score,
    shared_prompt=run_records.prompt_shared(
      cfg,
      prompt_len,
      cfg.rollout.num_policy + cfg.rollout.num_anchor,
      prompt_len + cfg.sampling.max_new_tokens,
    ),
  )
  with jax.set_mesh(s.mesh), sharding.use_rules(s.table):
    shapes = jax.eval_shape(
      roll,
      s.state,
      jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32),
      jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      s.ref_params,
    )
    prompt_shardings = _batch_shardings(("prompt_BxP", "prompt_index_B"), s.mesh)
    return jax.jit(
      roll,
      in_shardings=(
        s.state_shardings,
        prompt_shardings["prompt_BxP"],
        prompt_shardings["prompt_index_B"],
        s.param_shardings,
      ),
      out_shardings=_batch_shardings(shapes, s.mesh),
    )


def step_jaxpr(s: Step, batch: dict):
  """The traced update on a device batch (for the exact matmul count); runs nothing."""
  with jax.set_mesh(s.mesh), sharding.use_rules(s.table):
    return jax.make_jaxpr(s.jitted(batch))(s.state, batch, s.ref_params)
