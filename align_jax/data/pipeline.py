"""Grain pipeline from a random-access record source to this process's share of global batches.

Record: {"tokens_KxL": int32, "loss_mask_KxL": float32, ...}. Global batch b is records
[b·B, (b+1)·B) of the shuffled, repeated source; process p reads only its rows
[b·B + p·B/P, b·B + (p+1)·B/P), so P processes together see exactly what one process would.
"""

import math

import grain
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from align_jax import sharding
from align_jax.errors import ConfigError


class _ProcessRows:
  """Random access to this process's rows of consecutive global batches."""

  def __init__(self, records: grain.MapDataset, global_batch: int, index: int, count: int):
    self._records, self._global, self._local = records, global_batch, global_batch // count
    self._offset = index * self._local

  def __len__(self) -> int:
    return len(self._records) // self._global * self._local

  def __getitem__(self, i: int):
    b, j = divmod(i, self._local)
    return self._records[b * self._global + self._offset + j]


def batches(
  source,
  *,
  global_batch: int,
  total_steps: int,
  seed: int,
  shuffle: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
):
  """A checkpointable Grain iterator over this process's local batches (numpy dicts)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise ConfigError(
      f"data.batch_size={global_batch} is not divisible by the {process_count} processes"
    )
  if len(source) < global_batch:
    raise ConfigError(f"data: {len(source)} records are fewer than one batch of {global_batch}")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.seed(seed).shuffle()
  epochs = math.ceil(total_steps * global_batch / len(source)) + 1
  ds = ds.repeat(epochs)
  rows = global_batch // process_count
  local = grain.MapDataset.source(_ProcessRows(ds, global_batch, process_index, process_count))
  local = local.batch(rows, drop_remainder=True)
  logging.info(
    "data: process %d of %d reads rows [%d, %d) of every global batch of %d",
    process_index,
    process_count,
    process_index * rows,
    (process_index + 1) * rows,
    global_batch,
  )
  return iter(local.to_iter_dataset())


def batch_key(record_key: str) -> str:
  """Record field -> batch field: a shape suffix gains the batch letter (tokens_KxL ->
  tokens_BxKxL); a per-record scalar gains one (is_tie -> is_tie_B)."""
  name, _, shape = record_key.rpartition("_")
  if name and shape and all(part.isupper() for part in shape.split("x")):
    return f"{name}_Bx{shape}"
  return f"{record_key}_B"


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles process-local rows into global arrays sharded over data x fsdp."""
  rows = next(iter(local_batch.values())).shape[0]
  local_batch = {batch_key(k): v for k, v in local_batch.items()}
  local_batch.setdefault("example_mask_B", np.ones((rows,), np.float32))  # Packed: its own.
  return {
    k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
    for k, v in local_batch.items()
  }


class ArraySource:
  """Records from a dict of equally long numpy arrays (field names carry per-record shapes)."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ConfigError(f"data: fields have different record counts {lengths}")
    self._arrays = arrays
    self._n = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self._arrays.items()}
