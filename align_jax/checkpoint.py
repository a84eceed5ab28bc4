"""Orbax checkpoints of the train state together with the Grain iterator position.

The one module that talks to Orbax. A checkpoint directory holds numbered steps; each step has the
train state (any dataclass pytree, such as `step.TrainState`, stored as a dict we own) and the data
iterator. Restores go into an abstract state carrying
the current run's shardings, so a run saved on one mesh resumes on another. A newest step that does
not restore (no commit marker, a missing or truncated file) is set aside for the one before it.
"""

import contextlib
import dataclasses
import os
import shutil
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from align_jax.errors import CheckpointError, MissingFileError


_COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, before the final rename.
# What a failed write says (an OSError's strerror, or inside TensorStore's ValueError).
_WRITE_FAILURES = (
  "No space left on device",
  "Disk quota exceeded",
  "File too large",
  "Read-only file system",
)


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the newest `keep`, resumes from the newest."""

  def __init__(self, directory: str, *, every: int, keep: int, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = max(every, 1)
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=1, max_to_keep=keep, create=True, enable_async_checkpointing=use_async
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @classmethod
  def for_run(cls, cfg, directory: str) -> "Checkpointer":
    """A run's checkpointer: every `checkpoint_every` steps (0: the last only), keeping
    `keep_checkpoints`, asynchronous unless `async_checkpointing` is off."""
    return cls(
      directory,
      every=cfg.checkpoint_every or cfg.total_steps,
      keep=cfg.keep_checkpoints,
      use_async=cfg.async_checkpointing,
    )

  def should_save(self, step: int) -> bool:
    """Every `every` steps exactly (Orbax's own policy would also save a run's first step)."""
    return step % self.every == 0

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(_as_dict(state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    with _write_failures_named(self.directory):  # Also an earlier asynchronous save's failure.
      saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore_latest(self, abstract_state, data_iter) -> tuple[int, object | None]:
    """(step, state) of the newest step that restores, or (0, None) when there is no checkpoint.

    The state comes in the shardings of `abstract_state`; `data_iter` moves to the step's position.
    A step that fails is named and the one before it tried. Once one restores, the failed newer
    steps are moved (never deleted) to `damaged/` so that the run can save those steps again; if
    none restores, a CheckpointError names every failure and nothing is moved.
    """
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        if not os.path.exists(os.path.join(self.directory, str(step), _COMMIT_MARKER)):
          raise FileNotFoundError(f"no {_COMMIT_MARKER} (an unfinished save)")
        state = self._restore(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except  (any damage: try the older step)
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        failed.append((step, reason))
        print(
          f"checkpoint step {step} in {self.directory} could not be restored ({reason})", flush=True
        )
        continue
      if failed:
        self._set_aside([s for s, _ in failed])
        print(
          f"step(s) {', '.join(str(s) for s, _ in failed)} set aside in "
          f"{self.directory}/damaged; step {step} is the newest complete checkpoint",
          flush=True,
        )
      return step, state
    if failed:
      raise CheckpointError(
        f"no checkpoint in {self.directory} restores: "
        + "; ".join(f"step {s}: {r}" for s, r in failed)
        + " (nothing was deleted; fix or move them, or "
        "use another --workdir)"
      )
    return 0, None

  def _restore(self, step: int, abstract_state, data_iter):
    args = {"state": ocp.args.StandardRestore(_as_dict(abstract_state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return type(abstract_state)(**restored["state"])

  def _set_aside(self, steps: list[int]) -> None:
    """Moves `steps` to damaged/<step> (process 0), then lets every process see it."""
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.directory, "damaged"), exist_ok=True)
      for step in steps:
        target = os.path.join(self.directory, "damaged", str(step))
        if os.path.exists(target):  # Set aside before: keep both.
          target += f".{time.time_ns()}"
        shutil.move(os.path.join(self.directory, str(step)), target)
    multihost_utils.sync_global_devices("checkpoint_set_aside")
    self._manager.reload()

  def newest(self) -> int | None:
    """The newest saved step once pending saves have finished; None if there is none."""
    with _write_failures_named(self.directory):
      self._manager.wait_until_finished()
    return self._manager.latest_step()

  def close(self) -> None:
    with _write_failures_named(self.directory):
      self._manager.wait_until_finished()
    self._manager.close()


@contextlib.contextmanager
def _write_failures_named(directory: str):
  """A checkpoint write that fails for lack of space (or a read-only disk) is one CheckpointError;
  the steps saved before it stay as they are."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (Orbax wraps TensorStore's errors)
    reason = next((r for r in _WRITE_FAILURES if r in str(e)), None)
    if reason is None:
      raise
    raise CheckpointError(
      f"a checkpoint could not be written to {directory}: {reason}; the checkpoints saved "
      "before it are kept (make room, then run the same command to resume)"
    ) from e


def _as_dict(state) -> dict:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def save_params(directory: str, params: dict) -> None:
  """Writes a parameters-only checkpoint (an init checkpoint for other runs)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params)


def load_params(directory: str, abstract_params: dict) -> dict:
  """Reads a parameters-only checkpoint into the shardings of `abstract_params`."""
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise MissingFileError(f"init_checkpoint {directory!r}: no such directory")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract_params)


def saved_tree(directory: str) -> dict:
  """The nested dict (array metadata at the leaves) of a parameters-only checkpoint, read
  without its arrays."""
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise MissingFileError(f"init_checkpoint {directory!r}: no such directory")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.metadata(path).item_metadata.tree


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def load_state_params(
  directory: str, abstract_params: dict, step: int | None = None
) -> tuple[int, dict]:
  """(step, params) of a train-state checkpoint directory (the newest step, or `step`), restored
  into the shardings of `abstract_params` without reading the rest of the state."""
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise MissingFileError(f"{directory!r}: no checkpoint directory")
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as manager:
    step = step or manager.latest_step()
    if step is None or step not in manager.all_steps():
      at = f" at step {step}" if step else ""
      raise MissingFileError(f"{directory!r}: no checkpoint{at}")
  target = {"params": abstract_params}
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
      os.path.join(path, str(step), "state"),
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  return step, restored["params"]
