"""python -m align_jax.plan --config=configs/<x>.py[:arg] --topology=v5p:2x2x2 [--search]

An ahead-of-time plan of a run on a TPU slice that need not be here. With libtpu installed
(`pip install -e ".[tpu]"`), `jax.experimental.topologies` describes the chips of a slice on a CPU
host; the plan builds the run's mesh over them and compiles every jitted function the run executes
— the parameter-free train-state init, for on-policy objectives the rollout (prefill and decode
with the KV cache, scoring by the reference and a reward model), and the update — with the run's
own shardings (`train.state_init`, `train.jit_rollout`, `train.jit_update`) on ShapeDtypeStructs:
nothing is allocated. It writes plan.json and plan.md to --out and prints plan.md.

  python -m align_jax.plan --config=configs/dpo.py:model=llama3_8b --topology=v5p:2x2x2 \\
      --config.data.batch_size=32 --config.data.max_len=4096
  python -m align_jax.plan --config=configs/bond.py:model=llama3_8b,n=8 --topology=v5p:2x2x4 \\
      --config.data.batch_size=16 --config.data.prompt_len=1024 --config.sampling.max_new_tokens=256
  python -m align_jax.plan --config=configs/dpo.py:model=llama3_8b --topology=v5p:2x2x2 --search

Records are shapes from the config (data.source is not read): B = data.batch_size examples of
L = data.max_len tokens (K per format, `records.record_shapes`), prompts of P = data.prompt_len
tokens with sampling.max_new_tokens new ones. The rollout's reward model is a scoring model of the
policy's architecture (a Bradley–Terry reward model of the same size), or the architecture of
`reward_model`'s run when one is named.

Per chip, from XLA's compiled executables: argument, output, temporary bytes and the peak
against the chip's HBM (fits, or short by how much). Estimates (labelled so; no TPU ran): XLA's
cost model FLOPs and bytes (it counts a loop body once: scanned layers, log-prob chunks and the
decode loop are under-counted), and a roofline time per call from the published peak FLOP/s and
HBM bandwidth of the chip (`CHIPS`): every matmul of the traced program (`flops.jaxpr_matmul_flops`,
remat's recomputation and the decode loop's max_new_tokens steps included) at peak FLOP/s over
the chips, each decode step no faster than reading the chip's share of the weights and its KV
cache, the update no faster than reading its arguments and writing its outputs. The estimated
MFU is the project's model FLOPs (`flops.train_step_flops`; a forward-only rollout's matmuls are
its model FLOPs) over chips × peak × estimated time: a roofline bound, not a measurement.

`--search` compiles the update for every mesh (data × fsdp × tensor) that divides the chips, the
batch and the KV heads, with remat off, then policies dots, dots_no_batch, nothing (more
recomputation, less memory) until one fits; it reports them all and plans the fastest estimate
that fits. Errors (unknown topology, a mesh or batch that does not divide) are one line.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from align_jax import checkpoint, models, objectives, rewards, sampling, sharding, train
from align_jax.data import packing, pipeline, records
from align_jax.errors import Error, PlanError
from align_jax.models import flops, hf, loading, lora, presets
from align_jax.models.transformer import ACT_AXES, PARAM_AXES

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's published per-chip figures (Google Cloud TPU documentation)."""

  name: str
  peak_flops: float  # Dense bf16 FLOP/s.
  hbm_bytes: int
  hbm_bandwidth: float  # Bytes/s.


# HBM: what libtpu's compiler lets a program use (its out-of-memory message states it) of the
# published 16 / 95 / 32 GiB per chip.
CHIPS = {
  "v5e": Chip("TPU v5e", 197e12, int(15.75 * GiB), 819e9),
  "v5p": Chip("TPU v5p", 459e12, int(95.74 * GiB), 2765e9),
  "v6e": Chip("TPU v6e", 918e12, int(31.25 * GiB), 1640e9),
}
_EXAMPLES = "v5p:2x2x1 (4 chips), v5p:2x2x2 (8), v5p:4x4x4 (64), v5e:2x2 (4), v6e:2x4 (8)"
SEARCH_REMAT = ("off", "dots", "dots_no_batch", "nothing")  # Least recomputation first.


def topology(name: str) -> tuple[Chip, list]:
  """(the chip, the devices) of a TPU slice named like v5p:2x2x2; PlanError if it is not one."""
  generation = name.partition(":")[0]
  if generation not in CHIPS or not name.partition(":")[2]:
    raise PlanError(
      f"--topology={name!r} is not a TPU slice of a known generation ({', '.join(CHIPS)}); "
      f"e.g. {_EXAMPLES}"
    )
  if importlib.util.find_spec("libtpu") is None:
    raise PlanError('planning for a TPU topology needs libtpu: pip install -e ".[tpu]"')
  from jax.experimental import topologies

  # A plan opens no TPU: let several processes (plans, test workers) load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    with _quiet_stderr():  # libtpu logs that this host is no TPU worker: expected here.
      desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's message names the problem)
    reason = " ".join(str(e).split())
    raise PlanError(f"--topology={name!r}: {reason}; e.g. {_EXAMPLES}") from None
  return CHIPS[generation], list(desc.devices)


@contextlib.contextmanager
def _quiet_stderr():
  """File descriptor 2 to /dev/null for the duration (C++ logging bypasses sys.stderr)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.devnull, "w") as null:
    os.dup2(null.fileno(), 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _mesh(cfg, devices, topology_name: str):
  """The run's mesh over the slice's chips; every chip must be used."""
  n = len(devices)
  shape = tuple(cfg.mesh.shape)
  fixed = math.prod(s for s in shape if s != -1)
  if (-1 in shape and n % fixed) or (-1 not in shape and fixed != n):
    raise PlanError(
      f"mesh.shape={shape} does not divide the {n} chips of {topology_name}; e.g. "
      + ", ".join(str(m) for m in _meshes(n)[:4])
    )
  return sharding.make_mesh(shape, cfg.mesh.axes, devices=devices)


def _meshes(n: int) -> list[tuple[int, int, int]]:
  """Every (data, fsdp, tensor) whose product is n, fsdp-heavy first."""
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  out = [(d, f, n // (d * f)) for d in divisors for f in divisors if n % (d * f) == 0]
  return sorted(out, key=lambda m: (m[2], m[0]))


def _ways(mesh, table: dict, name: str) -> int:
  """How many shards the logical axis `name` is cut into on `mesh`."""
  return math.prod(mesh.shape[a] for a in table.get(name) or ())


def _reward_model(cfg, mesh, table):
  """(reward_fn, abstract params, shardings, ModelConfig) of the rollout's reward model."""
  if cfg.reward_model:
    with open(os.path.join(cfg.reward_model, "config.json")) as f:
      rm = json.load(f)
    rm_cfg, objective = models.ModelConfig(**rm["model"]), objectives.get(rm["objective"])
  else:  # A Bradley–Terry reward model of the policy's architecture.
    rm_cfg = models.ModelConfig(**{**cfg.model, "num_scores": 1})
    objective = objectives.get("bt_reward")
  graphdef, shapes, names = models.abstract(rm_cfg)
  shardings = sharding.tree_shardings(names, mesh, table)
  params = checkpoint.abstract_like(shapes, shardings)
  return rewards.reward_function(graphdef, objective), params, shardings, rm_cfg


def _file_run(cfg):
  """cfg with the testbed-only target and reward transform cleared (the plan scores by a reward
  model, as a run on file prompts does)."""
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    if cfg.target.kind != "rlhf":
      cfg.target.kind = ""
    cfg.testbed.reward_transform = ""
  return cfg


def _compile(name: str, jitted, args, while_trips: int | None = None):
  """(the measured facts of one compiled function, its output shapes). A program that does not
  fit is refused by XLA's compiler ("RESOURCE_EXHAUSTED: ... required for HLO temporaries (X)
  exceeds available HBM (Y)"): its report carries that message, the arguments' bytes per chip
  and the temporaries XLA states."""
  t0, cpu0 = time.perf_counter(), time.process_time()
  traced = jitted.trace(*args)
  report = {"name": name, "matmul_flops": flops.jaxpr_matmul_flops(traced.jaxpr, while_trips)}
  try:
    compiled = traced.lower().compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    message = " ".join(str(e).split())
    stated = [float(x) * _UNITS[u] for x, u in re.findall(r"\(([\d.]+)([KMGT])\)", message)]
    arguments = sum(_shard_bytes(x) for x in jax.tree.leaves(args))
    temporaries = int(stated[0]) if stated else 0
    return report | {
      "compile_s": round(time.perf_counter() - t0, 1),
      "compile_cpu_s": round(time.process_time() - cpu0, 1),
      "refused": message,
      "memory_per_chip": _memory(arguments, 0, 0, temporaries, 0),
      "xla_flops_per_chip": None,
      "xla_bytes_per_chip": None,
    }, traced.out_info
  seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  memory = _memory(
    m.argument_size_in_bytes,
    m.output_size_in_bytes,
    m.alias_size_in_bytes,
    m.temp_size_in_bytes,
    m.generated_code_size_in_bytes,
  )
  return report | {
    "compile_s": round(seconds, 1),
    "compile_cpu_s": round(cpu_seconds, 1),  # Tracing + compiling, all threads: less load-bound.
    "memory_per_chip": memory | {"heap_peak": m.peak_memory_in_bytes},
    "xla_flops_per_chip": float(cost.get("flops", 0.0)),
    "xla_bytes_per_chip": float(cost.get("bytes accessed", 0.0)),
  }, traced.out_info


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # XLA's memory messages: binary units.


def _memory(arguments, outputs, aliased, temporaries, code) -> dict:
  """Bytes per chip; total is what the chip holds while the function runs (donated arguments
  are reused for outputs)."""
  return {
    "arguments": arguments,
    "outputs": outputs,
    "aliased": aliased,
    "temporaries": temporaries,
    "code": code,
    "total": arguments + outputs - aliased + temporaries + code,
  }


def _shard_bytes(x) -> int:
  """Bytes of one chip's shard of an abstract array."""
  return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def plan(cfg, topology_name: str) -> dict:
  """Compiles the run of `cfg` for the slice and returns the report (module docstring)."""
  chip, devices = topology(topology_name)
  objective = objectives.get(cfg.objective)
  lora.check(cfg.lora)
  if cfg.data.pack_len:
    train.check_packing(cfg, objective)
  model_cfg = models.ModelConfig(**cfg.model)
  on_policy = objective.data == "prompts"
  d = cfg.data
  need = ("prompt_len",) if on_policy else ("max_len",)
  for key in need:
    if d[key] < 1:
      raise PlanError(f"data.{key}={d[key]}: a plan needs the sequence shapes; set it >= 1")
  mesh = _mesh(cfg, devices, topology_name)
  table = sharding.check_rules(cfg.rules, mesh, set(PARAM_AXES) | set(ACT_AXES))
  batch_ways = _ways(mesh, table, "act_batch")
  if d.batch_size % batch_ways:
    good = batch_ways * max(1, round(d.batch_size / batch_ways))
    raise PlanError(
      f"data.batch_size={d.batch_size} does not divide over the {batch_ways} batch shards "
      f"({'×'.join(table['act_batch'])} of mesh {dict(mesh.shape)}); e.g. {good}"
    )
  with jax.set_mesh(mesh), sharding.use_rules(table):
    report = _plan(cfg, objective, model_cfg, chip, mesh, table, on_policy)
  return {
    "config": {
      "name": cfg.name,
      "objective": cfg.objective,
      "model": _model_name(cfg.model),
      "mesh": dict(mesh.shape),
      "batch_size": d.batch_size,
      **({"prompt_len": d.prompt_len} if on_policy else {"max_len": d.max_len}),
      **({"max_new_tokens": cfg.sampling.max_new_tokens} if on_policy else {}),
      **(
        {"samples_per_prompt": cfg.rollout.num_policy + cfg.rollout.num_anchor} if on_policy else {}
      ),
      "remat": model_cfg.remat_policy if model_cfg.remat else "off",
      "scan_layers": model_cfg.scan_layers,
      "logits_chunk": model_cfg.logits_chunk,
      "attention_chunk": model_cfg.attention_chunk,
      "lora_rank": cfg.lora.rank,
    },
    "topology": topology_name,
    "chips": len(devices),
    "chip": dataclasses.asdict(chip),
    **report,
    "host_load_average": [round(x, 2) for x in os.getloadavg()],
  }


def _model_name(model) -> str:
  """The preset a model config equals, else its shape."""
  keys = ("family", "rope_scaling", "num_scores", *hf.SHAPE_FIELDS)
  defaults = models.ModelConfig(**{k: model[k] for k in hf.SHAPE_FIELDS})
  for name, fields in presets.PRESETS.items():
    if all(model.get(k) == fields.get(k, getattr(defaults, k)) for k in keys):
      return name
  return f"d{model.d_model}_l{model.n_layers}_v{model.vocab_size}"


def _plan(cfg, objective, model_cfg, chip, mesh, table, on_policy) -> dict:
  chips, d = mesh.size, cfg.data
  model = loading.abstract_build(cfg, needs_ref=objective.needs_ref, mesh=mesh, table=table)
  init = train.state_init(cfg, objective, d.num_examples)  # As train.py's _init_state.
  state_shapes = jax.eval_shape(init, model.trainable)
  state_shardings = train.state_shardings(state_shapes, model.trainable, mesh)
  init_report, _ = _compile(
    "init", jax.jit(init, out_shardings=state_shardings), (model.trainable,)
  )
  state = checkpoint.abstract_like(state_shapes, state_shardings)
  functions = [init_report]

  if on_policy:
    reward_fn, reward_params, reward_shardings, _ = _reward_model(cfg, mesh, table)
    sampling_cfg = sampling.SamplingConfig(**cfg.sampling)
    prompt_shapes = records.record_shapes(cfg, "prompts", objective.needs_ref)
    prompts = [
      jax.ShapeDtypeStruct(
        (d.batch_size, *shape), dtype, sharding=sharding.batch_sharding(mesh, 1 + len(shape))
      )
      for shape, dtype in prompt_shapes.values()
    ]
    prompt_shardings = [p.sharding for p in prompts]
    args = (state, *prompts, model.ref_params, reward_params, None)  # No teacher.
    make_batch, batch_shardings, _ = train.jit_rollout(
      cfg,
      objective,
      model,
      mesh,
      rewards.file_scorer(_file_run(cfg), reward_fn),
      sampling_cfg,
      args,
      (state_shardings, *prompt_shardings),
      reward_shardings,
    )
    rollout_report, batch_shapes = _compile(
      "rollout", make_batch, args, while_trips=sampling_cfg.max_new_tokens
    )
    rollout_report["estimate"] = _rollout_estimate(
      cfg, model_cfg, chip, mesh, table, rollout_report, sampling_cfg
    )
    functions.append(rollout_report)
    batch = checkpoint.abstract_like(batch_shapes, batch_shardings)
  else:
    batch = _record_batch(cfg, objective, mesh)
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)

  # Rollout rows share their prompt (P); fixed records' prompt lengths are the data's, unknown here
  # (packed rows share theirs in their own layout).
  shared = records.shared_prompt(cfg, objective, {"prompt_P": prompts[0]}) if on_policy else 0
  update = train.jit_update(cfg, objective, model, mesh, state_shardings, batch_shardings, shared)
  update_report, _ = _compile("update", update, (state, batch, model.ref_params))
  B, K, L = batch["tokens_BxKxL"].shape
  rows, length = batch["pack_tokens_BxS"].shape if d.pack_len and not on_policy else (B * K, L)
  update_report["estimate"] = _update_estimate(
    model_cfg,
    chip,
    chips,
    update_report,
    rows=rows,
    length=length,
    frozen=_frozen(objective, batch),
  )
  functions.append(update_report)
  return _summary(chip, chips, functions, on_policy)


def _record_batch(cfg, objective, mesh) -> dict:
  """The abstract batch of fixed records (`records.record_shapes`): data.batch_size records, or
  with data.pack_len data.batch_size packed rows holding pack_records record slots each."""
  d = cfg.data
  shapes = records.record_shapes(cfg, objective.data, objective.needs_ref)
  shapes["example_mask"] = ((), jnp.float32)
  rows = {}
  if d.pack_len:
    rows = packing.packed_fields(*shapes["tokens_KxL"][0], d.pack_len)
  slots = d.batch_size * (d.pack_records if d.pack_len else 1)

  def count(k):  # Packed rows: data.batch_size of them; everything else: per record slot.
    return d.batch_size if k.endswith("_S") and k in rows else slots

  return {
    pipeline.batch_key(k): jax.ShapeDtypeStruct(
      (count(k), *shape), dtype, sharding=sharding.batch_sharding(mesh, 1 + len(shape))
    )
    for k, (shape, dtype) in (shapes | rows).items()
  }


def _frozen(objective, batch) -> int:
  """Forwards of the frozen reference inside the update (as step.train_step decides)."""
  if not objective.needs_ref:
    return 0
  key = "ref_token_logp_BxKxT" if objective.granularity == "token" else "ref_logp_BxK"
  return 0 if key in batch else 1


def _update_estimate(model_cfg, chip, chips, report, *, rows, length, frozen) -> dict:
  """Roofline of the update: its matmuls at peak FLOP/s, no faster than reading its arguments and
  writing its outputs once; MFU from the model FLOPs."""
  mem = report["memory_per_chip"]
  compute_s = report["matmul_flops"] / chips / chip.peak_flops
  memory_s = (mem["arguments"] + mem["outputs"]) / chip.hbm_bandwidth
  model = flops.train_step_flops(model_cfg, rows, length, frozen_forwards=frozen)
  return _estimate(compute_s, memory_s, model, chip, chips)


def _rollout_estimate(cfg, model_cfg, chip, mesh, table, report, sampling_cfg) -> dict:
  """Roofline of the rollout: prefill and scoring at peak FLOP/s; each decode step at least the
  time of its matmuls and of reading the chip's share of the weights (gathered, in the compute
  dtype) and of every layer's KV cache for its rows. Forward only: matmul FLOPs = model FLOPs."""
  d, r = cfg.data, cfg.rollout
  chips, N = mesh.size, sampling_cfg.max_new_tokens
  S = d.prompt_len + N
  item = jnp.dtype(model_cfg.dtype).itemsize
  tensor = _ways(mesh, table, "heads")
  rows_ways = _ways(mesh, table, "act_batch")
  kv_ways = _ways(mesh, table, "act_kv_heads")
  weights = flops.matmul_params(model_cfg) * item / tensor
  draws = [count * d.batch_size for count in (r.num_policy, r.num_anchor) if count]
  draws += [d.batch_size] if objectives.get(cfg.objective).greedy else []
  decode_s, decode_flops, decode_memory_s = 0.0, 0, 0.0
  for rows in draws:
    step_flops = flops.forward_flops(model_cfg, rows, 1, kv_length=S)
    cache = 2 * model_cfg.n_layers * S * model_cfg.n_kv_heads * model_cfg.head_dim * item
    step_bytes = weights + cache * rows / rows_ways / kv_ways
    memory_s = step_bytes / chip.hbm_bandwidth
    decode_s += N * max(step_flops / chips / chip.peak_flops, memory_s)
    decode_memory_s += N * memory_s
    decode_flops += N * step_flops
  rest_s = (report["matmul_flops"] - decode_flops) / chips / chip.peak_flops
  out = _estimate(rest_s + decode_s, 0.0, report["matmul_flops"], chip, chips)
  if decode_memory_s >= decode_s / 2:  # Most decode time is spent reading HBM.
    out["bound"] = "decode: memory"
  return out | {"decode_s": decode_s, "prefill_and_scoring_s": rest_s}


def _estimate(compute_s, memory_s, model_flops, chip, chips) -> dict:
  seconds = max(compute_s, memory_s)
  return {
    "seconds": seconds,
    "bound": "compute" if compute_s >= memory_s else "memory",
    "model_flops": model_flops,
    "mfu": model_flops / (chips * chip.peak_flops * seconds) if seconds else None,
  }


def _summary(chip, chips, functions, on_policy) -> dict:
  peak = max(f["memory_per_chip"]["total"] for f in functions)
  timed = [f for f in functions if "estimate" in f]
  seconds = sum(f["estimate"]["seconds"] for f in timed)
  model = sum(f["estimate"]["model_flops"] for f in timed)
  return {
    "functions": functions,
    "fits": peak <= chip.hbm_bytes,
    "peak_bytes_per_chip": peak,
    "short_by_bytes": max(0, peak - chip.hbm_bytes),
    "estimated_step_s": seconds,
    "estimated_mfu": model / (chips * chip.peak_flops * seconds) if seconds else None,
    "step": "one rollout and one update" if on_policy else "one update",
    "compile_s": round(sum(f["compile_s"] for f in functions), 1),
    "compile_cpu_s": round(sum(f["compile_cpu_s"] for f in functions), 1),
  }


def search(cfg, topology_name: str) -> dict:
  """Plans every mesh × remat candidate (module docstring); the fastest that fits, with the list
  of candidates tried, or the list alone when none fits."""
  _, devices = topology(topology_name)
  model_cfg = models.ModelConfig(**cfg.model)
  tried, best = [], None
  for mesh in _meshes(len(devices)):
    data, fsdp, tensor = mesh
    if cfg.data.batch_size % (data * fsdp) or model_cfg.n_kv_heads % tensor:
      continue
    for remat in SEARCH_REMAT:
      candidate = _with(cfg, mesh, remat)
      report = plan(candidate, topology_name)
      tried.append(
        {
          "mesh": mesh,
          "remat": remat,
          "fits": report["fits"],
          "peak_gib": round(report["peak_bytes_per_chip"] / GiB, 2),
          "estimated_step_s": report["estimated_step_s"],
          "compile_s": report["compile_s"],
        }
      )
      print(f"search: mesh {mesh} remat {remat}: {_one_line(report)}", flush=True)
      if report["fits"]:
        if best is None or report["estimated_step_s"] < best["estimated_step_s"]:
          best = report
        break  # More recomputation would only be slower.
  if not tried:
    raise PlanError(
      f"--search: no mesh of {len(devices)} chips divides data.batch_size={cfg.data.batch_size} "
      f"and model.n_kv_heads={model_cfg.n_kv_heads}"
    )
  return (best or {"fits": False, "config": _with(cfg, tried[0]["mesh"], "nothing").to_dict()}) | {
    "search": tried
  }


def _with(cfg, mesh, remat: str):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.mesh.shape, cfg.mesh.axes = tuple(mesh), ("data", "fsdp", "tensor")
    cfg.model.remat = remat != "off"
    cfg.model.remat_policy = "nothing" if remat == "off" else remat
  return cfg


def _one_line(report: dict) -> str:
  peak = report["peak_bytes_per_chip"] / GiB
  hbm = report["chip"]["hbm_bytes"] / GiB
  fits = "fits" if report["fits"] else f"short by {report['short_by_bytes'] / GiB:.1f} GiB"
  return (
    f"{peak:.1f} of {hbm:.0f} GiB per chip ({fits}), estimated {report['estimated_step_s']:.3g} s "
    f"per step, compiled in {report['compile_s']:.0f} s"
  )


def markdown(report: dict, command: str = "") -> str:
  """plan.md: the configuration, the per-chip memory and the estimates of each function."""
  c, gib = report["config"], lambda x: f"{x / GiB:.2f}"
  lines = [f"# Plan: {c['objective']} · {c['model']} on {report['topology']}", ""]
  if command:
    lines += [f"`{command}`", ""]
  shape = (
    f"{c['batch_size']} prompts × {c['samples_per_prompt']} samples, "
    f"{c['prompt_len']} + {c['max_new_tokens']} tokens"
    if "prompt_len" in c
    else f"{c['batch_size']} examples × {c['max_len']} tokens"
  )
  fits = (
    "fits" if report["fits"] else f"does not fit (short by {gib(report['short_by_bytes'])} GiB)"
  )
  lines += [
    f"- {report['chips']} chips of {report['chip']['name']} "
    f"({gib(report['chip']['hbm_bytes'])} GiB usable HBM each), mesh {c['mesh']}",
    f"- {shape}; remat {c['remat']}, scan_layers {c['scan_layers']}, "
    f"logits_chunk {c['logits_chunk']}, attention_chunk {c.get('attention_chunk')}, "
    f"LoRA rank {c['lora_rank']}",
    f"- **{fits}**: peak {gib(report['peak_bytes_per_chip'])} GiB per chip",
    f"- estimated {report['step']}: {report['estimated_step_s']:.3g} s, MFU ≤ "
    f"{100 * (report['estimated_mfu'] or 0):.0f} % (roofline estimates, see below)",
    f"- compiled in {report['compile_s']:.0f} s ({report['compile_cpu_s']:.0f} s of CPU) on "
    f"this host (load average "
    f"{', '.join(map(str, report['host_load_average']))})",
    "",
    "| function | compile s | arguments GiB | outputs GiB | temporaries GiB | total GiB | "
    "XLA TFLOP | XLA GB | matmul TFLOP | est. s | bound | est. MFU |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for f in report["functions"]:
    m, e = f["memory_per_chip"], f.get("estimate")
    xla = (
      "refused | — "
      if "refused" in f
      else f"{f['xla_flops_per_chip'] / 1e12:.3g} | {f['xla_bytes_per_chip'] / 1e9:.3g}"
    )
    estimate = (
      f"{e['seconds']:.3g} | {e['bound']} | {100 * (e['mfu'] or 0):.0f} %" if e else " | | "
    )
    lines.append(
      f"| {f['name']} | {f['compile_s']:.0f} | {gib(m['arguments'])} | {gib(m['outputs'])} | "
      f"{gib(m['temporaries'])} | {gib(m['total'])} | {xla} | {f['matmul_flops'] / 1e12:.4g} | "
      f"{estimate} |"
    )
  for f in report["functions"]:
    if "refused" in f:
      lines += ["", f"XLA refused {f['name']}: {f['refused'][:400]}"]
  if "search" in report:
    lines += ["", "Search (update compiled per candidate):", ""]
    lines += ["| mesh (data, fsdp, tensor) | remat | fits | peak GiB | est. s | compile s |"]
    lines += ["|---|---|---|---|---|---|"]
    for t in report["search"]:
      lines.append(
        f"| {tuple(t['mesh'])} | {t['remat']} | {t['fits']} | {t['peak_gib']} | "
        f"{t['estimated_step_s']:.3g} | {t['compile_s']} |"
      )
  lines += [
    "",
    "Memory is per chip, from XLA's compiled executables (total: arguments + outputs − donated",
    "+ temporaries + code; the peak is the largest function's; a function XLA refuses for lack",
    "of HBM counts its arguments and the temporaries XLA states). XLA TFLOP / GB: its cost model",
    "per chip, which counts a loop body once (scanned layers, log-prob chunks, the decode loop).",
    "Matmul TFLOP: every matmul of the traced program, all chips (remat's recomputation and every",
    "decode step included). The estimated times are rooflines from the chip's published peak",
    "FLOP/s and HBM bandwidth, and the MFU is the model FLOPs over chips × peak × that time:",
    "upper bounds, not measurements.",
  ]
  return "\n".join(lines) + "\n"


def write(report: dict, out_dir: str, command: str = "") -> str:
  """Writes plan.json and plan.md into out_dir; returns the markdown."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "plan.json"), "w") as f:
    json.dump({**report, "command": command}, f, indent=1, default=str)
  text = markdown(report, command)
  with open(os.path.join(out_dir, "plan.md"), "w") as f:
    f.write(text)
  return text


# What a config file and its overrides can raise while loading; each is reported as one line.
_CONFIG_ERRORS = (ValueError, FileNotFoundError, KeyError, AttributeError, TypeError, OSError)


def _define_flags():
  """The command's flags (defined when run, so that importing this module defines none)."""
  config = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally `path:arg` (e.g. configs/dpo.py:model=llama3_8b)."
  )
  topology_flag = flags.DEFINE_string("topology", None, "A TPU slice, e.g. v5p:2x2x2 (8 chips).")
  search_flag = flags.DEFINE_bool("search", False, "Try mesh splits and remat policies.")
  out = flags.DEFINE_string("out", None, "Where plan.json / plan.md go (default plans/<name>).")
  flags.mark_flags_as_required(["config", "topology"])
  return config, topology_flag, search_flag, out


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *_CONFIG_ERRORS) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")


def _main(argv, config, topology_flag, search_flag, out):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    cfg = config.value
    name = topology_flag.value
    report = search(cfg, name) if search_flag.value else plan(cfg, name)
  except Error as e:
    sys.exit(f"error: {e}")
  except _CONFIG_ERRORS as e:  # The config file or an override.
    sys.exit(f"error: {' '.join(str(e).split())}")
  if "functions" not in report:
    tried = "; ".join(
      f"{t['mesh']} remat {t['remat']}: {t['peak_gib']} GiB" for t in report["search"]
    )
    sys.exit(f"error: --search: no candidate fits {name} ({tried})")
  default = f"{cfg.name}_{report['config']['model']}_{name.replace(':', '-')}"
  out_dir = out.value or os.path.join("plans", default)
  command = "python -m align_jax.plan " + " ".join(sys.argv[1:])
  print(write(report, out_dir, command), end="")
  print(f"written: {out_dir}/plan.json, {out_dir}/plan.md")


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: _main(argv, *_flags), flags_parser=_parse_flags)
