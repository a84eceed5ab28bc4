"""The command line: bad input gets one clear line and a non-zero exit."""

import os
import subprocess

import pytest

from conftest import ROOT, main_command, subprocess_env

DPO = os.path.join(ROOT, "configs", "dpo.py")


def _run(tmp_path, *args):
  return subprocess.run(main_command(*args, f"--workdir={tmp_path / 'run'}"), cwd=tmp_path,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    ((f"--config={DPO}:smoke", "--config.no_such_key=1"), "no_such_key"),
    ((f"--config={DPO}:smoke", "--config.total_steps=abc"), "total_steps"),
    ((f"--config={DPO}:smoke", "--config.optim.lrr=0.1"), "lrr"),
    ((f"--config={ROOT}/configs/no_such_config.py",), "no_such_config.py"),
    ((f"--config={DPO}:smoke,no_such_arg=3",), "no_such_arg"),
    ((f"--config={DPO}:smoke", "--config.data.source=jsonl:/no/such/pairs.jsonl"),
     "/no/such/pairs.jsonl"),
    ((f"--config={DPO}:smoke", "--config.mesh.shape=(3,-1,1)"), "mesh.shape"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
  out = _run(tmp_path, *args)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if expected in l]
  assert lines, out.stderr[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
  data = tmp_path / "pairs.jsonl"
  data.write_text('{"prompt": [1, 2], "chosen": [3], "rejected": [4]}\n'
                  '{"prompt": [1, 2], "chosen": [3]}\n')
  out = _run(tmp_path, f"--config={DPO}:smoke", f"--config.data.source=jsonl:{data}")
  assert out.returncode != 0
  assert f"{data}:2: record has no field 'rejected'" in out.stderr
  assert "Traceback" not in out.stderr
