"""SIGTERM (a scheduler's preemption notice) -> finish the step, checkpoint, exit 0.

One process: a Python handler sets a flag that the loop reads after each step (no device sync).
The command line installs it first thing (`listen`): a notice during start-up stops the run after
its first step, and one after the run has finished changes nothing (exit status 0). Several
processes: JAX's preemption service (started by `jax.distributed.initialize`) catches
SIGTERM on whichever processes get it and agrees, without blocking the loop, on the first step all
processes can still reach; every process stops there, so their checkpoints are of the same step.
"""

import contextlib
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run stopped early on SIGTERM after checkpointing `step` in `directory`."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"stopped on SIGTERM after step {step}; checkpoint saved in {directory}")
    self.step, self.directory = step, directory


_received = False
_depth = 0
_listening = False


def _handle(signum, frame):
  del signum, frame
  global _received
  _received = True


def listen() -> None:
  """From now on a SIGTERM only sets the flag that `reached` reads (one process, main thread;
  several processes keep the preemption service's handler)."""
  global _listening
  if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _handle)
    _listening = True


@contextlib.contextmanager
def watch():
  """Within: SIGTERM no longer kills a single-process run but is reported by `reached`."""
  global _received, _depth
  # Several processes: the preemption service's own SIGTERM handler must stay in place.
  install = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
  if _depth == 0 and not _listening:  # A notice before the run counts once `listen` was called.
    _received = False
  previous = signal.signal(signal.SIGTERM, _handle) if install else None
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
    if install:
      signal.signal(signal.SIGTERM, previous)


def reached(step: int) -> bool:
  """True at the step where every process stops after a SIGTERM; call it after each step."""
  if jax.process_count() > 1:
    stop = multihost_utils.reached_preemption_sync_point(step)
  else:
    stop = _received
  if stop:
    logging.warning("SIGTERM received: stopping after step %d and saving a checkpoint", step)
  return stop
