"""Pre-tokenized preference pairs from a JSONL file.

One object per line: {"prompt": [ids], "chosen": [ids], "rejected": [ids]}. Each response is
scored after its prompt; sequences are right-padded with 0 (masked) to `max_len` (or the longest).
"""

import json
import os

import numpy as np


class DataError(ValueError):
  """A malformed data file; the message names the file and the record."""


def _ids(record: dict, key: str, path: str, line: int) -> list[int]:
  if key not in record:
    raise DataError(f"{path}:{line}: record has no field {key!r}")
  ids = record[key]
  if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
    raise DataError(f"{path}:{line}: field {key!r} must be a list of token ids")
  return ids


def read_pairs(path: str, max_len: int = 0, vocab_size: int | None = None) -> dict[str, np.ndarray]:
  """Reads pairs into arrays tokens_KxL [N, 2, L] and loss_mask_KxL [N, 2, L]."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.path {path!r}: no such file")
  rows = []
  with open(path) as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: not JSON ({e.msg})") from None
      prompt = _ids(record, "prompt", path, line)
      pair = [_ids(record, k, path, line) for k in ("chosen", "rejected")]
      if not prompt or not all(pair):
        raise DataError(f"{path}:{line}: empty prompt or response")
      ids = [t for seq in (prompt, *pair) for t in seq]
      if vocab_size is not None and max(ids) >= vocab_size:
        raise DataError(f"{path}:{line}: token id {max(ids)} >= vocab size {vocab_size}")
      rows.append((prompt, pair, line))
  if not rows:
    raise DataError(f"{path}: no records")
  longest = max(len(p) + max(len(r) for r in pair) for p, pair, _ in rows)
  L = max_len or longest
  tokens = np.zeros((len(rows), 2, L), np.int32)
  mask = np.zeros((len(rows), 2, L), np.float32)
  for n, (prompt, pair, line) in enumerate(rows):
    for k, response in enumerate(pair):
      seq = prompt + response
      if len(seq) > L:
        raise DataError(f"{path}:{line}: {len(seq)} tokens exceed data.max_len={L}")
      tokens[n, k, :len(seq)] = seq
      mask[n, k, len(prompt):len(seq)] = 1.0
  return {"tokens_KxL": tokens, "loss_mask_KxL": mask}
