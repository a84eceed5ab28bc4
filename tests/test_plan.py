"""Ahead-of-time plans (align_jax/plan.py): a tiny model's DPO step and BOND iteration compiled
for a 4-chip TPU v5p slice from this CPU host, their report (memory per chip, the update's matmul
FLOPs equal to the model-FLOP formula, estimates), a model too large for the chips reported as
not fitting, the search over meshes, and the one-line errors.

Compiling for a TPU topology needs libtpu (`pip install -e ".[tpu]"`, which .ci/run installs);
without it the tests that compile are skipped with that reason and the CLI's one-line message is
checked instead."""

import importlib.util
import json
import subprocess
import sys

import pytest

from align_jax import models, plan
from align_jax.errors import ConfigError, PlanError
from align_jax.models import flops
from conftest import ROOT, load_config, subprocess_env

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
  not HAS_LIBTPU, reason='needs libtpu: pip install -e ".[tpu]" (.ci/run installs it)'
)
TOPOLOGY = "v5p:2x2x1"  # 4 chips.


def _dpo(**overrides):
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.data.max_len = 32
    for key, value in overrides.items():
      node, *path = key.split(".")
      target = cfg[node]
      for k in path[:-1]:
        target = target[k]
      if path:
        target[path[-1]] = value
      else:
        cfg[node] = value
  return cfg


@needs_libtpu
def test_dpo_plan_reports_memory_flops_and_estimates(tmp_path):
  report = plan.plan(_dpo(), TOPOLOGY)
  assert report["chips"] == 4 and report["chip"]["name"] == "TPU v5p"
  assert report["config"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert [f["name"] for f in report["functions"]] == ["init", "update"]
  for f in report["functions"]:
    m = f["memory_per_chip"]
    assert m["arguments"] > 0 and m["outputs"] > 0 and f["compile_s"] > 0
    assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
  init, update = report["functions"]
  # The init writes the parameters and Adam's two moments, each sharded as the parameters (and
  # a few scalars: step, rng, count).
  params = init["memory_per_chip"]["arguments"]
  assert 3 * params <= init["memory_per_chip"]["outputs"] <= 3 * params + 4096
  assert update["memory_per_chip"]["aliased"] > 0  # The donated state.
  # Tiny, unchunked, no remat: the update's matmuls are exactly the model FLOPs of 16 × 2 rows
  # of 32 tokens with one reference forward.
  model_cfg = models.ModelConfig(**load_config("dpo", "smoke").model)
  assert update["matmul_flops"] == flops.train_step_flops(model_cfg, 32, 32, frozen_forwards=1)
  estimate = update["estimate"]
  assert estimate["model_flops"] == update["matmul_flops"]
  chip = plan.CHIPS["v5p"]
  compute_s = update["matmul_flops"] / 4 / chip.peak_flops
  memory_s = (update["memory_per_chip"]["arguments"] + update["memory_per_chip"]["outputs"]) / (
    chip.hbm_bandwidth
  )
  assert estimate["seconds"] == pytest.approx(max(compute_s, memory_s))
  assert report["estimated_mfu"] == pytest.approx(
    estimate["model_flops"] / (4 * chip.peak_flops * estimate["seconds"])
  )
  assert report["fits"] and report["short_by_bytes"] == 0
  assert report["peak_bytes_per_chip"] == max(
    f["memory_per_chip"]["total"] for f in report["functions"]
  )
  text = plan.write(report, str(tmp_path), "python -m align_jax.plan ...")
  assert json.load(open(tmp_path / "plan.json"))["functions"][1]["name"] == "update"
  assert "**fits**" in text and "| update |" in text


@needs_libtpu
def test_a_model_too_large_for_the_chips_does_not_fit():
  """One layer with a 2M-wide MLP: 51.5G parameters, ×4 (params, Adam's two moments, the
  reference) × 4 bytes over 4 chips ≈ 192 GiB per chip, above a v5p chip's 95 GiB."""
  report = plan.plan(
    _dpo(**{"model.n_layers": 1, "model.d_model": 8192, "model.mlp_dim": 2**21}), TOPOLOGY
  )
  assert not report["fits"]
  assert report["peak_bytes_per_chip"] > 4 * 3 * 8192 * 2**21 * 4 // 4
  assert report["short_by_bytes"] == report["peak_bytes_per_chip"] - plan.CHIPS["v5p"].hbm_bytes
  refused = [f for f in report["functions"] if "refused" in f]  # XLA's compiler says so too.
  assert refused and all("RESOURCE_EXHAUSTED" in f["refused"] for f in refused)
  assert "does not fit" in plan.markdown(report)


@needs_libtpu
def test_bond_plan_compiles_the_rollout_with_its_kv_cache():
  cfg = load_config("bond", "smoke")
  with cfg.unlocked():
    cfg.data.prompt_len, cfg.sampling.max_new_tokens = 4, 3
  report = plan.plan(cfg, TOPOLOGY)
  assert [f["name"] for f in report["functions"]] == ["init", "rollout", "update"]
  rollout = report["functions"][1]
  estimate = rollout["estimate"]
  assert estimate["decode_s"] > 0 and estimate["prefill_and_scoring_s"] > 0
  assert estimate["bound"] == "decode: memory"  # 48 rows of a tiny model: reading weights.
  # Forward only: the rollout's model FLOPs are its matmuls, the decode loop's 3 steps included.
  assert estimate["model_flops"] == rollout["matmul_flops"]
  model_cfg = models.ModelConfig(**cfg.model)
  rows = cfg.data.batch_size * (cfg.rollout.num_policy + cfg.rollout.num_anchor)
  decode = 3 * flops.forward_flops(model_cfg, rows, 1, kv_length=7)
  assert rollout["matmul_flops"] > decode + flops.forward_flops(model_cfg, rows, 4)


@needs_libtpu
def test_search_plans_the_fastest_mesh_that_fits():
  """Two examples on 4 chips: the meshes whose batch shards divide 2 and whose tensor axis
  divides the 2 KV heads, remat off fitting at once."""
  report = plan.search(_dpo(**{"data.batch_size": 2}), TOPOLOGY)
  tried = [(tuple(t["mesh"]), t["remat"]) for t in report["search"]]
  assert tried == [((1, 2, 2), "off"), ((2, 1, 2), "off")]
  fastest = min(report["search"], key=lambda t: t["estimated_step_s"])
  assert report["estimated_step_s"] == fastest["estimated_step_s"]
  assert tuple(report["config"]["mesh"].values()) == tuple(fastest["mesh"])


@needs_libtpu
def test_topology_mesh_and_batch_errors_name_the_value():
  with pytest.raises(PlanError, match=r"--topology='v5p:3x3x3'"):
    plan.plan(_dpo(), "v5p:3x3x3")
  with pytest.raises(PlanError, match=r"mesh.shape=\(1, 3, 1\) does not divide the 4 chips"):
    plan.plan(_dpo(**{"mesh.shape": (1, 3, 1)}), TOPOLOGY)
  with pytest.raises(PlanError, match=r"data.batch_size=6 does not divide over the 4 batch shards"):
    plan.plan(_dpo(**{"data.batch_size": 6}), TOPOLOGY)
  with pytest.raises(PlanError, match=r"data.max_len=0"):
    plan.plan(_dpo(**{"data.max_len": 0}), TOPOLOGY)


def test_unknown_generation_and_the_cli_error_line():
  with pytest.raises(PlanError, match=r"--topology='h100:8' is not a TPU slice"):
    plan.topology("h100:8")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "align_jax.plan",
      f"--config={ROOT}/configs/dpo.py:smoke",
      "--topology=v4x:2x2",
    ],
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("error: --topology='v4x:2x2' is not a TPU")
  if not HAS_LIBTPU:  # The one line that says what to install.
    with pytest.raises(PlanError, match=r'needs libtpu: pip install -e "\.\[tpu\]"'):
      plan.topology(TOPOLOGY)


@needs_libtpu
def test_a_packed_dpo_plan_computes_its_rows():
  """data.pack_len: the update runs the model over data.batch_size packed rows of pack_len slots,
  not over its batch_size × pack_records record slots: its matmuls are exactly the model FLOPs of
  16 rows of 64 tokens with one reference forward."""
  report = plan.plan(_dpo(**{"data.pack_len": 64, "data.pack_records": 4}), TOPOLOGY)
  update = report["functions"][1]
  model_cfg = models.ModelConfig(**load_config("dpo", "smoke").model)
  assert update["matmul_flops"] == flops.train_step_flops(model_cfg, 16, 64, frozen_forwards=1)
  assert report["fits"]
  bond = load_config("bond", "smoke")
  with bond.unlocked():
    bond.data.pack_len = 64
  with pytest.raises(ConfigError, match="does not apply to objective 'bond'"):
    plan.plan(bond, TOPOLOGY)
