"""align_jax.sweep: a config's get_sweep expands to runs with the right configs, names and commands."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from align_jax import sweep
from conftest import ROOT, subprocess_env

LIPO = os.path.join(ROOT, "configs", "lipo.py")
DPO = os.path.join(ROOT, "configs", "dpo.py")


def test_arg_points_times_seeds_build_their_configs(tmp_path):
  runs = sweep.runs(LIPO, "smoke", seeds=[0, 3], root=str(tmp_path), sets={"total_steps": "7"})
  points = {(r.name, r.seed) for r in runs}
  assert len(runs) == len(points) == 2 * 5 * 3  # 5 losses x k in {2, 4, 8} x 2 seeds
  r = next(r for r in runs if r.arg == "smoke,k=8,loss=listmle" and r.seed == 3)
  assert r.workdir == os.path.join(tmp_path, "k-8_loss-listmle", "seed3")
  cfg = r.config(LIPO)
  assert (cfg.objective, cfg.data.list_size, cfg.seed, cfg.total_steps) == ("listmle", 8, 3, 7)
  assert cfg.model.d_model == 32  # the smoke arg survives the point's own args


def test_override_points_and_their_commands(tmp_path):
  runs = sweep.runs(DPO, "", seeds=[1], root=str(tmp_path), sets={"mesh.shape": "(1,1,1)"})
  betas = [r.config(DPO).loss.beta for r in runs]
  assert betas == [0.05, 0.1, 0.3]
  assert all(r.config(DPO).mesh.shape == (1, 1, 1) for r in runs)
  cmd = shlex.split(runs[1].command(DPO))
  assert cmd[1:] == [
    "-m",
    "align_jax.main",
    f"--config={DPO}",
    f"--workdir={tmp_path}/loss.beta-0.1/seed1",
    "--config.loss.beta=0.1",
    "--config.mesh.shape=(1,1,1)",
    "--config.seed=1",
  ]


def test_bad_sweeps_fail_with_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no field optim.nope"):
    sweep.runs(DPO, seeds=[0], sets={"optim.nope": "1"})[0].config(DPO)
  with pytest.raises(ValueError, match="not a Python literal"):
    sweep.runs(DPO, seeds=[0], sets={"total_steps": "ten"})[0].config(DPO)
  with pytest.raises(ValueError, match="defines no get_sweep"):
    sweep.runs(os.path.join(ROOT, "configs", "kto.py"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sweep.runs(str(tmp_path / "missing.py"))
  out = subprocess.run(
    [sys.executable, "-m", "align_jax.sweep", f"--config={DPO}", "--set=loss.nope=1"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=subprocess_env(1),
    timeout=120,
  )
  assert out.returncode == 1 and out.stderr.strip() == (
    "error: sweep override loss.nope: the config has no field loss.nope"
  )


def test_finished_runs_are_skipped(tmp_path):
  runs = sweep.runs(DPO, "smoke", seeds=[0], root=str(tmp_path))
  for i, r in enumerate(runs):  # Every run already finished: nothing may train.
    os.makedirs(r.workdir)
    with open(os.path.join(r.workdir, "summary.json"), "w") as f:
      json.dump({"marker": i}, f)
  logged = []
  assert sweep.run_local(DPO, runs, log=logged.append) == [{"marker": i} for i in range(3)]
  assert all(line.endswith("complete, skipped") for line in logged)


def test_merge_args_later_values_win():
  assert sweep._merge_args("smoke,k=2", "k=8,loss=pro") == "smoke,k=8,loss=pro"
  assert sweep._merge_args("", "") == ""
