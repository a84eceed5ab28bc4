"""Reference log-probs of a whole offline dataset, computed once and cached in the workdir.

Objectives with a frozen reference need log π_ref(y|x) of every response. The step computes them
when a batch lacks `ref_logp_BxK`; with `data.precompute_ref` the run computes them here once for
every record (one jitted `sequence_logps`, batch rows sharded over the mesh), stores them as the
record field `ref_logp_K`, and saves them under `<workdir>/ref_logps/<key>.npy`. The key hashes
what determines the values: the records' tokens and loss masks (the dataset after tokenisation),
the model architecture and the reference's identity (its checkpoint path, or the testbed base LM's
cache key), and the tokenizer (token ids are read as they are for now). A later run in the same
workdir with the same key loads the file instead of running the model.
"""

import hashlib
import json
import os

import jax
import numpy as np
from absl import logging

from align_jax import sharding
from align_jax.logps import sequence_logps


def cache_key(records: dict[str, np.ndarray], model_cfg: dict, reference: str,
              tokenizer: str = "token-ids") -> str:
  """Hex digest identifying the reference log-probs of `records`."""
  h = hashlib.sha256()
  for name in ("tokens_KxL", "loss_mask_KxL"):
    array = np.ascontiguousarray(records[name])
    h.update(f"{name}{array.shape}{array.dtype}".encode())
    h.update(array.tobytes())
  h.update(json.dumps({"model": model_cfg, "reference": reference, "tokenizer": tokenizer},
                      sort_keys=True).encode())
  return h.hexdigest()[:24]


def ref_logps(records: dict[str, np.ndarray], *, graphdef, ref_params: dict, mesh,
              rows_per_call: int, cache_dir: str, key: str) -> tuple[np.ndarray, bool]:
  """(log π_ref of every record's responses [N, K] float32, whether it came from the cache).

  Every process holds all records and gets all log-probs; only process 0 writes the cache file.
  """
  path = os.path.join(cache_dir, f"{key}.npy")
  n = len(records["tokens_KxL"])
  if os.path.exists(path):
    cached = np.load(path)
    if cached.shape == records["tokens_KxL"].shape[:2]:
      logging.info("reference log-probs of %d records loaded from %s", n, path)
      return cached, True
    logging.warning("ignoring %s: shape %s does not match the data", path, cached.shape)
  rows = max(rows_per_call - rows_per_call % mesh.size, mesh.size)  # Divisible by the mesh.
  tokens, mask = records["tokens_KxL"], records["loss_mask_KxL"]
  pad = -n % rows
  if pad:  # Repeat the first records to fill the last call; their outputs are dropped.
    tokens = np.concatenate([tokens, tokens[:pad]])
    mask = np.concatenate([mask, mask[:pad]])
  fn = jax.jit(lambda p, t, m: sequence_logps(graphdef, p, t, m),
               out_shardings=sharding.replicated(mesh))
  batch = sharding.batch_sharding(mesh, 3)
  out = [np.asarray(fn(ref_params, sharding.global_array(tokens[i:i + rows], batch),
                       sharding.global_array(mask[i:i + rows], batch)))
         for i in range(0, len(tokens), rows)]
  logp_NxK = np.concatenate(out)[:n].astype(np.float32)
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, logp_NxK)
    os.replace(tmp, path)  # Atomic: a killed run never leaves a partial file under the key.
  logging.info("reference log-probs of %d records computed and cached in %s", n, path)
  return logp_NxK, False
