"""What the frozen reference adds to an offline dataset, computed once: log-probs and self-samples.

Self-samples: negatives-only records (D2O) from files hold one human negative per prompt; the
model's own samples beside it are drawn here from the reference with the sampler (the offline
variant of D2O), `append_samples`.

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

from align_jax import sampling, sharding
from align_jax.logps import sequence_logps


def cache_key(
  records: dict[str, np.ndarray], model_cfg: dict, reference: str, tokenizer: str = "token-ids"
) -> str:
  """Hex digest identifying the reference log-probs of `records`."""
  h = hashlib.sha256()
  for name in ("tokens_KxL", "loss_mask_KxL"):
    array = np.ascontiguousarray(records[name])
    h.update(f"{name}{array.shape}{array.dtype}".encode())
    h.update(array.tobytes())
  h.update(
    json.dumps(
      {"model": model_cfg, "reference": reference, "tokenizer": tokenizer}, sort_keys=True
    ).encode()
  )
  return h.hexdigest()[:24]


def ref_logps(
  records: dict[str, np.ndarray],
  *,
  graphdef,
  ref_params: dict,
  mesh,
  rows_per_call: int,
  cache_dir: str,
  key: str,
) -> tuple[np.ndarray, bool]:
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
  fn = jax.jit(
    lambda p, t, m: sequence_logps(graphdef, p, t, m), out_shardings=sharding.replicated(mesh)
  )
  batch = sharding.batch_sharding(mesh, 3)
  out = [
    np.asarray(
      fn(
        ref_params,
        sharding.global_array(tokens[i : i + rows], batch),
        sharding.global_array(mask[i : i + rows], batch),
      )
    )
    for i in range(0, len(tokens), rows)
  ]
  logp_NxK = np.concatenate(out)[:n].astype(np.float32)
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, logp_NxK)
    os.replace(tmp, path)  # Atomic: a killed run never leaves a partial file under the key.
  logging.info("reference log-probs of %d records computed and cached in %s", n, path)
  return logp_NxK, False


def append_samples(
  records: dict[str, np.ndarray],
  *,
  graphdef,
  ref_params: dict,
  mesh,
  sampling_cfg: sampling.SamplingConfig,
  num_samples: int,
  rows_per_call: int,
  seed: int,
) -> dict[str, np.ndarray]:
  """Negatives-only records (K = 1) gain K indices 1..num_samples: samples of the reference.

  Each record's prompt (the tokens before its first scored one) is left-padded into one batch and
  continued by `sampling.sample` (prefill + KV-cache decode, up to EOS or max_new_tokens); the
  samples become [prompt, sample] rows scored on the sampled tokens, with L grown to fit. Every
  process draws the same samples (same key, replicated output).
  """
  tokens_NxL, mask_NxL = records["tokens_KxL"][:, 0], records["loss_mask_KxL"][:, 0]
  n = len(tokens_NxL)
  start_N = np.argmax(mask_NxL > 0, axis=1)
  P, N = int(start_N.max()), sampling_cfg.max_new_tokens
  prompts_NxP = np.zeros((n, P), np.int32)
  prompt_mask_NxP = np.zeros((n, P), np.int32)
  for i, s in enumerate(start_N):  # Left padding: the prompt ends where the response starts.
    prompts_NxP[i, P - s :] = tokens_NxL[i, :s]
    prompt_mask_NxP[i, P - s :] = 1
  rows = max(rows_per_call - rows_per_call % mesh.size, mesh.size)
  reps = np.repeat(np.arange(n), num_samples)  # Row r samples for record reps[r].
  pad = -len(reps) % rows
  reps_padded = np.concatenate([reps, reps[:pad]])
  draw = jax.jit(
    lambda p, t, m, key: sampling.sample(graphdef, p, t, key, sampling_cfg, m),
    out_shardings=sharding.replicated(mesh),
  )
  batch = sharding.batch_sharding(mesh, 2)
  key = jax.random.key(seed)
  new_NxN, new_mask_NxN = [], []
  for c, i in enumerate(range(0, len(reps_padded), rows)):
    idx = reps_padded[i : i + rows]
    out = draw(
      ref_params,
      sharding.global_array(prompts_NxP[idx], batch),
      sharding.global_array(prompt_mask_NxP[idx], batch),
      jax.random.fold_in(key, c),
    )
    new_NxN.append(np.asarray(out["tokens_RxL"])[:, P:])
    new_mask_NxN.append(np.asarray(out["mask_RxN"]))
  new_NxN = np.concatenate(new_NxN)[: len(reps)].reshape(n, num_samples, N)
  new_mask_NxN = np.concatenate(new_mask_NxN)[: len(reps)].reshape(n, num_samples, N)
  L = max(tokens_NxL.shape[1], P + N)
  tokens = np.zeros((n, 1 + num_samples, L), np.int32)
  mask = np.zeros((n, 1 + num_samples, L), np.float32)
  tokens[:, 0, : tokens_NxL.shape[1]] = tokens_NxL
  mask[:, 0, : tokens_NxL.shape[1]] = mask_NxL
  for i, s in enumerate(start_N):
    tokens[i, 1:, :s] = tokens_NxL[i, :s]
    tokens[i, 1:, s : s + N] = new_NxN[i]
    mask[i, 1:, s : s + N] = new_mask_NxN[i]
  return {
    **records,
    "tokens_KxL": tokens,
    "loss_mask_KxL": mask,
    "score_K": np.concatenate([records["score_K"], np.ones((n, num_samples), np.float32)], 1),
    "response_mask_K": np.ones((n, 1 + num_samples), np.float32),
  }
