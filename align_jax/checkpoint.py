"""Orbax checkpoints of the train state together with the Grain iterator position.

The one module that talks to Orbax. A checkpoint directory holds numbered steps; each step has the
`TrainState` (as a dict we own) and the data iterator. Restores go into an abstract state carrying
the current run's shardings, so a run saved on one mesh resumes on another.
"""

import dataclasses
import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from align_jax.step import TrainState


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the newest `keep`, resumes from the newest."""

  def __init__(self, directory: str, *, every: int, keep: int, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = max(every, 1)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, create=True,
        enable_async_checkpointing=use_async)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Every `every` steps exactly (Orbax's own policy would also save a run's first step)."""
    return step % self.every == 0

  def save(self, step: int, state: TrainState, data_iter, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(_as_dict(state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: TrainState, data_iter) -> TrainState:
    """Restores `step` into shardings of `abstract_state` and moves `data_iter` to its position."""
    args = {"state": ocp.args.StandardRestore(_as_dict(abstract_state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return TrainState(**restored["state"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _as_dict(state: TrainState) -> dict:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def save_params(directory: str, params: dict) -> None:
  """Writes a parameters-only checkpoint (an init checkpoint for other runs)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params)


def load_params(directory: str, abstract_params: dict) -> dict:
  """Reads a parameters-only checkpoint into the shardings of `abstract_params`."""
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init_checkpoint {directory!r}: no such directory")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract_params)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def load_state_params(directory: str, abstract_params: dict,
                      step: int | None = None) -> tuple[int, dict]:
  """(step, params) of a train-state checkpoint directory (the newest step, or `step`), restored
  into the shardings of `abstract_params` without reading the rest of the state."""
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory!r}: no checkpoint directory")
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as manager:
    step = step or manager.latest_step()
    if step is None or step not in manager.all_steps():
      at = f" at step {step}" if step else ""
      raise FileNotFoundError(f"{directory!r}: no checkpoint{at}")
  target = {"params": abstract_params}
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(path, str(step), "state"), args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return step, restored["params"]
