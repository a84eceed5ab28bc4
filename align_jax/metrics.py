"""Metrics out of the loop: fetched one step late, checked for NaN/Inf, written three ways.

The check covers the loss, the gradient norm and the step's `finite_state` (1 when every float of
the updated parameters and optimizer state is finite, `step.train_step`); the loop flushes before
each checkpoint, so only finite states are saved.

Each logged step becomes one line of `metrics.jsonl` (always with "step"), TensorBoard scalars, and
a console line with steps/s and ETA. Files are appended to across resumes, never rewritten. A resume
from step s appends `{"step": s, "resumed_from": s}` (with `"config_change": {key: [old, new]}`
when `--allow_config_change` let hyperparameters change): records of steps after s written before it
(a run killed after its last checkpoint) are superseded by those that follow it. TensorBoard hides
them itself (a new event file whose purge step is s + 1).
"""

import json
import math
import os
import subprocess
import sys
import time

import jax
import numpy as np

from align_jax.errors import NonFiniteError


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is
  installed, only to accept torch tensors (a run never passes one), which costs every run ~1.7 s
  of start-up."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX goes without.
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules["torch"]  # A later `import torch` imports it as usual.
  return SummaryWriter


class MetricWriter:
  def __init__(
    self,
    workdir: str,
    *,
    total_steps: int,
    log_every: int,
    is_main: bool = True,
    resumed_from: int = 0,
    config_change: dict | None = None,
  ):
    self._total, self._every, self._main = total_steps, max(log_every, 1), is_main
    self._pending: tuple[int, dict] | None = None
    self._last_time, self._last_step = time.time(), None
    self._jsonl = self._tb = None
    if is_main:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      marker = {"resumed_from": resumed_from} if resumed_from else {}
      marker |= {"config_change": config_change} if config_change else {}
      if marker:
        self._jsonl.write(json.dumps({"step": resumed_from, **marker}) + "\n")
        self._jsonl.flush()
      self._tb = _summary_writer()(
        os.path.join(workdir, "tensorboard"), purge_step=resumed_from + 1 if resumed_from else None
      )

  @classmethod
  def for_run(
    cls, cfg, workdir: str, *, is_main: bool, resumed_from: int, config_change: dict | None = None
  ) -> "MetricWriter":
    return cls(
      workdir,
      total_steps=cfg.total_steps,
      log_every=cfg.log_every,
      is_main=is_main,
      resumed_from=resumed_from,
      config_change=config_change,
    )

  def submit(self, step: int, metrics: dict) -> None:
    """Queues `step`'s device metrics and handles the previous step's (one step late)."""
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    """Fetches and handles the queued metrics now (before checkpoints and at the end)."""
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for key in ("loss", "grad_norm"):
      if key in values and not math.isfinite(values[key]):
        raise NonFiniteError(f"non-finite {key}={values[key]} at step {step}")
    if values.get("finite_state", 1.0) != 1.0:
      raise NonFiniteError(f"non-finite parameters or optimizer state after step {step}")
    if step % self._every == 0 or step == self._total:
      self._log(step, values)

  def _log(self, step: int, values: dict) -> None:
    now = time.time()
    if self._last_step is not None and step > self._last_step:
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
      values["perf/steps_per_s"] = rate
      eta = (self._total - step) / rate
    else:
      eta = None
    self._last_time, self._last_step = now, step
    self.write(step, values)
    if self._main:
      keys = [
        k for k in ("loss", "objective/accuracy", "objective/margin", "grad_norm") if k in values
      ]
      shown = " | ".join(f"{k.split('/')[-1]} {values[k]:.4g}" for k in keys)
      rate = (
        f" | {values['perf/steps_per_s']:.1f} steps/s | ETA {eta:.0f}s" if eta is not None else ""
      )
      print(f"step {step}/{self._total} | {shown}{rate}", flush=True)

  def write(self, step: int, values: dict) -> None:
    """Appends one record (e.g. exact evaluation) at `step`."""
    if not self._main:
      return
    clean = {k: float(np.asarray(v)) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._main:
      self._jsonl.close()
      self._tb.close()


def run_summary(cfg, wall_time_s: float, counts: dict) -> dict:
  """summary.json's run facts: steps, wall time, device, commit and the data counts."""
  return {
    "steps": cfg.total_steps,
    "wall_time_s": wall_time_s,
    "device_kind": jax.devices()[0].device_kind,
    "num_devices": jax.device_count(),
    "commit": commit(),
    **{f"data/{k}": v for k, v in counts.items()},
  }


def host(metrics: dict) -> dict:
  """Device scalars -> Python floats."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


# ---- The console's banner and final report --------------------------------------------------


def banner(cfg, workdir, model, mesh) -> None:
  """What runs, on what, and where its results go (the detail is in <workdir>/log.txt)."""
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(model.shapes))
  trained = sum(math.prod(x.shape) for x in jax.tree.leaves(model.trainable))
  lora_note = f", {trained:,} trained (LoRA)" if model.merge is not None else ""
  devices = f"{mesh.size} {jax.devices()[0].platform} device(s)"
  print(
    f"align_jax | {cfg.name or 'run'} | objective {cfg.objective} | model {count:,} "
    f"parameters{lora_note} | mesh {dict(mesh.shape)} over {devices}, "
    f"{jax.process_count()} process(es) | workdir {workdir}",
    flush=True,
  )


def report(workdir, summary) -> None:
  """Writes summary.json; prints the evaluation's table (exact or validation metrics) and where
  the results are."""
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  if "final" in summary:
    initial, final = summary["initial"], summary["final"]
    title = "validation metric" if all(k.startswith("eval/") for k in final) else "exact metric"
    print(f"\n{title:<36}{'initial':>12}{'final':>12}")
    for k in final:
      print(f"{k:<36}{initial.get(k, float('nan')):>12.5f}{final[k]:>12.5f}")
  print(
    f"\nresults: {workdir}/summary.json, {workdir}/metrics.jsonl, {workdir}/log.txt; "
    f"curves: tensorboard --logdir {workdir}/tensorboard",
    flush=True,
  )


def commit() -> str | None:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      timeout=5,
      cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    return out.stdout.strip() or None
  except OSError:
    return None
