"""Two real processes (jax.distributed on 127.0.0.1, gloo) == one process, through the launcher:
sharded steps, per-process Grain rows, a SIGTERM that both processes stop on at one step, and an
Orbax save restored by both processes."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

from align_jax import train
from conftest import ROOT, load_config, read_jsonl, subprocess_env

STEPS = 12  # Long enough that a SIGTERM sent after step 2 always lands mid-run.
ARGS = (
  f"--config={ROOT}/configs/dpo.py:smoke",
  f"--config.total_steps={STEPS}",
  "--config.log_every=1",
  "--config.testbed.exact_eval=false",
)


def _launch(workdir, *args) -> subprocess.Popen:
  env = subprocess_env(2) | {"NPROC": "2", "DEVICES_PER_PROC": "2", "PYTHON": sys.executable}
  return subprocess.Popen(
    [
      "bash",
      os.path.join(ROOT, "launch", "local_multiprocess.sh"),
      f"--workdir={workdir}",
      *ARGS,
      *args,
    ],
    env=env,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _losses(path) -> dict[int, dict]:
  """step -> loss metrics, the last record of each step winning (resumes re-log steps)."""
  return {r["step"]: r for r in read_jsonl(path) if "loss" in r}


def test_two_processes_match_one_through_sigterm_and_resume(tmp_path):
  # Two processes, checkpointing every step, stopped by a SIGTERM to the launcher.
  multi = tmp_path / "multi"
  proc = _launch(multi, "--config.checkpoint_every=1")
  deadline = time.time() + 300
  while not (multi / "checkpoints" / "2" / "commit_success.txt").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before its step-2 checkpoint"
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]  # Both processes exited 0.
  stops = re.findall(r"preempted: stopped on SIGTERM after step (\d+);", stdout)
  assert len(stops) == 2 and stops[0] == stops[1], stdout[-2000:]  # One common step.
  stopped = int(stops[0])
  assert 2 <= stopped < STEPS
  logs = (multi / "log.txt").read_text() + (multi / "log.1.txt").read_text()  # INFO records.
  for p in (0, 1):  # Each process reads only its half of every global batch of 16.
    assert (
      f"data: process {p} of 2 reads rows [{8 * p}, {8 * p + 8}) of every global batch "
      "of 16" in logs
    )
  assert max(int(d) for d in os.listdir(multi / "checkpoints") if d.isdigit()) == stopped

  # Both processes restore that checkpoint and finish.
  proc = _launch(multi, "--config.checkpoint_every=0")
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert stdout.count(f"resuming from step {stopped} (") == 2
  for p in (0, 1):  # Each process's own Grain position: STEPS local batches of 8 rows.
    with open(multi / "checkpoints" / str(STEPS) / "data" / f"process_{p}-of-2.json") as f:
      assert json.load(f) == {"next_index": STEPS}

  # One process, 8 devices: 2 steps, then resumed to STEPS.
  single = tmp_path / "single"
  for steps in (2, STEPS):
    cfg = load_config("dpo", "smoke")
    with cfg.unlocked():
      cfg.total_steps, cfg.log_every, cfg.checkpoint_every = steps, 1, 0
      cfg.testbed.exact_eval = False
    train.run(cfg, str(single))

  one, two = _losses(single / "metrics.jsonl"), _losses(multi / "metrics.jsonl")
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  for s in one:
    for key in ("loss", "grad_norm", "objective/margin"):
      np.testing.assert_allclose(two[s][key], one[s][key], atol=1e-5, err_msg=f"{key} step {s}")
  assert len({r["loss"] for r in one.values()}) == STEPS  # training moved


def test_cluster_launchers_hand_every_worker_the_same_command(tmp_path):
  """tpu_vm.sh and slurm_gpu.sbatch, with stand-ins for gcloud and srun that print their
  arguments: the run's arguments arrive intact after --distributed."""
  for name in ("gcloud", "srun"):
    (tmp_path / name).write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (tmp_path / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", TPU_NAME="pod", ZONE="zone-a")
  args = ["--config=configs/dpo.py", "--config.mesh.shape=(2,2,2)", "--workdir=/shared/my runs"]
  main = [".venv/bin/python", "-m", "align_jax.main", "--distributed", *args]

  def launch(script):
    path = os.path.join(ROOT, "launch", script)
    subprocess.run(["bash", "-n", path], check=True)
    return subprocess.run(
      ["bash", path, *args], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()

  gcloud = launch("tpu_vm.sh")
  assert gcloud[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--zone=zone-a" in gcloud and "--worker=all" in gcloud
  command = shlex.split(next(a for a in gcloud if a.startswith("--command="))[len("--command=") :])
  assert command == ["cd", "align_jax", "&&", "env", "PYTHONUNBUFFERED=1", *main]

  assert launch("slurm_gpu.sbatch") == ["--kill-on-bad-exit=1", *main]
  with open(os.path.join(ROOT, "launch", "slurm_gpu.sbatch")) as f:  # sbatch reads #SBATCH lines
    head = f.read().split("\nset -euo pipefail")[0].splitlines()  # only before the first command
  assert all(l.startswith("#") for l in head) and sum(l.startswith("#SBATCH") for l in head) >= 4
