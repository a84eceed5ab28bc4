"""The command line: bad input gets one clear line and a non-zero exit."""

import os
import subprocess

import pytest

from conftest import ROOT, main_command, subprocess_env

DPO = os.path.join(ROOT, "configs", "dpo.py")


def _run(tmp_path, *args):
  return subprocess.run(
    main_command(*args, f"--workdir={tmp_path / 'run'}"),
    cwd=tmp_path,
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  "args, expected",
  [
    ((f"--config={DPO}:smoke", "--config.no_such_key=1"), "no_such_key"),
    ((f"--config={DPO}:smoke", "--config.total_steps=abc"), "total_steps"),
    ((f"--config={DPO}:smoke", "--config.optim.lrr=0.1"), "lrr"),
    ((f"--config={ROOT}/configs/no_such_config.py",), "no_such_config.py"),
    ((f"--config={DPO}:smoke,no_such_arg=3",), "no_such_arg"),
    (
      (f"--config={DPO}:smoke", "--config.data.source=jsonl:/no/such/pairs.jsonl"),
      "/no/such/pairs.jsonl",
    ),
    ((f"--config={DPO}:smoke", "--config.mesh.shape=(3,-1,1)"), "mesh.shape"),
  ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
  out = _run(tmp_path, *args)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if expected in l]
  assert lines, out.stderr[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
  data = tmp_path / "pairs.jsonl"
  data.write_text(
    '{"prompt": [1, 2], "chosen": [3], "rejected": [4]}\n{"prompt": [1, 2], "chosen": [3]}\n'
  )
  out = _run(tmp_path, f"--config={DPO}:smoke", f"--config.data.source=jsonl:{data}")
  assert out.returncode != 0
  assert f"{data}:2: record has no field 'rejected'" in out.stderr
  assert "Traceback" not in out.stderr


def test_a_bug_in_an_objective_keeps_its_traceback(tmp_path):
  """Only project errors (align_jax.errors.Error) become one line: a researcher's new objective
  that fails with a plain KeyError shows the traceback down to the failing line."""
  config = tmp_path / "broken.py"
  config.write_text(f'''
import dataclasses
import importlib.util

from align_jax import objectives


def broken_dpo(logp_BxK, batch, stats, **loss_cfg):
  return logp_BxK[:, 0] - batch["no_such_field_BxK"][:, 0], {{}}, stats


objectives.OBJECTIVES["broken_dpo"] = dataclasses.replace(objectives.get("dpo"), fn=broken_dpo)


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("dpo_config", {DPO!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.objective = "broken_dpo"
  return c
''')
  out = _run(tmp_path, f"--config={config}:smoke")
  assert out.returncode != 0
  assert "Traceback (most recent call last)" in out.stderr, out.stderr[-3000:]
  assert "in broken_dpo" in out.stderr and "KeyError: 'no_such_field_BxK'" in out.stderr


def test_console_is_for_people_and_info_goes_to_the_log_file(tmp_path):
  """The console: banner, progress, final table, where results are; absl INFO (each parameter's
  sharding, checkpoint manager messages) only in <workdir>/log.txt unless --verbosity=1."""
  out = _run(tmp_path, f"--config={DPO}:smoke")
  assert out.returncode == 0, out.stderr[-3000:]
  console = out.stdout + out.stderr
  assert "objective dpo" in out.stdout and "workdir" in out.stdout  # The banner.
  assert "step 6/6" in out.stdout and "exact metric" in out.stdout
  assert "summary.json" in out.stdout and "tensorboard --logdir" in out.stdout
  assert "param [" not in console and "checkpoint: saving" not in console, console[-3000:]
  run_lines = out.stdout[out.stdout.rindex("align_jax | ") :].splitlines()  # After the base LM's.
  assert len(run_lines) < 40, out.stdout
  log = (tmp_path / "run" / "log.txt").read_text()
  assert "param ['embed_VxD']" in log and "checkpoint: saving step 6" in log
  verbose = _run(
    tmp_path / "v" if (tmp_path / "v").mkdir() is None else None,
    f"--config={DPO}:smoke",
    "--verbosity=1",
  )
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  assert "param ['embed_VxD']" in verbose.stderr
