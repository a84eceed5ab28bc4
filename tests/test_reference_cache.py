"""Reference log-probs precomputed once per dataset: same losses as in-step, reused from the cache."""

import json
import os

import numpy as np

from align_jax import train
from align_jax.data import reference
from conftest import load_config, read_jsonl


def _dpo(steps, precompute):
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.total_steps = steps
    cfg.log_every = 1
    cfg.eval_every = 0
    cfg.data.precompute_ref = precompute
  return cfg


def test_precomputed_reference_gives_in_step_losses_and_is_not_recomputed(tmp_path, monkeypatch):
  calls = []
  real = reference.sequence_logps

  def counting(*args, **kwargs):
    calls.append(1)  # Runs while jax traces the precompute function.
    return real(*args, **kwargs)

  monkeypatch.setattr(reference, "sequence_logps", counting)
  train.run(_dpo(3, precompute=False), str(tmp_path / "in_step"))
  assert not calls
  train.run(_dpo(3, precompute=True), str(tmp_path / "cached"))
  assert len(calls) == 1
  losses = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r]
            for d in ("in_step", "cached")]
  assert len(losses[0]) == 3
  np.testing.assert_allclose(losses[1], losses[0], atol=1e-6, rtol=0)
  files = os.listdir(tmp_path / "cached" / "ref_logps")
  assert len(files) == 1 and files[0].endswith(".npy")
  first = json.load(open(tmp_path / "cached" / "summary.json"))
  assert first["data/ref_logps_from_cache"] == 0

  # The second run in the workdir (resuming to 6 steps) reads the file instead of the model.
  train.run(_dpo(6, precompute=True), str(tmp_path / "cached"))
  assert len(calls) == 1
  assert json.load(open(tmp_path / "cached" / "summary.json"))["data/ref_logps_from_cache"] == 1


def test_cache_key_changes_with_data_model_and_reference():
  rng = np.random.default_rng(0)
  records = {"tokens_KxL": rng.integers(0, 8, (5, 2, 6), dtype=np.int32),
             "loss_mask_KxL": np.ones((5, 2, 6), np.float32)}
  key = reference.cache_key(records, {"d_model": 32}, "base-a")
  assert key == reference.cache_key({k: v.copy() for k, v in records.items()}, {"d_model": 32},
                                    "base-a")
  changed = dict(records, tokens_KxL=records["tokens_KxL"].copy())
  changed["tokens_KxL"][4, 1, 5] ^= 1
  assert reference.cache_key(changed, {"d_model": 32}, "base-a") != key
  masked = dict(records, loss_mask_KxL=records["loss_mask_KxL"].copy())
  masked["loss_mask_KxL"][0, 0, 0] = 0
  assert reference.cache_key(masked, {"d_model": 32}, "base-a") != key
  assert reference.cache_key(records, {"d_model": 64}, "base-a") != key
  assert reference.cache_key(records, {"d_model": 32}, "base-b") != key
  assert reference.cache_key(records, {"d_model": 32}, "base-a", tokenizer="spm") != key
