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
  losses = [
    [r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r]
    for d in ("in_step", "cached")
  ]
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
  records = {
    "tokens_KxL": rng.integers(0, 8, (5, 2, 6), dtype=np.int32),
    "loss_mask_KxL": np.ones((5, 2, 6), np.float32),
  }
  key = reference.cache_key(records, {"d_model": 32}, "base-a")
  assert key == reference.cache_key(
    {k: v.copy() for k, v in records.items()}, {"d_model": 32}, "base-a"
  )
  changed = dict(records, tokens_KxL=records["tokens_KxL"].copy())
  changed["tokens_KxL"][4, 1, 5] ^= 1
  assert reference.cache_key(changed, {"d_model": 32}, "base-a") != key
  masked = dict(records, loss_mask_KxL=records["loss_mask_KxL"].copy())
  masked["loss_mask_KxL"][0, 0, 0] = 0
  assert reference.cache_key(masked, {"d_model": 32}, "base-a") != key
  assert reference.cache_key(records, {"d_model": 64}, "base-a") != key
  assert reference.cache_key(records, {"d_model": 32}, "base-b") != key
  assert reference.cache_key(records, {"d_model": 32}, "base-a", tokenizer="spm") != key


def _greedy(graphdef, params, prompt, steps):
  """Greedy decoding of one unpadded prompt (the sampler at temperature 0 is tested to be argmax
  decoding by full forward passes in tests/test_sampling.py)."""
  import jax
  import jax.numpy as jnp
  from align_jax import sampling

  out = sampling.sample(
    graphdef,
    params,
    jnp.asarray([prompt]),
    jax.random.key(9),
    sampling.SamplingConfig(max_new_tokens=steps, temperature=0.0),
  )
  return np.asarray(out["tokens_RxL"])[0, len(prompt) :].tolist()


def test_negatives_from_a_file_gain_reference_samples_after_their_own_prompt(tmp_path):
  import jax
  from align_jax import models, sampling, sharding
  from align_jax.data import preference

  path = tmp_path / "neg.jsonl"
  prompts = [[1, 2, 3], [4], [5, 6]]
  path.write_text("".join(json.dumps({"prompt": p, "rejected": [7, 7]}) + "\n" for p in prompts))
  records, _ = preference.read(f"jsonl:{path}", "negatives")
  cfg = models.ModelConfig(**models.preset("tiny"))
  graphdef, _, _ = models.abstract(cfg)
  params = models.init_params(cfg, jax.random.key(0))
  mesh = sharding.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
  from align_jax import config_lib

  table = sharding.check_rules(config_lib.base().rules, mesh)
  with jax.set_mesh(mesh), sharding.use_rules(table):  # As in a run: rows over act_batch.
    out = reference.append_samples(
      records,
      graphdef=graphdef,
      ref_params=params,
      mesh=mesh,
      sampling_cfg=sampling.SamplingConfig(max_new_tokens=3, temperature=0.0),
      num_samples=2,
      rows_per_call=4,
      seed=0,
    )
  assert out["tokens_KxL"].shape == (3, 3, 6)
  np.testing.assert_array_equal(out["tokens_KxL"][:, 0, :5], records["tokens_KxL"][:, 0])
  np.testing.assert_array_equal(out["loss_mask_KxL"][:, 0, :5], records["loss_mask_KxL"][:, 0])
  for i, prompt in enumerate(prompts):
    want = _greedy(graphdef, params, prompt, 3)
    for k in (1, 2):  # Left-padded batched decoding equals unpadded greedy decoding.
      np.testing.assert_array_equal(out["tokens_KxL"][i, k, : len(prompt)], prompt)
      np.testing.assert_array_equal(out["tokens_KxL"][i, k, len(prompt) : len(prompt) + 3], want)
      np.testing.assert_array_equal(
        out["loss_mask_KxL"][i, k], [0] * len(prompt) + [1] * 3 + [0] * (3 - len(prompt))
      )
  np.testing.assert_array_equal(out["score_K"], [[0, 1, 1]] * 3)


def test_d2o_trains_on_negatives_from_a_file(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "neg.jsonl"
  path.write_text(
    "".join(
      json.dumps(
        {"prompt": rng.integers(0, 8, 2).tolist(), "rejected": [7] + rng.integers(0, 8, 2).tolist()}
      )
      + "\n"
      for _ in range(64)
    )
  )
  cfg = load_config("d2o", "smoke")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.data.source = f"jsonl:{path}"
    cfg.data.num_samples = 3
    cfg.sampling.max_new_tokens = 3
    cfg.log_every = 1
  result = train.run(cfg, str(tmp_path / "run"))
  records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
  assert len(records) == cfg.total_steps and all(np.isfinite(r["loss"]) for r in records)
  assert result.summary["data/records"] == 64
  assert len({r["loss"] for r in records}) > 1
