"""Every config file builds, names a known objective, documents its command, and has a smoke run."""

import os

import pytest

from align_jax import objectives
from conftest import ROOT, load_config
from test_objective_runs import OFFLINE
from test_on_policy import ON_POLICY

NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
# pretrain_testbed's smoke run happens inside every smoke run above (the cached base LM).
RUN_ELSEWHERE = {"pretrain_testbed", "bt_reward", "dprm"}  # Reward models: own test.


def test_every_config_smoke_variant_runs_in_the_suite():
  assert set(NAMES) == set(OFFLINE) | set(ON_POLICY) | RUN_ELSEWHERE


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_with_known_objective_and_documented_command(name):
  for arg in (None, "smoke"):
    cfg = load_config(name, arg)
    objectives.get(cfg.objective)
    assert cfg.total_steps >= 1
  text = open(os.path.join(ROOT, "configs", f"{name}.py")).read()
  assert f"python -m align_jax.main --config=configs/{name}.py" in text
  assert load_config(name, "smoke").total_steps < load_config(name).total_steps


def test_lipo_args_choose_list_size_and_loss():
  cfg = load_config("lipo", "k=8,loss=listmle,smoke")
  assert (cfg.objective, cfg.data.list_size) == ("listmle", 8)
  assert load_config("lipo").objective == "lipo"
  with pytest.raises(ValueError, match="loss='nope'"):
    load_config("lipo", "loss=nope")
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "lipo_cfg", os.path.join(ROOT, "configs", "lipo.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep()
  assert len(sweep) == 15 and all(load_config("lipo", a).data.list_size in (2, 4, 8) for a in sweep)
