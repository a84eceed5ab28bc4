"""Whole runs: one trace of the step, mesh invariance, exact resume, non-finite stop, default DPO."""

import dataclasses
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from align_jax import objectives, train
from conftest import ROOT, load_config, main_command, read_jsonl, subprocess_env

DPO = os.path.join(ROOT, "configs", "dpo.py")


def _cli(workdir, *overrides, config=f"{DPO}:smoke", devices=8, check=True):
  out = subprocess.run(
    main_command(f"--config={config}", f"--workdir={workdir}", *overrides),
    env=subprocess_env(devices),
    capture_output=True,
    text=True,
    timeout=600,
  )
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_step_traces_once(tmp_path, monkeypatch, devices8):
  traces = []
  dpo = objectives.OBJECTIVES["dpo"]

  def counting(*args, **kwargs):
    traces.append(1)  # Python runs only while jax traces the step.
    return dpo.fn(*args, **kwargs)

  monkeypatch.setitem(objectives.OBJECTIVES, "dpo", dataclasses.replace(dpo, fn=counting))
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.total_steps = 5
    cfg.mesh.shape = (1, 1, 1)
  result = train.run(cfg, str(tmp_path))
  assert int(result.state.step) == 5
  assert len(traces) == 1


def test_same_losses_on_every_mesh(tmp_path):
  losses = {}
  for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]:
    cfg = load_config("dpo", "smoke")
    with cfg.unlocked():
      cfg.mesh.shape, cfg.total_steps, cfg.log_every = shape, 3, 1
      cfg.testbed.exact_eval = False  # Only the losses are compared.
    workdir = tmp_path / "_".join(map(str, shape))
    train.run(cfg, str(workdir))
    losses[shape] = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
  assert len(losses[(1, 1, 1)]) == 3
  for shape, values in losses.items():
    np.testing.assert_allclose(values, losses[(1, 1, 1)], atol=1e-5, err_msg=str(shape))
  assert len(set(losses[(1, 1, 1)])) == 3  # training moved: the comparison is not of constants


def _state(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def test_sigkill_resume_is_bitwise_identical(tmp_path):
  """A BOND run with an EMA anchor: the optimizer state, the rollout's randomness, the anchor and
  the data position must all resume exactly (the offline DPO path is a subset of this loop)."""
  config, steps = f"{os.path.join(ROOT, 'configs', 'bond.py')}:smoke,anchor=ema", 20
  args = (
    f"--config.total_steps={steps}",
    "--config.checkpoint_every=5",
    "--config.eval_every=10",
    "--config.log_every=5",
    "--config.keep_checkpoints=3",
  )
  _cli(tmp_path / "straight", *args, config=config)  # Also caches the base LM for the next run.

  killed = tmp_path / "killed"
  proc = subprocess.Popen(
    main_command(f"--config={config}", f"--workdir={killed}", *args),
    env=subprocess_env(8),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not (killed / "checkpoints" / "5" / "commit_success.txt").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before its step-5 checkpoint"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert steps not in saved, f"the run finished before it was killed: {saved}"

  out = _cli(killed, *args, config=config)
  assert "resuming from step" in out.stdout
  straight, resumed = _state(tmp_path / "straight", steps), _state(killed, steps)
  assert jax.tree.structure(straight) == jax.tree.structure(resumed)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):  # params, anchor, stats
    np.testing.assert_array_equal(a, b)
  final = [json.load(open(d / "summary.json"))["final"] for d in (tmp_path / "straight", killed)]
  assert final[0] == final[1]
  last = [read_jsonl(d / "metrics.jsonl")[-1] for d in (tmp_path / "straight", killed)]
  assert {k: v for k, v in last[0].items() if not k.startswith("perf/")} == {
    k: v for k, v in last[1].items() if not k.startswith("perf/")
  }


def test_checkpoint_from_one_mesh_resumes_on_another(tmp_path):
  def run(workdir, shape, steps):
    cfg = load_config("dpo", "smoke")
    with cfg.unlocked():
      cfg.mesh.shape, cfg.total_steps, cfg.checkpoint_every, cfg.log_every = shape, steps, 3, 1
      cfg.testbed.exact_eval = False
    return train.run(cfg, str(workdir))

  run(tmp_path / "a", (8, 1, 1), 3)
  run(tmp_path / "a", (2, 2, 2), 6)  # Resumes the (8,1,1) checkpoint at step 3 on another mesh.
  run(tmp_path / "b", (8, 1, 1), 6)
  records = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # Steps 1-3 were not run again.
  resumed = {r["step"]: r["loss"] for r in records}
  straight = {
    r["step"]: r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss" in r
  }
  assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
  for s in straight:
    np.testing.assert_allclose(resumed[s], straight[s], atol=1e-5, err_msg=f"step {s}")


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  out = _cli(
    tmp_path,
    "--config.optim.lr=1e30",
    "--config.optim.clip_norm=0",
    "--config.total_steps=6",
    "--config.checkpoint_every=1",
    check=False,
  )
  assert out.returncode != 0
  line = [l for l in out.stderr.splitlines() if l.startswith("error: non-finite")]
  assert len(line) == 1, out.stderr[-2000:]
  bad_step = int(line[0].split(" at step ")[1].split(";")[0])
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved and max(saved) == bad_step - 1
  for leaf in jax.tree.leaves(_state(tmp_path, max(saved))["params"]):
    assert np.all(np.isfinite(leaf))


@pytest.mark.slow  # The default budget (300 steps): a study.
def test_default_dpo_raises_exact_reward(tmp_path):
  """The README's command, no flag: pretrains the base, trains DPO, reports exact metrics."""
  out = subprocess.run(
    main_command(f"--config={DPO}"),
    cwd=tmp_path,
    env=subprocess_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(tmp_path / "runs" / "dpo" / "summary.json"))
  initial, final = summary["initial"], summary["final"]
  # BT-labelled pairs favour higher reward; DPO must move the policy's exact expected reward up.
  assert final["exact/reward"] > initial["exact/reward"] + 0.2
  assert initial["exact/kl_policy_ref"] == pytest.approx(0.0, abs=1e-5)
  assert 0.0 < final["exact/kl_policy_ref"] < 10.0
  assert "exact metric" in out.stdout
  run = tmp_path / "runs" / "dpo"
  assert json.load(open(run / "config.json"))["objective"] == "dpo"
  records = read_jsonl(run / "metrics.jsonl")
  assert records and all("step" in r for r in records)
  assert any("exact/reward" in r for r in records)  # periodic exact evaluation
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
  assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())[-1] == 300
  print(f"default dpo wall time {summary['wall_time_s']:.1f}s on {summary['device_kind']}")
