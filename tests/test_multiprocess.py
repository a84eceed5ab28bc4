"""Two real processes (jax.distributed on 127.0.0.1, gloo) == one process with as many devices."""

import os
import subprocess
import sys

import numpy as np

from conftest import ROOT, main_command, read_jsonl, subprocess_env

DPO = os.path.join(ROOT, "configs", "dpo.py")
ARGS = ("--config.total_steps=3", "--config.log_every=1", "--config.checkpoint_every=3")


def test_two_processes_match_one(tmp_path):
  single = tmp_path / "single"
  out = subprocess.run(main_command(f"--config={DPO}:smoke", f"--workdir={single}", *ARGS),
                       env=subprocess_env(4), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  multi = tmp_path / "multi"
  env = subprocess_env(2) | {"NPROC": "2", "DEVICES_PER_PROC": "2", "PYTHON": sys.executable}
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"),
                        f"--config={DPO}:smoke", f"--workdir={multi}", *ARGS],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "process 1/2" in out.stderr or "(2 processes)" in out.stderr  # really two processes

  one = [r for r in read_jsonl(single / "metrics.jsonl") if "loss" in r]
  two = [r for r in read_jsonl(multi / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in two] == [1, 2, 3]
  for a, b in zip(one, two):
    for key in ("loss", "grad_norm", "objective/margin"):
      np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=f"{key} step {a['step']}")
  assert sorted(os.listdir(multi / "checkpoints")) == ["3"]
