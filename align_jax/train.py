"""`run(cfg, workdir)`: the run, as a table of contents.

checks → mesh → the workdir's claim → model and parameters → data → evaluator → train state and the
jitted step → resume → loop → summary. Each piece lives in its room: the start-up checks in
`config_lib.py` (and each objective's), the workdir's lock and fingerprint in `workdir.py`,
parameters in `models/loading.py`, records in `data/records.py`, exact evaluation in
`testbed/evaluate.py` (file data: validation on held-out records in `validate.py`), the testbed's
base LM in `testbed/base.py`, on-policy batches in `rollout.py`, the update in `step.py`,
checkpoints in `checkpoint.py`. Resume order: a checkpoint in the workdir > `init_checkpoint` > a
fresh init.
"""

import dataclasses
import functools
import json
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from align_jax import checkpoint, config_lib, metrics, models, objectives, preemption, rewards
from align_jax import rollout, sharding, step, validate
from align_jax import workdir as workdir_lib
from align_jax.data import packing, pipeline, preference, records
from align_jax.errors import ConfigError, NonFiniteError
from align_jax.models import hf, loading, lora, presets
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
  file_data: tuple | None  # A file source's (records, counts, text format, held-out records).
  data: dict  # The record arrays the pipeline batches.
  mesh: jax.sharding.Mesh
  table: dict  # The logical-axis rules.
  teacher: loading.Teacher | None = None  # A frozen teacher LM (distillation).


def run(cfg, workdir: str, *, allow_config_change: bool = False) -> RunResult:
  """Trains `cfg` into `workdir`, resuming from the newest checkpoint there.

  Nothing in `workdir` is written or deleted before the config is validated, the workdir locked
  and its fingerprint checked (`align_jax/workdir.py`); `allow_config_change` lets a resume change
  the hyperparameters in `workdir.SAFE`, recorded in metrics.jsonl.
  """
  cfg = _checked(cfg)
  mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
  used = set(models.transformer.PARAM_AXES) | set(models.transformer.ACT_AXES)
  table = sharding.check_rules(cfg.rules, mesh, used)
  sharding.check_batch(cfg.data.batch_size, mesh, table)
  logging.info(
    "mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count()
  )
  resolved = json.loads(cfg.to_json_best_effort())
  claim = workdir_lib.claim(
    workdir,
    resolved,
    allow_change=allow_config_change,
    process=jax.process_index(),
    defaults=json.loads(config_lib.base().to_json_best_effort()),
  )
  with claim as claimed, jax.set_mesh(mesh), sharding.use_rules(table), preemption.watch():
    return _run(cfg, claimed, mesh, table)


def _run(cfg, claimed: workdir_lib.Claim, mesh, table) -> RunResult:
  t_start, is_main, workdir = time.time(), jax.process_index() == 0, claimed.path
  parts, counts = _assemble(cfg, workdir, mesh, table, is_main)
  data_iter = records.batches(cfg, parts.data, parts.objective, counts)
  state, state_shardings = _init_state(cfg, parts)
  step_fn, state, state_shardings = _compile(cfg, parts, state, state_shardings)

  ckpt = checkpoint.Checkpointer.for_run(cfg, os.path.join(workdir, workdir_lib.CHECKPOINTS))
  start, restored = ckpt.restore_latest(checkpoint.abstract_like(state, state_shardings), data_iter)
  if start:
    state = restored
    print(f"resuming from step {start} ({ckpt.directory})", flush=True)
  claimed.record()  # config.json and the fingerprint, now that the run has its state.
  evaluate_fn = parts.evaluator.evaluate if parts.evaluator else validate.make(cfg, parts)
  initial = evaluate.initial_metrics(
    workdir, evaluate_fn, None if start else state.params, write=is_main
  )
  writer = metrics.MetricWriter.for_run(
    cfg, workdir, is_main=is_main, resumed_from=start, config_change=claimed.changes
  )
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


def check_packing(cfg, objective) -> None:
  """data.pack_len packs fixed records whose log-probs the step gathers back (ConfigError else)."""
  why = None
  if objective.data == "prompts":
    why = "its batches are rollouts of prompts, not fixed records"
  elif objective.scores or objective.granularity == "distribution":
    why = "it reads each response's own row (scores, or whole next-token distributions)"
  elif (cfg.rollout.updates_per_batch, cfg.rollout.minibatches) != (1, 1):
    why = "rollout.updates_per_batch / rollout.minibatches slice a batch's records, not its rows"
  if why:
    raise ConfigError(
      f"data.pack_len={cfg.data.pack_len} does not apply to objective {cfg.objective!r}: {why}"
    )


def _checked(cfg):
  """`cfg` validated, with a Hugging Face init_checkpoint's architecture read from config.json."""
  objective = objectives.get(cfg.objective)
  if cfg.data.source != "testbed":
    preference.check_source(cfg.data.source)
  config_lib.check(cfg, objective.checks, f" (objective {cfg.objective!r})")
  config_lib.check(cfg, config_lib.CHECKS)
  target.check(cfg)
  lora.check(cfg.lora)
  if lora.enabled(cfg.lora) and objective.scores:
    raise ConfigError(
      f"lora.rank={cfg.lora.rank}: objective {cfg.objective!r} trains a fresh "
      "scoring head; LoRA adapts policies only (set lora.rank=0)"
    )
  if cfg.data.pack_len:
    check_packing(cfg, objective)
  if cfg.data.udm and cfg.objective != "bco":
    raise ConfigError(f"data.udm is BCO's density-ratio matching; objective is {cfg.objective!r}")
  if not hf.is_hf_dir(cfg.init_checkpoint):
    return cfg
  cfg = cfg.copy_and_resolve_references()  # The architecture is the checkpoint's config.json.
  with cfg.unlocked():
    cfg.model = hf.model_config(
      cfg.init_checkpoint, cfg.model.to_dict(), presets.fresh(cfg.get("model_preset", ""))
    )
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
  teacher = _teacher(cfg, objective, mesh, table)
  teacher_XxY = None
  if tb is not None and teacher is not None:  # Its exact distribution: the distillation target.
    exact_fn = task.exact_logp_fn(teacher.graphdef, tb, cfg.testbed.eval_chunk)
    teacher_XxY = jax.jit(exact_fn, out_shardings=sharding.replicated(mesh))(teacher.params)
  evaluator = None
  if tb is not None and objective.scores:  # Reward models: pair accuracy on chain samples.
    evaluator = evaluate.make_reward_model_evaluator(
      cfg, objective.reward, tb, model.graphdef, mesh
    )
  elif tb is not None:  # The evaluation merges LoRA adapters into the frozen base.
    merge = functools.partial(jax.jit(model.merge), model.ref_params) if model.merge else None
    start = model.ref_params if merge else model.trainable
    evaluator = evaluate.make_evaluator(
      cfg,
      objective.data,
      tb,
      model.graphdef,
      start,
      mesh,
      to_model=merge or (lambda p: p),
      teacher_XxY=teacher_XxY,
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
  return _Parts(objective, model, evaluator, file_data, data, mesh, table, teacher), counts


def _teacher(cfg, objective, mesh, table) -> loading.Teacher | None:
  """The run's teacher LM (`teacher.path`), or None; "testbed" is the cached base LM of
  `teacher.model`'s architecture, pretrained on first use."""
  needs = {
    f"objective {cfg.objective!r}": objective.granularity == "distribution",
    "rollout.anchor=teacher": cfg.rollout.anchor == "teacher",
  }
  if not cfg.teacher.path:
    for what, needed in needs.items():
      if needed:
        raise ConfigError(f"{what} needs a teacher: set teacher.path (a teacher LM)")
    return None
  path = cfg.teacher.path
  loading.teacher_model(cfg, path)  # Its vocabulary is checked before anything is loaded.
  if path == "testbed":
    base_cfg = cfg.copy_and_resolve_references()
    with base_cfg.unlocked():
      base_cfg.model = models.preset(cfg.teacher.model) if cfg.teacher.model else cfg.model
    path = os.path.join(testbed_base.ensure(base_cfg, pretrain=run), "params")
  return loading.build_teacher(cfg, path=path, mesh=mesh, table=table)


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
  moving = cfg.rollout.anchor not in ("reference", "teacher")
  tx = step.optimizer(_optim(cfg))
  return lambda p: step.init_state(p, tx, cfg.seed, stats, moving_anchor=moving)


def _anchor_update(cfg):
  return rollout.anchor_update(
    cfg.rollout.anchor, ema_rate=cfg.rollout.anchor_ema, every=cfg.rollout.anchor_every
  )


def jit_update(
  cfg, objective, model: loading.RunModel, mesh, state_shardings, batch_shardings, shared_prompt=0
):
  """The run's jitted update (state, batch, reference) -> (state, metrics), donating the state
  (align_jax/plan.py compiles it ahead of time); `shared_prompt` from `records.shared_prompt`."""
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
    shared_prompt=shared_prompt,
    log_steps=(max(cfg.log_every, 1), cfg.total_steps),  # metrics.MetricWriter's steps.
  )
  ref_shardings = model.shardings if model.ref_params is not None else None
  return jax.jit(
    bound,
    in_shardings=(state_shardings, batch_shardings, ref_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def _compile(cfg, parts: _Parts, state, state_shardings):
  """(step_fn, state, state shardings): step_fn(state, host batch, step) -> (state, device
  metrics) is the one host -> device copy, the rollout for on-policy objectives, and the jitted
  update, each with explicit shardings. When one rollout feeds several updates the state carries
  the rollout (`TrainState.rollout`), and the host batch is None between rollouts."""
  mesh, model = parts.mesh, parts.model
  ndims = {k: v.ndim for k, v in parts.data.items()}
  if cfg.data.pack_len:  # The records' fields, and the rows that hold them.
    ndims = packing.batch_ndims(parts.data, cfg.data.pack_len)
  batch_shardings = {
    pipeline.batch_key(k): sharding.batch_sharding(mesh, ndim) for k, ndim in ndims.items()
  }
  batch_shardings["example_mask_B"] = sharding.batch_sharding(mesh, 1)
  make_batch = reward_params = take = None
  if parts.objective.data == "prompts":  # On-policy: the rollout turns prompts into the batch.
    make_batch, reward_params, batch_shapes = _compile_rollout(
      cfg, parts, state, state_shardings, batch_shardings
    )
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch_shapes.items()}
  r = cfg.rollout
  if (r.updates_per_batch, r.minibatches) != (1, 1):  # One rollout, several updates.
    rows = rollout.minibatch_rows(
      cfg.data.batch_size if make_batch is None else batch_shapes["example_mask_B"].shape[0],
      updates_per_batch=r.updates_per_batch,
      minibatches=r.minibatches,
      on_policy=make_batch is not None,
      shards=sharding.batch_shards(mesh),
    )
    state, state_shardings, take = _rollout_buffer(
      cfg, state, state_shardings, batch_shapes, batch_shardings, rows
    )
  # Packed rows share prompts in their own layout (align_jax/data/packing.py).
  shared = 0 if cfg.data.pack_len else records.shared_prompt(cfg, parts.objective, parts.data)
  if cfg.data.pack_len:
    logging.info(
      "data.pack_len: records packed %d to a row of %d slots at most",
      cfg.data.pack_records,
      cfg.data.pack_len,
    )
  if shared:
    logging.info("data.share_prompt: each example's responses share one row after its prompt")
  update = jit_update(cfg, parts.objective, model, mesh, state_shardings, batch_shardings, shared)

  def step_fn(state, host_batch, s):
    if host_batch is not None:
      batch = pipeline.to_global(host_batch, mesh)  # The one explicit host->device copy.
    with jax.transfer_guard("disallow"):  # Anything else implicit in the step is a bug.
      if host_batch is not None and make_batch is not None:
        batch = make_batch(
          dataclasses.replace(state, rollout={}),  # The previous rollout is not an input.
          batch["prompt_BxP"],
          batch["prompt_index_B"],
          model.ref_params,
          reward_params,
          _teacher_inputs(cfg, parts)[0],
        )
      if take is None:
        return update(state, batch, model.ref_params)
      if host_batch is not None:
        state = dataclasses.replace(state, rollout=batch)
      return update(state, take(state.rollout, (s - 1) % r.minibatches), model.ref_params)

  return step_fn, state, state_shardings


def _teacher_inputs(cfg, parts: _Parts) -> tuple:
  """(params, shardings) of the teacher for the rollout, which reads it for its distributions
  (distillation objectives) or its samples (a teacher anchor); (None, None) otherwise."""
  t, reads = parts.teacher, parts.objective.granularity == "distribution"
  if t is None or not (reads or cfg.rollout.anchor == "teacher"):
    return None, None
  return t.params, t.shardings


def _prompt_shapes(cfg, parts: _Parts) -> list:
  return [
    jax.ShapeDtypeStruct((cfg.data.batch_size, *parts.data[k].shape[1:]), parts.data[k].dtype)
    for k in ("prompt_P", "prompt_index")
  ]


def _rollout_buffer(cfg, state, state_shardings, shapes, shardings, rows):
  """(state with a zero rollout buffer, its shardings, take(buffer, m) -> mini-batch m: its rows
  [m·rows, (m + 1)·rows)) for several updates on each rollout, whose fields have `shapes`."""
  mesh = next(iter(shardings.values())).mesh
  zeros = jax.jit(
    lambda: {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()},
    out_shardings=shardings,
  )()
  state = dataclasses.replace(state, rollout=zeros)
  state_shardings = dataclasses.replace(state_shardings, rollout=shardings)
  starts = [
    jax.device_put(np.int32(m * rows), sharding.replicated(mesh))
    for m in range(cfg.rollout.minibatches)
  ]
  slice_fn = jax.jit(
    lambda buffer, start: {
      k: jax.lax.dynamic_slice_in_dim(v, start, rows) for k, v in buffer.items()
    },
    out_shardings=shardings,
  )
  return state, state_shardings, lambda buffer, m: slice_fn(buffer, starts[m])


def _compile_rollout(cfg, parts: _Parts, state, state_shardings, prompt_shardings):
  """(the jitted rollout, the reward model's params, the shardings of the batches it makes)."""
  mesh, model, ev = parts.mesh, parts.model, parts.evaluator
  reward_fn, reward_params, reward_shardings = rewards.learned(cfg.reward_model, mesh, parts.table)
  if ev is None:
    score_fn = rewards.file_scorer(cfg, reward_fn)
  else:
    reward_XxY = target.training_reward(cfg, ev.tb, ev.ref_XxY)
    score_fn = task.scorer(ev.tb, ev.potential_XxY, reward_fn, reward_XxY)
  teacher_params, teacher_shardings = _teacher_inputs(cfg, parts)
  args = (state, *_prompt_shapes(cfg, parts), model.ref_params, reward_params, teacher_params)
  make_batch, _, shapes = jit_rollout(
    cfg,
    parts.objective,
    model,
    mesh,
    score_fn,
    records.sampling_config(cfg, parts.file_data),
    args,
    (state_shardings, prompt_shardings["prompt_BxP"], prompt_shardings["prompt_index_B"]),
    reward_shardings,
    parts.teacher,
    teacher_shardings,
  )
  return make_batch, reward_params, shapes


def jit_rollout(
  cfg,
  objective,
  model,
  mesh,
  score_fn,
  sampling_cfg,
  args,
  arg_shardings,
  reward_shardings,
  teacher=None,
  teacher_shardings=None,
):
  """(the run's jitted rollout (state, prompts, prompt ids, reference, reward params[, teacher
  params]) -> batch, the batch's shardings, its shapes); `args` are those arguments or their
  shapes, `arg_shardings` the first three's shardings (align_jax/plan.py compiles it ahead of
  time); `teacher` a `loading.Teacher` for distillation."""
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
    informative_prompts=cfg.rollout.informative_prompts,
    teacher_graphdef=teacher.graphdef if teacher else None,
    anchor_is_teacher=cfg.rollout.anchor == "teacher",
    teacher_distributions=objective.granularity == "distribution",
    shared_prompt=records.shared_prompt(cfg, objective, {"prompt_P": args[1]}),
  )
  shapes = jax.eval_shape(roll, *args)
  out_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in shapes.items()}
  in_shardings = (*arg_shardings, model.shardings, reward_shardings, teacher_shardings)
  jitted = jax.jit(roll, in_shardings=in_shardings, out_shardings=out_shardings)
  return jitted, out_shardings, shapes


def _loop(cfg, state, start, step_fn, data_iter, ckpt, writer, evaluate_fn):
  """Steps start+1 .. total_steps: update, metrics one step late, evaluation, checkpoints (of
  finite states only: metrics are flushed and checked first), and a clean stop after a SIGTERM
  (checkpoint, then `Preempted`)."""
  last, period = cfg.total_steps, cfg.rollout.updates_per_batch * cfg.rollout.minibatches
  try:
    for s in range(start + 1, last + 1):  # A rollout's later updates take no new batch.
      state, step_metrics = step_fn(state, next(data_iter) if (s - 1) % period == 0 else None, s)
      writer.submit(s, step_metrics)
      stop = preemption.reached(s) and s < last
      if evaluate_fn is not None and cfg.eval_every and s % cfg.eval_every == 0 and s < last:
        writer.write(s, metrics.host(evaluate_fn(state.params)))
      if stop or ckpt.should_save(s) or s == last:
        writer.flush()  # Raises NonFiniteError before a non-finite state can be saved.
        ckpt.save(s, state, data_iter, force=True)
      if stop:
        raise preemption.Preempted(s, ckpt.directory)  # After `finally` has finished the save.
    writer.flush()
  except NonFiniteError as e:  # Checkpoints hold finite states only: name the newest.
    newest = ckpt.newest()
    raise NonFiniteError(
      f"{e}; stopped, no checkpoint was saved before it"
      if newest is None
      else f"{e}; stopped, the newest checkpoint (finite) is step {newest} in {ckpt.directory}: "
      "resume from it with a changed optim.lr (or another loss.*/optim.* field) and "
      "--allow_config_change"
    ) from None
  finally:
    ckpt.close()
    writer.close()
  return state


def _optim(cfg) -> types.SimpleNamespace:
  return types.SimpleNamespace(**cfg.optim.to_dict(), total_steps=cfg.total_steps)
