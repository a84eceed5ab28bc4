"""The first install command (`pip install -e .`) has what running needs: no module of the package,
and no run, imports a test-only dependency (torch, transformers, matplotlib, pytest) or
TensorFlow. Checked in a fresh interpreter where importing them fails as if they were not
installed: every module is imported and an SFT run with validation completes."""

import os
import subprocess
import sys

from conftest import ROOT, subprocess_env

BLOCKED = ("torch", "transformers", "matplotlib", "pytest", "tensorflow")  # Optional imports of
# the core stack (tensorboardX tries torch) see them as not installed.

_SCRIPT = """
import importlib, json, os, pkgutil, sys
BLOCKED = {blocked!r}

import importlib.abc, importlib.machinery

class Blocked(importlib.abc.Loader):  # Imports fail as for a package that is not installed.
  def create_module(self, spec):
    raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)

  def exec_module(self, module):
    pass

class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      return importlib.machinery.ModuleSpec(name, Blocked())

sys.meta_path.insert(0, Blocker())
import align_jax
names = [m.name for m in pkgutil.walk_packages(align_jax.__path__, "align_jax.")]
ENTRY_POINTS = {{"align_jax.export", "align_jax.sweep", "align_jax.plan"}}  # Their absl flags clash
for name in names:  # with main's; what they import is imported here through the others.
  if name not in ENTRY_POINTS:
    importlib.import_module(name)

# A whole run: SFT of a fresh tiny model on token-id records, a quarter held out for validation.
from align_jax import config_lib, train
path = os.path.join({tmp!r}, "corpus.jsonl")
with open(path, "w") as f:
  for i in range(16):
    f.write(json.dumps({{"text": [1 + (i + j) % 7 for j in range(6)]}}) + "\\n")
c = config_lib.base()
config_lib.set_model(c, "tiny")
c.objective, c.init_checkpoint, c.total_steps, c.log_every = "sft", "", 2, 1
c.data.source, c.data.batch_size, c.data.eval_fraction = f"jsonl:{{path}}", 4, 0.25
c.mesh.shape = (1, 1, 1)
result = train.run(c, os.path.join({tmp!r}, "run"))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"modules": len(names), "final": result.summary["final"], "loaded": loaded}}))
"""


def test_the_package_and_a_run_need_no_test_dependency(tmp_path):
  out = subprocess.run(
    [sys.executable, "-c", _SCRIPT.format(blocked=BLOCKED, tmp=str(tmp_path))],
    cwd=ROOT,
    env={**subprocess_env(1), "PYTHONPATH": ROOT},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  import json

  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["modules"] > 50 and report["loaded"] == []
  assert set(report["final"]) == {
    "eval/loss",
    "eval/objective/nll_per_token",
    "eval/objective/perplexity",
  }
  assert os.path.isfile(tmp_path / "run" / "summary.json")
