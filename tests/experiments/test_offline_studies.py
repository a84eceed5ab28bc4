"""The offline paper studies (experiments/lipo.py, experiments/d2o_aot.py) in --quick mode.

Each runs its reduced grid (smoke configs, a few steps, one seed, one device) through
`study.main` exactly as the command line does, then checks the written table, numbers and plot
against the runs: the grid is complete, every number is finite, and exact facts hold — at the
start π = π_ref, so KL(π‖π_ref) = 0, the exact win rate against π_ref is ½ and every implicit
reward is 0; D2O's harm rate falls. The quick points are the configs' smoke defaults (AOT at
DPO's β = 0.1), so in the suite they share compiled programs with tests/test_objective_runs.py.
"""

import math

import pytest

from conftest import run_study_quick


def _run(name, tmp_path):
  out, md = run_study_quick(name, tmp_path)
  for run in out["runs"]:
    assert all(math.isfinite(v) for v in (*run["initial"].values(), *run["final"].values()))
    assert run["initial"]["exact/kl_policy_ref"] == pytest.approx(0.0, abs=1e-6)
    assert run["initial"]["exact/win_rate"] == pytest.approx(0.5, abs=1e-5)
  return out, md


def test_lipo_quick(tmp_path):
  out, md = _run("lipo", tmp_path)
  points = {(r["point"], r["seed"]) for r in out["runs"]}
  assert points == {("k-4_loss-lambda", 0), ("k-4_loss-listmle", 0)}
  assert out["meta"]["command"] == "python experiments/lipo.py --quick"
  for r in out["runs"]:  # Trained on labels that favour higher reward: it beats the reference.
    assert r["final"]["exact/win_rate"] > 0.5 and r["final"]["exact/kl_policy_ref"] > 0
  rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert [row.split(" | ")[:2] for row in rows] == [["| ListMLE (DPO_PL)", "4"], ["| LiPO-λ", "4"]]
  assert set(out["points"]) == {"lipo,k=4", "listmle,k=4"}
  assert "**Finding.**" in md


def test_d2o_aot_quick(tmp_path):
  out, md = _run("d2o_aot", tmp_path)
  groups = {}
  for r in out["runs"]:
    groups.setdefault(r["group"], []).append(r)
  assert {g: len(rs) for g, rs in groups.items()} == {"d2o": 1, "dpo": 1, "aot": 1}
  for r in groups["d2o"]:  # Trained against harmful negatives only: the harm rate falls.
    assert r["final"]["exact/harm"] < r["initial"]["exact/harm"]
  for r in out["runs"]:  # π = π_ref: every implicit reward is 0, so no quantile margin yet.
    assert r["initial"]["exact/fsd_margin"] == 0.0 and r["initial"]["exact/fsd_violation"] == 0.0
  for g in ("dpo", "aot"):  # Trained on the pairs: chosen log-ratios pull ahead.
    assert groups[g][0]["final"]["exact/fsd_margin"] > 0
  assert len(out["d2o"]) == 1 and len(out["aot"]) == 2
  aot_vs_dpo = out["aot_minus_dpo"]["aot,beta=0.1"]  # The seed-paired difference, recomputed.
  assert aot_vs_dpo["win_rate"][0] == pytest.approx(
    groups["aot"][0]["final"]["exact/win_rate"] - groups["dpo"][0]["final"]["exact/win_rate"],
    abs=1e-12,
  )
  assert "**Finding (AOT).** " in md and "β = 0.1" in md
