"""A workdir that cannot be ruined: its fingerprint, its lock, finite checkpoints only, validated
hyperparameters, and every failure a user can cause as one `error:` line without a traceback."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from align_jax import train
from align_jax import workdir as workdir_lib
from align_jax.errors import ConfigError, NonFiniteError
from conftest import ROOT, load_config, main_command, read_jsonl, subprocess_env

DPO = f"{ROOT}/configs/dpo.py:smoke"


def _config(name="dpo", arg="smoke", **fields):
  """A smoke config with `fields` set ("optim.lr": 1e-2 style keys)."""
  cfg = load_config(name, arg)
  with cfg.unlocked():
    cfg.testbed.exact_eval = False  # Losses and states are compared, not exact metrics.
    for key, value in fields.items():
      *path, last = key.split(".")
      node = cfg
      for part in path:
        node = node[part]
      node[last] = value
  return cfg


def _snapshot(path) -> dict:
  """{relative path: bytes} of every file under `path`."""
  out = {}
  for directory, _, files in os.walk(path):
    for name in files:
      full = os.path.join(directory, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def _steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _losses(workdir) -> dict[int, float]:
  return {
    r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r
  }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished smoke DPO run (checkpoints at steps 3 and 6); tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  train.run(load_config("dpo", "smoke"), str(workdir))
  return workdir


# ---- 1. The fingerprint ---------------------------------------------------------------------


def test_a_changed_config_stops_before_anything_is_written(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = _snapshot(workdir)
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.loss.beta, cfg.seed, cfg.keep_checkpoints = 0.2, 1, 1
  with pytest.raises(ConfigError) as e:
    train.run(cfg, str(workdir))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"workdir {str(workdir)!r} holds checkpoints of a run with another")
  # Each field old → new; keep_checkpoints may change on resume, so it is not listed.
  assert "loss.beta 0.1 → 0.2" in message and "seed 0 → 1" in message
  assert "keep_checkpoints" not in message
  assert "seed cannot change on resume: use a new --workdir" in message
  assert _snapshot(workdir) == before  # Not a byte written, moved or deleted.

  # Only safe fields changed: --allow_config_change resumes and records the change.
  with cfg.unlocked():
    cfg.seed, cfg.total_steps = 0, 8
  with pytest.raises(ConfigError, match="pass --allow_config_change"):
    train.run(cfg, str(workdir))
  assert _snapshot(workdir) == before
  result = train.run(cfg, str(workdir), allow_config_change=True)
  assert int(result.state.step) == 8
  marker = [r for r in read_jsonl(workdir / "metrics.jsonl") if "resumed_from" in r]
  assert marker == [
    {
      "step": 6,
      "resumed_from": 6,
      "config_change": {"loss.beta": [0.1, 0.2], "target.beta": [0.1, 0.2]},
    }
  ]
  # config.json is the new run's; the previous one is kept as history.
  assert json.load(open(workdir / "config.json"))["loss"]["beta"] == 0.2
  assert json.load(open(workdir / "config.1.json"))["loss"]["beta"] == 0.1
  assert json.load(open(workdir / "fingerprint.json"))["fields"]["loss.beta"] == 0.2


def test_a_workdir_from_before_a_field_existed_resumes_at_its_default(finished, tmp_path):
  """A run recorded before data.pack_len existed (the field dropped from its fingerprint) resumes
  with the field at its default, and stops with one line naming it at another value."""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  recorded = json.load(open(workdir / "fingerprint.json"))
  for key in ("data.pack_len", "data.pack_records"):
    del recorded["fields"][key]
  (workdir / "fingerprint.json").write_text(json.dumps(recorded))
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.data.pack_len = 64
  with pytest.raises(ConfigError, match=r"data.pack_len \(absent\) → 64"):
    train.run(cfg, str(workdir))
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.total_steps = 7
  result = train.run(cfg, str(workdir))
  assert int(result.state.step) == 7
  assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r][-1] == 7


def test_fingerprint_leaves_out_the_fields_a_resume_may_change():
  config = {"total_steps": 6, "mesh": {"shape": [1, -1, 1]}, "optim": {"lr": 1e-3}, "seed": 0}
  assert workdir_lib.fingerprint(config) == {"optim.lr": 1e-3, "seed": 0}
  changed = workdir_lib.changes({"optim.lr": 1e-3, "seed": 0}, {"optim.lr": 1e-2, "lora.rank": 4})
  assert changed == {
    "lora.rank": ["(absent)", 4],
    "optim.lr": [1e-3, 1e-2],
    "seed": [0, "(absent)"],
  }
  # A field the recorded run lacked (added to align_jax since) is no change at its default.
  defaults = {"data.pack_len": 0, "lora.rank": 0}
  old = {"optim.lr": 1e-3}
  assert workdir_lib.changes(old, {"optim.lr": 1e-3, "data.pack_len": 0}, defaults) == {}
  assert workdir_lib.changes(old, {"optim.lr": 1e-3, "data.pack_len": 64}, defaults) == {
    "data.pack_len": ["(absent)", 64]
  }


# ---- 2. The lock ----------------------------------------------------------------------------


def test_a_second_run_in_a_locked_workdir_names_the_holder(tmp_path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(
    main_command(
      f"--config={DPO}",
      f"--workdir={workdir}",
      "--config.total_steps=100000",
      "--config.checkpoint_every=0",
      "--config.log_every=1000",
      "--config.eval_every=0",
      "--config.testbed.exact_eval=false",
    ),
    env=subprocess_env(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  holder = f"pid {first.pid} on host {socket.gethostname()}"
  deadline = time.time() + 120
  while not (workdir / "run.lock").exists() or holder not in (workdir / "run.lock").read_text():
    assert first.poll() is None and time.time() < deadline, "the first run never took its lock"
    time.sleep(0.05)
  second = _cli(tmp_path, f"--config={DPO}", f"--workdir={workdir}")
  assert second.returncode == 1
  line = _error_line(second)
  assert line.startswith(f"error: workdir {str(workdir)!r} is in use by {holder} since ")
  assert line.endswith("wait for that run to end, stop it, or use another --workdir")
  assert first.poll() is None  # The first run goes on.

  first.send_signal(signal.SIGKILL)  # Its holder dies: the kernel drops the lock.
  first.wait()
  assert holder in (workdir / "run.lock").read_text()  # What it wrote stays ...
  with workdir_lib.claim(str(workdir), {}):  # ... but the lock is free.
    assert f"pid {os.getpid()} on host" in (workdir / "run.lock").read_text()
  assert (workdir / "run.lock").read_text() == ""  # Released on exit.


def test_the_lock_is_per_process_and_exclusive_within_one(tmp_path):
  """Process i of a multi-process run locks run.<i>.lock; a second claim of the same file, even
  from the same process (another open file), is refused."""
  path = str(tmp_path)
  with workdir_lib.claim(path, {}, process=0), workdir_lib.claim(path, {}, process=1):
    assert sorted(os.listdir(tmp_path)) == ["run.1.lock", "run.lock"]  # Nothing else yet.
    with (
      pytest.raises(ValueError, match=f"in use by pid {os.getpid()} on host"),
      workdir_lib.claim(path, {}, process=1),
    ):
      pass


# ---- 3. Finite checkpoints only ---------------------------------------------------------------


def test_a_diverging_run_keeps_its_newest_finite_checkpoint_and_resumes_from_it(tmp_path):
  # Diverging before the first checkpoint: the message names no checkpoint that does not exist.
  early = tmp_path / "early"
  with pytest.raises(NonFiniteError, match="at step 2; stopped, no checkpoint was saved before it"):
    train.run(_config(**{"optim.lr": 1e30}), str(early))
  assert _steps(early) == []

  # Three good steps, then lr = 1e39 (inf in float32): loss and gradient of step 4 are finite,
  # the state after it is not, and it is never saved.
  fields = {"checkpoint_every": 1, "log_every": 1}
  workdir = tmp_path / "run"
  train.run(_config(**fields, total_steps=3), str(workdir))
  with pytest.raises(NonFiniteError) as e:
    train.run(_config(**fields, **{"optim.lr": 1e39}), str(workdir), allow_config_change=True)
  assert str(e.value).startswith(
    "non-finite parameters or optimizer state after step 4; stopped, the newest checkpoint "
    f"(finite) is step 3 in {workdir}/checkpoints"
  )
  assert _steps(workdir) == [2, 3]
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(workdir, "checkpoints", "3", "state"))
  leaves = jax.tree.leaves((state["params"], state["opt_state"]))
  assert leaves and all(
    np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating)
  )

  # Back to the first learning rate: it resumes from step 3 exactly as if nothing had happened.
  resumed = train.run(_config(**fields), str(workdir), allow_config_change=True)
  straight = tmp_path / "straight"
  straight_state = train.run(_config(**fields), str(straight)).state
  assert int(resumed.state.step) == 6
  tail = read_jsonl(workdir / "metrics.jsonl")
  tail = tail[
    tail.index({"step": 3, "resumed_from": 3, "config_change": {"optim.lr": [1e39, 1e-3]}}) :
  ]
  assert {r["step"]: r["loss"] for r in tail if "loss" in r} == {
    s: v for s, v in _losses(straight).items() if s > 3
  }
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(straight_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # params, optimizer, rng


# ---- 4. Validated hyperparameters -------------------------------------------------------------


@pytest.mark.parametrize(
  "name, fields, message",
  [
    ("dpo", {"keep_checkpoints": 0}, "keep_checkpoints=0 must be an integer >= 1 (0 would keep"),
    (
      "dpo",
      {"loss.beta": 0.0},
      "loss.beta=0.0 must be finite and > 0 (it scales β·log π/π_ref) (objective 'dpo')",
    ),
    ("kto", {"loss.beta": -0.1}, "loss.beta=-0.1 must be finite and > 0"),
    ("dpo", {"optim.lr": -1e-3}, "optim.lr=-0.001 must be finite and >= 0"),
    ("dpo", {"optim.lr": float("nan")}, "optim.lr=nan must be finite and >= 0"),
    ("dpo", {"model.n_layers": 0}, "model.n_layers=0 must be an integer >= 1"),
    ("dpo", {"data.batch_size": 0}, "data.batch_size=0 must be an integer >= 1"),
    ("dpo", {"optim.b2": 1.0}, "optim.b2=1.0 must be in [0, 1)"),
    ("dpo", {"sampling.top_p": 0.0}, "sampling.top_p=0.0 must be in (0, 1]"),
    ("bond", {"loss.beta": 1.5}, "loss.beta=1.5 must be in [0, 1] (objective 'bond')"),
    ("reinforce", {"loss.beta": -1.0}, "loss.beta=-1.0 must be finite and >= 0"),
    ("rdpo", {"loss.label_smoothing": 0.5}, "loss.label_smoothing=0.5 must be in [0, 0.5)"),
    ("ipo", {"loss.tau": 0.0}, "loss.tau=0.0 must be finite and > 0"),
    ("dprm", {"loss.cost": ((0.0, 2.0, 1.0), (2.0, 0.0, 2.0), (1.0, 2.0, 0.0))}, "Monge property"),
    (
      "dpo",
      {"data.batch_size": 12},
      "data.batch_size=12 does not split over the 8 devices of the mesh axes data x fsdp",
    ),
  ],
)
def test_hyperparameters_are_validated_before_the_workdir_is_touched(
  tmp_path, name, fields, message
):
  cfg = load_config(name, "smoke")
  with cfg.unlocked(), cfg.ignore_type():
    for key, value in fields.items():
      section, _, field = key.rpartition(".")
      (cfg[section] if section else cfg)[field] = value
  with pytest.raises(ConfigError) as e:
    train.run(cfg, str(tmp_path / "run"))
  assert message in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_every_config_and_sweep_point_passes_the_start_up_checks():
  from align_jax import config_lib, objectives, sweep

  checked = 0
  for name in sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")):
    path = os.path.join(ROOT, "configs", name)
    configs = [sweep.load(path), sweep.load(path, "smoke")]
    if hasattr(sweep.module(path), "get_sweep"):
      configs += [r.config(path) for r in sweep.runs(path)]
    for cfg in configs:
      config_lib.check(cfg, objectives.get(cfg.objective).checks)
      config_lib.check(cfg, config_lib.CHECKS)
      checked += 1
  assert checked > 100


# ---- 5. Every failure a user can cause: one line --------------------------------------------


def _cli(cwd, *args, terminate_when=None):
  """The CLI in a subprocess; with `terminate_when` (a path), SIGTERM every 5 ms once it exists."""
  out, err = cwd / "stdout.txt", cwd / "stderr.txt"
  with open(out, "w") as stdout, open(err, "w") as stderr:
    proc = subprocess.Popen(
      main_command(*args), cwd=cwd, env=subprocess_env(8), stdout=stdout, stderr=stderr
    )
    deadline = time.time() + 300
    while terminate_when is not None and proc.poll() is None:
      assert time.time() < deadline
      if os.path.exists(terminate_when):
        proc.send_signal(signal.SIGTERM)
      time.sleep(0.005)
    proc.wait(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def _error_line(out) -> str:
  """The one `error:` line of a failed run (and no traceback anywhere)."""
  console = out.stdout + out.stderr
  assert "Traceback" not in console, console[-3000:]
  lines = [l for l in console.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, console[-3000:]
  return lines[0]


def _syntax_error(tmp, finished):
  (tmp / "broken.py").write_text("def get_config(arg=None:\n  return None\n")
  return [f"--config={tmp}/broken.py", f"--workdir={tmp}/run"]


def _unknown_key(tmp, finished):
  return [f"--config={DPO}", f"--workdir={tmp}/run", "--config.totl_steps=3"]


def _workdir_is_a_file(tmp, finished):
  (tmp / "run").write_text("")
  return [f"--config={DPO}", f"--workdir={tmp}/run"]


def _data_is_a_directory(tmp, finished):
  return [f"--config={DPO}", f"--workdir={tmp}/run", f"--config.data.source=jsonl:{tmp}"]


def _data_cannot_be_read(tmp, finished):  # Reading it fails with EIO, for root as for anyone.
  return [f"--config={DPO}", f"--workdir={tmp}/run", "--config.data.source=jsonl:/proc/self/mem"]


def _batch_does_not_divide(tmp, finished):
  return [f"--config={DPO}", f"--workdir={tmp}/run", "--config.data.batch_size=12"]


def _mesh_does_not_divide(tmp, finished):
  return [f"--config={DPO}", f"--workdir={tmp}/run", "--config.mesh.shape=(3,-1,1)"]


def _disk_full(tmp, finished):  # metrics.jsonl's writes fail with ENOSPC.
  (tmp / "run").mkdir()
  os.symlink("/dev/full", tmp / "run" / "metrics.jsonl")
  return [f"--config={DPO}", f"--workdir={tmp}/run"]


def _every_checkpoint_damaged(tmp, finished):
  shutil.copytree(finished, tmp / "run")
  for step in _steps(tmp / "run"):
    os.remove(tmp / "run" / "checkpoints" / str(step) / "commit_success.txt")
  return [f"--config={DPO}", f"--workdir={tmp}/run"]


def _model_changed_on_resume(tmp, finished):
  shutil.copytree(finished, tmp / "run")
  return [f"--config={DPO}", f"--workdir={tmp}/run", "--config.model.d_model=48"]


def _keep_no_checkpoint(tmp, finished):
  return [f"--config={DPO}", f"--workdir={tmp}/run", "--config.keep_checkpoints=0"]


def _beta_zero(tmp, finished):
  return [f"--config={DPO}", f"--workdir={tmp}/run", "--config.loss.beta=0"]


def _diverged(tmp, finished):
  return [f"--config={DPO}", f"--workdir={tmp}/run", "--config.optim.lr=1e30"]


def _sigterm_after_the_last_step(tmp, finished):
  return [f"--config={DPO}", f"--workdir={tmp}/run"]


FAILURES = {  # name: (arguments, exit status, what the one line says; None: no error line)
  "config file does not parse": (_syntax_error, 1, "broken.py:1: "),
  "unknown key": (
    _unknown_key,
    1,
    (
      "error: the config has no field 'totl_steps'; did you mean \"total_steps\" instead of "
      "\"totl_steps\"?; check the --config.* overrides"
    ),
  ),
  "workdir is a file": (_workdir_is_a_file, 1, "/run' is a file, not a directory"),
  "data file is a directory": (_data_is_a_directory, 1, "is a directory, not a file"),
  "data file cannot be read": (_data_cannot_be_read, 1, "/proc/self/mem cannot be read"),
  "batch does not divide": (_batch_does_not_divide, 1, "data.batch_size=12 does not split"),
  "mesh does not divide": (_mesh_does_not_divide, 1, "mesh.shape (3, -1, 1) does not divide 8"),
  "disk full": (_disk_full, 1, "error: No space left on device while writing the run in"),
  "every checkpoint damaged": (_every_checkpoint_damaged, 1, "restores: step 6: "),
  "model changed on resume": (_model_changed_on_resume, 1, "model.d_model 32 → 48"),
  "keep_checkpoints=0": (_keep_no_checkpoint, 1, "keep_checkpoints=0 must be an integer >= 1"),
  "loss.beta=0": (_beta_zero, 1, "loss.beta=0.0 must be finite and > 0"),
  "diverged": (_diverged, 1, "non-finite grad_norm=nan at step 2; stopped, no checkpoint was"),
  "SIGTERM after the last step": (_sigterm_after_the_last_step, 0, None),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_user_caused_failure_is_one_line(tmp_path, finished, case):
  make, status, expected = FAILURES[case]
  args = make(tmp_path, finished)
  summary = tmp_path / "run" / "summary.json"
  out = _cli(tmp_path, *args, terminate_when=summary if status == 0 else None)
  assert out.returncode == status, (out.stdout + out.stderr)[-3000:]
  if expected is None:
    assert "Traceback" not in out.stderr and summary.exists(), out.stderr[-3000:]
    assert not any(l.startswith("error:") for l in out.stderr.splitlines())
  else:
    assert expected in _error_line(out)


def test_a_full_disk_while_checkpointing_is_one_line(tmp_path):
  """The workdir on a 700 KB tmpfs (a private mount namespace): the step-1 checkpoint fits, the
  step-2 one does not. Orbax's failing background writes end in one line."""
  if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
    pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
  disk = tmp_path / "disk"
  disk.mkdir()
  command = " ".join(
    main_command(
      f"--config={DPO}",
      f"--workdir={disk}/run",
      "--config.checkpoint_every=1",
      "--config.keep_checkpoints=6",
    )
  )
  script = f"mount -t tmpfs -o size=700k tmpfs {disk} && {command}; echo status $?"
  script += f"; ls {disk}/run/checkpoints"
  out = subprocess.run(
    ["unshare", "-rm", "sh", "-c", script],
    cwd=tmp_path,
    env=subprocess_env(1),  # One device: one checkpoint takes about 350 KB.
    capture_output=True,
    text=True,
    timeout=300,
  )
  line = _error_line(out)
  assert line.startswith(
    f"error: a checkpoint could not be written to {disk}/run/checkpoints: No space left on "
    "device; the checkpoints saved before it are kept"
  )
  assert "status 1" in out.stdout and "\n1\n" in out.stdout  # Step 1's checkpoint is there.
