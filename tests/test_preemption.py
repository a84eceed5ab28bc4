"""Preemption and integrity: SIGTERM checkpoints and exits 0, then resumes exactly; a damaged
newest checkpoint gives way to the one before it; metrics files are only ever appended to."""

import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from align_jax import train
from conftest import ROOT, load_config, main_command, read_jsonl, subprocess_env

STEPS = 40  # Long enough that a SIGTERM sent after step 2 always lands mid-run.


def _run(workdir, **fields):
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.total_steps, cfg.log_every, cfg.checkpoint_every = STEPS, 1, 0
    cfg.testbed.exact_eval = False  # Losses and states are compared, not exact metrics.
    for k, v in fields.items():
      setattr(cfg, k, v)
  return train.run(cfg, str(workdir))


def _losses(records) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _after_resume(path, step):
  """metrics.jsonl from the `resumed_from` marker of `step` on (the marker included)."""
  records = read_jsonl(path)
  at = records.index({"step": step, "resumed_from": step})
  return records[:at], records[at + 1 :]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  result = _run(workdir)
  return workdir, result.state


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(tmp_path, straight):
  workdir, straight_state = straight
  proc = subprocess.Popen(
    main_command(
      f"--config={ROOT}/configs/dpo.py:smoke",
      f"--workdir={tmp_path}",
      f"--config.total_steps={STEPS}",
      "--config.log_every=1",
      "--config.checkpoint_every=1",
      "--config.testbed.exact_eval=false",
    ),
    env=subprocess_env(8),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "2" / "commit_success.txt").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before its step-2 checkpoint"
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  line = [
    l for l in stdout.splitlines() if l.startswith("preempted: stopped on SIGTERM after step")
  ]
  assert len(line) == 1, stdout[-2000:]
  stopped = int(line[0].split("after step ")[1].split(";")[0])
  assert 2 <= stopped < STEPS
  assert f"stopping after step {stopped} and saving a checkpoint" in stderr
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved[-1] == stopped
  before = (tmp_path / "metrics.jsonl").read_bytes()
  assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"] == stopped  # flushed before saving

  resumed = _run(tmp_path)
  assert int(resumed.state.step) == STEPS
  for a, b in zip(jax.tree.leaves(straight_state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # params, optimizer, rng
  after = (tmp_path / "metrics.jsonl").read_bytes()
  assert after.startswith(before)  # appended, never rewritten
  head, tail = _after_resume(tmp_path / "metrics.jsonl", stopped)
  assert [r["step"] for r in tail if "loss" in r] == list(range(stopped + 1, STEPS + 1))
  assert _losses(head) | _losses(tail) == _losses(read_jsonl(workdir / "metrics.jsonl"))


def _damage(workdir, truncate_step, unmarked_steps):
  """Truncates the largest data file of one step; removes the commit marker of others."""
  ckpts = workdir / "checkpoints"
  arrays = (ckpts / str(truncate_step) / "state" / "d").iterdir()  # The merged OCDBT data.
  largest = max(arrays, key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)
  for s in unmarked_steps:
    (ckpts / str(s) / "commit_success.txt").unlink()


def test_damaged_newest_checkpoints_fall_back_to_the_last_complete_one(tmp_path, capsys):
  first = tmp_path / "first"
  _run(first, total_steps=4, checkpoint_every=1, keep_checkpoints=4)

  # None complete: a clear error, and the workdir is left exactly as it was.
  hopeless = tmp_path / "hopeless"
  shutil.copytree(first, hopeless)
  _damage(hopeless, truncate_step=4, unmarked_steps=[1, 2, 3])
  listing = sorted(hopeless.rglob("*"))
  with pytest.raises(
    ValueError,
    match=r"no checkpoint in .* restores: step 4: .*; step 3: "
    r"FileNotFoundError: no commit_success.txt .*nothing was deleted",
  ):
    _run(hopeless, total_steps=6)
  assert sorted(hopeless.rglob("*")) == listing

  # Steps 4 (a truncated file) and 3 (no commit marker) damaged: resume from step 2.
  _damage(first, truncate_step=4, unmarked_steps=[3])
  before = (first / "metrics.jsonl").read_bytes()
  capsys.readouterr()
  resumed = _run(first, total_steps=6)
  out = capsys.readouterr().out
  assert f"checkpoint step 4 in {first}/checkpoints could not be restored (ValueError: " in out
  assert (
    f"checkpoint step 3 in {first}/checkpoints could not be restored (FileNotFoundError: "
    "no commit_success.txt" in out
  )
  assert (
    f"step(s) 4, 3 set aside in {first}/checkpoints/damaged; step 2 is the newest "
    "complete checkpoint" in out
  )
  assert sorted(os.listdir(first / "checkpoints" / "damaged")) == ["3", "4"]  # kept
  assert int(resumed.state.step) == 6

  assert (first / "metrics.jsonl").read_bytes().startswith(before)
  head, tail = _after_resume(first / "metrics.jsonl", 2)
  assert [r["step"] for r in head if "loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in tail if "loss" in r] == [3, 4, 5, 6]
  # Steps 3 and 4 ran again from the step-2 checkpoint: the same losses as the first time.
  assert {s: v for s, v in _losses(tail).items() if s <= 4} == {
    3: _losses(head)[3],
    4: _losses(head)[4],
  }
