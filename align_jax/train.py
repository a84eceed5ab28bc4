"""`run(cfg, workdir)`: the run, as a table of contents.

mesh → model and parameters → data → evaluator → train state and the jitted step → resume → loop →
summary. Each piece lives in its room: parameters in `models/loading.py`, records in
`data/records.py`, exact evaluation in `testbed/evaluate.py`, the testbed's base LM in
`testbed/base.py`, on-policy batches in `rollout.py`, the update in `step.py`, checkpoints in
`checkpoint.py`. Resume order: a checkpoint in the workdir > `init_checkpoint` > a fresh init.
"""

import dataclasses
import functools
import os
import time
import types

import jax
from absl import logging

from align_jax import checkpoint, metrics, models, objectives, preemption, rewards, rollout
from align_jax import sharding, step
from align_jax.data import pipeline, preference, records
from align_jax.errors import ConfigError
from align_jax.models import hf, loading, lora
from align_jax.testbed import base as testbed_base
from align_jax.testbed import evaluate, target, task


@dataclasses.dataclass
class RunResult:
  state: step.TrainState
  summary: dict


@dataclasses.dataclass(frozen=True)
class _Parts:
  """What the run is assembled from, before its train state."""

  objective: objectives.Objective
  model: loading.RunModel
  evaluator: evaluate.Evaluator | None  # Exact evaluation (testbed runs only).
  file_data: tuple | None  # A file source's (records, counts, text format).
  data: dict  # The record arrays the pipeline batches.
  mesh: jax.sharding.Mesh
  table: dict  # The logical-axis rules.


def run(cfg, workdir: str) -> RunResult:
  """Trains `cfg` into `workdir`, resuming from the newest checkpoint there."""
  cfg = _checked(cfg)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=1, sort_keys=True))
  mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
  used = set(models.transformer.PARAM_AXES) | set(models.transformer.ACT_AXES)
  table = sharding.check_rules(cfg.rules, mesh, used)
  logging.info(
    "mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count()
  )
  with jax.set_mesh(mesh), sharding.use_rules(table), preemption.watch():
    return _run(cfg, workdir, mesh, table, is_main)


def _run(cfg, workdir, mesh, table, is_main) -> RunResult:
  t_start = time.time()
  parts, counts = _assemble(cfg, workdir, mesh, table, is_main)
  data_iter = records.batches(cfg, parts.data)
  state, state_shardings = _init_state(cfg, parts)
  step_fn = _compile(cfg, parts, state, state_shardings)

  ckpt = checkpoint.Checkpointer.for_run(cfg, os.path.join(workdir, "checkpoints"))
  start, restored = ckpt.restore_latest(checkpoint.abstract_like(state, state_shardings), data_iter)
  if start:
    state = restored
    print(f"resuming from step {start} ({ckpt.directory})", flush=True)
  evaluate_fn = parts.evaluator.evaluate if parts.evaluator else None
  initial = evaluate.initial_metrics(
    workdir, evaluate_fn, None if start else state.params, write=is_main
  )
  writer = metrics.MetricWriter.for_run(cfg, workdir, is_main=is_main, resumed_from=start)
  if counts and not start:
    writer.write(0, {f"data/{k}": v for k, v in counts.items()})
  state = _loop(cfg, state, start, step_fn, data_iter, ckpt, writer, evaluate_fn)

  if parts.objective.scores:  # A trained reward model, ready for --config.reward_model=<workdir>.
    checkpoint.save_params(os.path.join(workdir, "params"), state.params)
  summary = metrics.run_summary(cfg, time.time() - t_start, counts)
  if evaluate_fn is not None:
    summary |= {"initial": initial, "final": metrics.host(evaluate_fn(state.params))}
  if is_main:
    metrics.report(workdir, summary)
  return RunResult(state=state, summary=summary)


def _checked(cfg):
  """`cfg` validated, with a Hugging Face init_checkpoint's architecture read from config.json."""
  objective = objectives.get(cfg.objective)
  if cfg.data.source != "testbed":
    preference.check_source(cfg.data.source)
  if cfg.total_steps < 1:
    raise ConfigError(f"total_steps={cfg.total_steps} must be >= 1")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if cfg[key] < 0:
      raise ConfigError(f"{key}={cfg[key]} must be >= 0")
  target.check(cfg)
  lora.check(cfg.lora)
  if lora.enabled(cfg.lora) and objective.scores:
    raise ConfigError(
      f"lora.rank={cfg.lora.rank}: objective {cfg.objective!r} trains a fresh "
      "scoring head; LoRA adapts policies only (set lora.rank=0)"
    )
  if cfg.data.udm and cfg.objective != "bco":
    raise ConfigError(f"data.udm is BCO's density-ratio matching; objective is {cfg.objective!r}")
  if not hf.is_hf_dir(cfg.init_checkpoint):
    return cfg
  cfg = cfg.copy_and_resolve_references()  # The architecture is the checkpoint's config.json.
  with cfg.unlocked():
    cfg.model.update(hf.model_config(cfg.init_checkpoint, cfg.model.to_dict()))
  return cfg


def _assemble(cfg, workdir, mesh, table, is_main) -> tuple[_Parts, dict]:
  """The objective, the model, the exact evaluator and the records (with their counts)."""
  objective = objectives.get(cfg.objective)
  file_data = records.read_file(cfg, objective.data, cfg.model.vocab_size)  # Bad data fails fast.
  lm_dir = cfg.init_checkpoint
  if lm_dir == "testbed":  # The cached base LM, pretrained on first use.
    lm_dir = os.path.join(testbed_base.ensure(cfg, pretrain=run), "params")
  model = loading.build(cfg, lm_dir=lm_dir, needs_ref=objective.needs_ref, mesh=mesh, table=table)
  if is_main:
    metrics.banner(cfg, workdir, model, mesh)
  tb = task.make(cfg.testbed) if cfg.data.source == "testbed" else None
  evaluator = None
  if tb is not None and objective.scores:  # Reward models: pair accuracy on chain samples.
    evaluator = evaluate.make_reward_model_evaluator(
      cfg, objective.reward, tb, model.graphdef, mesh
    )
  elif tb is not None:  # The evaluation merges LoRA adapters into the frozen base.
    merge = functools.partial(jax.jit(model.merge), model.ref_params) if model.merge else None
    start = model.ref_params if merge else model.trainable
    evaluator = evaluate.make_evaluator(
      cfg, objective.data, tb, model.graphdef, start, mesh, to_model=merge or (lambda p: p)
    )
  data, counts = records.assemble(
    cfg,
    objective.data,
    needs_ref=objective.needs_ref,
    tb=tb,
    file_data=file_data,
    model=model,
    base_logp_XxY=evaluator.ref_XxY if evaluator else None,
    mesh=mesh,
    workdir=workdir,
  )
  return _Parts(objective, model, evaluator, file_data, data, mesh, table), counts


def _init_state(cfg, parts: _Parts):
  """(the step-0 train state, its shardings): `state_shardings`, created in place."""
  tb = parts.evaluator.tb if parts.evaluator else None
  num_contexts = len(tb.prompts_XxP) if tb else len(parts.data.get("prompt_index", ()))
  init = state_init(cfg, parts.objective, num_contexts)
  trainable = parts.model.trainable
  shardings = state_shardings(jax.eval_shape(init, trainable), trainable, parts.mesh)
  return jax.jit(init, out_shardings=shardings)(trainable), shardings


def state_shardings(state_shapes, trainable, mesh):
  """The train state's shardings: every copy of a trainable parameter (the parameters, the
  optimizer's moments, a moving anchor: a leaf whose path ends with the parameter's path and
  has its shape) sharded as the parameter, the rest (step, rng, statistics, counts) replicated.
  `trainable`: the parameters, or their ShapeDtypeStructs, carrying their shardings. (Left to
  XLA, the moments of a jitted optax init come out on one device, i.e. replicated.)"""
  flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
  by_path = {jax.tree_util.keystr(path): x for path, x in flat}
  replicated = sharding.replicated(mesh)

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    for suffix, x in by_path.items():
      if key.endswith(suffix) and x.shape == leaf.shape:
        return x.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state_shapes)


def state_init(cfg, objective: objectives.Objective, num_contexts: int):
  """trainable params -> the step-0 train state (the objective's statistics over `num_contexts`
  prompts, a moving anchor when the rollout has one)."""
  stats = objective.init_stats(num_contexts, cfg.loss.to_dict())
  tx, moving = step.optimizer(_optim(cfg)), cfg.rollout.anchor != "reference"
  return lambda p: step.init_state(p, tx, cfg.seed, stats, moving_anchor=moving)


def _anchor_update(cfg):
  return rollout.anchor_update(
    cfg.rollout.anchor, ema_rate=cfg.rollout.anchor_ema, every=cfg.rollout.anchor_every
  )


def jit_update(cfg, objective, model: loading.RunModel, mesh, state_shardings, batch_shardings):
  """The run's jitted update (state, batch, reference) -> (state, metrics), donating the state
  (align_jax/plan.py compiles it ahead of time)."""
  optim = _optim(cfg)
  bound = functools.partial(
    step.train_step,
    graphdef=model.graphdef,
    objective=objective,
    loss_cfg=cfg.loss.to_dict(),
    tx=step.optimizer(optim),
    lr_fn=step.learning_rate(optim),
    move_anchor=_anchor_update(cfg),
    merge=model.merge,
  )
  ref_shardings = model.shardings if model.ref_params is not None else None
  return jax.jit(
    bound,
    in_shardings=(state_shardings, batch_shardings, ref_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def _compile(cfg, parts: _Parts, state, state_shardings):
  """(state, host batch) -> (state, device metrics): the one host -> device copy, the rollout
  for on-policy objectives, and the jitted update, each with explicit shardings."""
  mesh, model = parts.mesh, parts.model
  batch_shardings = {
    pipeline.batch_key(k): sharding.batch_sharding(mesh, v.ndim) for k, v in parts.data.items()
  }
  batch_shardings["example_mask_B"] = sharding.batch_sharding(mesh, 1)
  make_batch = reward_params = None
  if parts.objective.data == "prompts":  # On-policy: the rollout turns prompts into the batch.
    make_batch, reward_params, batch_shardings = _compile_rollout(
      cfg, parts, state, state_shardings, batch_shardings
    )
  update = jit_update(cfg, parts.objective, model, mesh, state_shardings, batch_shardings)

  def step_fn(state, host_batch):
    batch = pipeline.to_global(host_batch, mesh)  # The one explicit host->device copy.
    with jax.transfer_guard("disallow"):  # Anything else implicit in the step is a bug.
      if make_batch is not None:
        batch = make_batch(
          state, batch["prompt_BxP"], batch["prompt_index_B"], model.ref_params, reward_params
        )
      return update(state, batch, model.ref_params)

  return step_fn


def _compile_rollout(cfg, parts: _Parts, state, state_shardings, prompt_shardings):
  """(the jitted rollout, the reward model's params, the shardings of the batches it makes)."""
  mesh, model, ev = parts.mesh, parts.model, parts.evaluator
  reward_fn, reward_params, reward_shardings = rewards.learned(cfg.reward_model, mesh, parts.table)
  if ev is None:
    score_fn = rewards.file_scorer(cfg, reward_fn)
  else:
    reward_XxY = target.training_reward(cfg, ev.tb, ev.ref_XxY)
    score_fn = task.scorer(ev.tb, ev.potential_XxY, reward_fn, reward_XxY)
  prompts = [
    jax.ShapeDtypeStruct((cfg.data.batch_size, *parts.data[k].shape[1:]), parts.data[k].dtype)
    for k in ("prompt_P", "prompt_index")
  ]
  rollout_args = (state, *prompts, model.ref_params, reward_params)
  make_batch, out_shardings = jit_rollout(
    cfg,
    parts.objective,
    model,
    mesh,
    score_fn,
    records.sampling_config(cfg, parts.file_data),
    rollout_args,
    (state_shardings, prompt_shardings["prompt_BxP"], prompt_shardings["prompt_index_B"]),
    reward_shardings,
  )
  return make_batch, reward_params, out_shardings


def jit_rollout(
  cfg, objective, model, mesh, score_fn, sampling_cfg, args, arg_shardings, reward_shardings
):
  """(the run's jitted rollout (state, prompts, prompt ids, reference, reward params) -> batch,
  the batch's shardings); `args` are those arguments or their shapes, `arg_shardings` the first
  three's shardings (align_jax/plan.py compiles it ahead of time)."""
  roll = functools.partial(
    rollout.rollout,
    graphdef=model.graphdef,
    score_fn=score_fn,
    sampling_cfg=sampling_cfg,
    merge=model.merge,
    num_policy=cfg.rollout.num_policy,
    num_anchor=cfg.rollout.num_anchor,
    anchor_is_ref=_anchor_update(cfg) is None,
    greedy=objective.greedy,
  )
  shapes = jax.eval_shape(roll, *args)
  out_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in shapes.items()}
  in_shardings = (*arg_shardings, model.shardings, reward_shardings)
  return jax.jit(roll, in_shardings=in_shardings, out_shardings=out_shardings), out_shardings


def _loop(cfg, state, start, step_fn, data_iter, ckpt, writer, evaluate_fn):
  """Steps start+1 .. total_steps: update, metrics one step late, evaluation, checkpoints, and a
  clean stop after a SIGTERM (checkpoint, then `Preempted`)."""
  last = cfg.total_steps
  try:
    for s in range(start + 1, last + 1):
      state, step_metrics = step_fn(state, next(data_iter))
      writer.submit(s, step_metrics)
      stop = preemption.reached(s) and s < last
      if evaluate_fn is not None and cfg.eval_every and s % cfg.eval_every == 0 and s < last:
        writer.write(s, metrics.host(evaluate_fn(state.params)))
      if stop or ckpt.should_save(s) or s == last:
        writer.flush()  # Never checkpoint a state whose step produced a non-finite loss.
        ckpt.save(s, state, data_iter, force=True)
      if stop:
        raise preemption.Preempted(s, ckpt.directory)  # After `finally` has finished the save.
    writer.flush()
  finally:
    ckpt.close()
    writer.close()
  return state


def _optim(cfg) -> types.SimpleNamespace:
  return types.SimpleNamespace(**cfg.optim.to_dict(), total_steps=cfg.total_steps)
