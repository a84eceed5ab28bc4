"""Packed rows: several records in one row of `data.pack_len` token slots (DESIGN.md §9).

A record (its K rows `tokens_KxL` with `loss_mask_KxL`) is first flattened to the tokens that
carry information (`flatten`): with a shared prompt, the prompt once and then each response from
the prompt's end, `[prompt | r_1 | … | r_K]`; without, each row up to its last scored token. Rows
with no scored token are left out. Each token keeps its position in its own unshared row and
its branch: 0 for the shared prompt (seen by every response), k + 1 for row k's tokens (seen by
row k's alone). Grain's best-fit packer (`grain.experimental.BestFitPackIterDataset`) then puts
whole records into rows of S = data.pack_len slots, at most `data.pack_records` per row, and
numbers them (segment ids 1, 2, …; 0 is padding). Attention never crosses a segment and follows
branches (`models.Segments`), so every log-prob equals the unpacked row's.

The step sees the batch of B = rows × pack_records record slots in the unpacked layout
(`tokens_BxKxL`, `loss_mask_BxKxL`, the per-record fields, `example_mask_B` 0 for empty slots)
plus the packed rows (`logps.PACKED` fields, `packed_fields`); `logps.packed_token_logps_BxK` runs the model on the
rows and gathers each record's log-probs back into [B, K, T]. Record slot r · pack_records + i
is the i-th record of row r, so a shard of rows holds its own records.

The record stream is the unpacked pipeline's (shuffled with the seed, repeated); process p of P
packs records p, p + P, … of it. The iterator is Grain's, checkpointed with the run (resume is
bit-identical).
"""

import math

import grain
import jax
import numpy as np
from absl import logging

from align_jax.errors import ConfigError

# Rows the packer fills at once, per row of a batch: more bins, less padding (Grain fills them
# best-fit and emits them all when a record fits none), and records reordered over more rows.
BINS_PER_ROW = 4
_TOKEN_FEATURES = ("tokens", "positions", "branch", "prev", "scored")


def flatten(record: dict, shared: bool) -> dict:
  """One record's informative tokens, in the order they are packed (module docstring).

  Returns 1-D fields `tokens`, `positions` (in the record's own rows), `branch`, `prev` (the
  record-local index of the token whose hidden state predicts this one; −1 at position 0) and
  `scored` (the loss mask), and each other field with a leading axis of 1 (`record/<name>`),
  `record/example_mask` among them.
  """
  tokens_KxL, weight_KxL = record["tokens_KxL"], record["loss_mask_KxL"]
  on_KxL = weight_KxL > 0
  K, L = tokens_KxL.shape
  end_K = L - np.argmax(on_KxL[:, ::-1], axis=1)  # One past each row's last scored token.
  rows = [k for k in range(K) if on_KxL[k].any()]
  start = int(np.argmax(on_KxL.any(axis=0))) if shared else 0  # The shared prompt's length.
  parts = []  # (k or None for the shared prompt, first position, end)
  if start:
    parts.append((None, 0, start))
  parts += [(k, start, int(end_K[k])) for k in rows]
  out = {name: [] for name in _TOKEN_FEATURES}
  prompt_end = start - 1  # Record-local index of the shared prompt's last token.
  n = 0
  for k, lo, hi in parts:
    source = tokens_KxL[0 if k is None else k]
    out["tokens"].append(source[lo:hi])
    out["positions"].append(np.arange(lo, hi))
    out["branch"].append(np.full(hi - lo, 0 if k is None else k + 1))
    prev = np.arange(n - 1, n - 1 + hi - lo)
    if k is not None and lo > 0:  # A response's first token follows the prompt's last.
      prev[0] = prompt_end
    if lo == 0:
      prev[0] = -1
    out["prev"].append(prev)
    out["scored"].append(weight_KxL[0 if k is None else k, lo:hi] * (k is not None))
    n += hi - lo
  flat = {
    name: np.concatenate(v).astype(np.float32 if name == "scored" else np.int32)
    for name, v in out.items()
  }
  for name, value in record.items():
    if name not in ("tokens_KxL", "loss_mask_KxL"):
      flat[f"record/{name}"] = np.asarray(value)[None]
  flat["record/example_mask"] = np.ones(1, np.float32)  # 0 in the batch's empty slots.
  return flat


def check_records(arrays: dict, shared: bool, pack_len: int) -> np.ndarray:
  """Every record's packed length (`flatten`'s); ConfigError naming the first record that has
  no scored token (a prompt with no response) or does not fit in a row of `pack_len` slots."""
  on_NxKxL = arrays["loss_mask_KxL"] > 0
  N, K, L = on_NxKxL.shape
  scored_NxK = on_NxKxL.any(axis=-1)
  empty = np.flatnonzero(~scored_NxK.any(axis=-1))
  if len(empty):
    raise ConfigError(
      f"data.pack_len: record {empty[0]} has no scored token (a prompt with no response); "
      "remove it from the data"
    )
  end_NxK = np.where(scored_NxK, L - np.argmax(on_NxKxL[..., ::-1], axis=-1), 0)
  start_N = np.argmax(on_NxKxL.any(axis=1), axis=-1) if shared else np.zeros(N, int)
  length_N = start_N + np.sum(np.where(scored_NxK, end_NxK - start_N[:, None], 0), axis=-1)
  long = np.flatnonzero(length_N > pack_len)
  if len(long):
    raise ConfigError(
      f"data.pack_len={pack_len}: record {long[0]} needs {length_N[long[0]]} slots "
      f"({'its prompt once and its' if shared else 'its'} {int(scored_NxK[long[0]].sum())} "
      "responses); raise data.pack_len or shorten the record"
    )
  return length_N


def padding_unpacked(arrays: dict) -> float:
  """The share of the records' own [K, L] slots that carry nothing (after a row's last scored
  token, or a row with none): the padding packing removes."""
  on_NxKxL = arrays["loss_mask_KxL"] > 0
  L = on_NxKxL.shape[-1]
  used_NxK = np.where(on_NxKxL.any(-1), L - np.argmax(on_NxKxL[..., ::-1], axis=-1), 0)
  return float(1.0 - used_NxK.sum() / on_NxKxL.size)


def batches(
  source,
  *,
  shared: bool,
  pack_len: int,
  pack_records: int,
  global_rows: int,
  total_steps: int,
  seed: int,
  shuffle: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
):
  """A checkpointable Grain iterator over this process's packed batches (`unpack`'s dicts,
  record-field names: `pipeline.to_global` turns them into batch fields)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_rows % process_count:
    raise ConfigError(
      f"data.batch_size={global_rows} packed rows are not divisible by the {process_count} "
      "processes"
    )
  rows = global_rows // process_count
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.seed(seed).shuffle()
  # A row holds at most pack_records records and the packer fills BINS_PER_ROW rows ahead of
  # each row of a batch: this many epochs outlast the run.
  needed = (total_steps + BINS_PER_ROW) * global_rows * pack_records
  ds = ds.repeat(math.ceil(needed / len(source)) + 1)
  ds = ds[process_index::process_count].map(lambda record: flatten(record, shared))
  example = flatten(source[0], shared)
  length_struct = {name: pack_len if name in _TOKEN_FEATURES else pack_records for name in example}
  packed = grain.experimental.BestFitPackIterDataset(
    ds.to_iter_dataset(),
    length_struct=length_struct,
    num_packing_bins=BINS_PER_ROW * rows,
    seed=seed,
    shuffle_bins=False,
    max_sequences_per_bin=pack_records,
  )
  K, L = source[0]["tokens_KxL"].shape
  logging.info(
    "data: packing records into rows of %d slots (at most %d records each); process %d of %d "
    "packs every %d-th record",
    pack_len,
    pack_records,
    process_index,
    process_count,
    process_count,
  )
  unpack_fn = lambda batch: unpack(batch, K=K, L=L, pack_records=pack_records)  # noqa: E731
  return iter(packed.batch(rows, drop_remainder=True).map(unpack_fn))


def unpack(batch: dict, *, K: int, L: int, pack_records: int) -> dict:
  """A batch of packed rows -> the step's fields (module docstring): the records in their
  unpacked layout at slots r · pack_records + segment − 1, and the packed rows."""
  R, S = batch["tokens"].shape
  B = R * pack_records
  segment_RxS = batch["tokens_segment_ids"]
  r_RxS = np.broadcast_to(np.arange(R)[:, None], (R, S))
  on = segment_RxS > 0
  slot_n = (r_RxS * pack_records + segment_RxS - 1)[on]
  pos_n, branch_n, token_n = batch["positions"][on], batch["branch"][on], batch["tokens"][on]
  tokens_BxKxL = np.zeros((B, K, L), np.int32)
  mask_BxKxL = np.zeros((B, K, L), np.float32)
  index_BxKxT = np.zeros((B, K, L - 1), np.int32)
  own = branch_n > 0  # A row's own token: entry (branch − 1, position) of its record.
  k_n, j_n = branch_n[own] - 1, np.broadcast_to(np.arange(S), (R, S))[on][own]
  tokens_BxKxL[slot_n[own], k_n, pos_n[own]] = token_n[own]
  mask_BxKxL[slot_n[own], k_n, pos_n[own]] = batch["scored"][on][own]
  later = pos_n[own] > 0  # log π(token at t) is entry t − 1 of the token log-probs.
  index_BxKxT[slot_n[own][later], k_n[later], pos_n[own][later] - 1] = j_n[later]
  shared_prompt = ~own
  tokens_BxKxL[slot_n[shared_prompt], :, pos_n[shared_prompt]] = token_n[shared_prompt, None]
  # The predecessor's slot in the row (a segment starts at its slot − Grain's position).
  start_RxS = np.arange(S)[None] - batch["tokens_positions"]
  prev_RxS = np.where(on & (batch["prev"] >= 0), start_RxS + batch["prev"], 0)
  out = {
    "tokens_KxL": tokens_BxKxL,
    "loss_mask_KxL": mask_BxKxL,
    "pack_tokens_S": batch["tokens"],
    "pack_positions_S": batch["positions"],
    "pack_segment_S": segment_RxS,
    "pack_branch_S": batch["branch"],
    "pack_prev_S": prev_RxS.astype(np.int32),
    "pack_index_KxT": index_BxKxT,
  }
  for name in batch:
    if name.startswith("record/") and not name.endswith(("_segment_ids", "_positions")):
      seg_RxN = batch[f"{name}_segment_ids"]
      has = seg_RxN > 0
      slots = (np.arange(R)[:, None] * pack_records + seg_RxN - 1)[has]
      value = batch[name][has]
      field = np.zeros((B, *value.shape[1:]), value.dtype)
      field[slots] = value
      out[name.removeprefix("record/")] = field
  return out


def packed_fields(K: int, L: int, pack_len: int) -> dict[str, tuple[tuple[int, ...], type]]:
  """{record field name: (shape per row or per record slot, dtype)} of what `unpack` adds to the
  records' fields: the rows (`logps.PACKED`, per row) and the gather index (per record slot)."""
  rows = ("tokens", "positions", "segment", "branch", "prev")
  return {f"pack_{name}_S": ((pack_len,), np.int32) for name in rows} | {
    "pack_index_KxT": ((K, L - 1), np.int32)
  }


def batch_ndims(arrays: dict, pack_len: int) -> dict[str, int]:
  """{record field name: ndim of its batch array} of a packed run's batches (for shardings)."""
  K, L = arrays["tokens_KxL"].shape[1:]
  added = {name: 1 + len(shape) for name, (shape, _) in packed_fields(K, L, pack_len).items()}
  return {name: v.ndim for name, v in arrays.items()} | added
