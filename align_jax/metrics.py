"""Metrics out of the loop: fetched one step late, checked for NaN/Inf, written three ways.

Each logged step becomes one line of `metrics.jsonl` (always with "step"), TensorBoard scalars, and
a console line with steps/s and ETA. Files are appended to across resumes, never rewritten. A resume
from step s appends `{"step": s, "resumed_from": s}`: records of steps after s written before it
(a run killed after its last checkpoint) are superseded by those that follow it. TensorBoard hides
them itself (a new event file whose purge step is s + 1).
"""

import json
import math
import os
import time

import jax
import numpy as np
from absl import logging


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN or Inf."""


class MetricWriter:

  def __init__(self, workdir: str, *, total_steps: int, log_every: int, is_main: bool = True,
               resumed_from: int = 0):
    self._total, self._every, self._main = total_steps, max(log_every, 1), is_main
    self._pending: tuple[int, dict] | None = None
    self._last_time, self._last_step = time.time(), None
    self._jsonl = self._tb = None
    if is_main:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      if resumed_from:
        self._jsonl.write(json.dumps({"step": resumed_from, "resumed_from": resumed_from}) + "\n")
        self._jsonl.flush()
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resumed_from + 1 if resumed_from else None)

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
      keys = [k for k in ("loss", "objective/accuracy", "objective/margin", "grad_norm") if k in values]
      shown = " | ".join(f"{k.split('/')[-1]} {values[k]:.4g}" for k in keys)
      rate = f" | {values['perf/steps_per_s']:.1f} steps/s | ETA {eta:.0f}s" if eta is not None else ""
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
