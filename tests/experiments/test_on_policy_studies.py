"""The on-policy paper studies (experiments/fdpg.py, bond.py, jbond_vs_reinforce.py), --quick.

Each runs its reduced grid (smoke configs, 4 steps, one seed, one device) through `study.main`
exactly as the command line does, then checks the written table, numbers and plot against the
runs and exact facts: the study's own enumeration of the reference agrees with the runs' initial
evaluation (π = π_ref at step 0), KL(BoN_N‖π_ref) ≤ log N − (N−1)/N, the pointwise target
satisfies its constraint, and no policy beats the KL-regularised optimum's E[r] − β·KL. The
expected Distinct-n metric these studies report is checked against brute-force enumeration.
"""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.testbed import exact
from conftest import run_study_quick


def _run(name, tmp_path):
  out, md = run_study_quick(name, tmp_path)
  for run in out["runs"]:
    assert run["initial"]["exact/kl_policy_ref"] == pytest.approx(0.0, abs=1e-6)
    for m in (run["initial"], run["final"], *run["curve"]):
      assert all(0 <= m[f"exact/distinct_{k}"] <= 1 for k in ("1", "2", "seq"))
  return out, md


def _finite(run, but=()):
  return all(
    math.isfinite(v) for m in (run["initial"], run["final"]) for k, v in m.items() if k not in but
  )


def test_expected_distinct_n_equals_enumeration_of_all_sample_tuples():
  vocab, length, m = 2, 2, 4
  responses_YxT = exact._lexicographic(vocab, length)
  rng = np.random.default_rng(0)
  logp_XxY = np.asarray(exact.normalize(jnp.asarray(2.0 * rng.normal(size=(2, vocab**length)))))
  logw_X = np.log([0.3, 0.7])
  got = exact.expected_distinct(
    jnp.asarray(logp_XxY),
    responses_YxT,
    jnp.asarray(logw_X),
    num_samples=m,
    vocab=vocab,
    orders=(1, 2),
  )
  want = {1: 0.0, 2: 0.0}
  for x, w in enumerate(np.exp(logw_X)):  # Every ordered M-tuple of responses, with its prob.
    for ys in itertools.product(range(vocab**length), repeat=m):
      prob = w * np.exp(sum(logp_XxY[x, y] for y in ys))
      for n in (1, 2):
        grams = {tuple(responses_YxT[y, i : i + n]) for y in ys for i in range(length - n + 1)}
        want[n] += prob * len(grams) / (m * (length - n + 1))
  assert float(got["exact/distinct_1"]) == pytest.approx(want[1], abs=1e-5)
  assert float(got["exact/distinct_2"]) == pytest.approx(want[2], abs=1e-5)
  assert float(got["exact/distinct_seq"]) == pytest.approx(want[2], abs=1e-5)  # n = T


def test_fdpg_quick(tmp_path):
  out, md = _run("fdpg", tmp_path)
  runs = {r["point"]: r for r in out["runs"]}
  assert set(runs) == {"divergence-js_task-pointwise", "divergence-forward_kl_task-distributional"}
  pointwise, distributional = (
    runs[f"divergence-{p}"] for p in ("js_task-pointwise", "forward_kl_task-distributional")
  )
  # KL(π‖p) = ∞ against the hard constraint, for π of full support.
  assert _finite(pointwise, but=("exact/kl_policy_target",)) and _finite(distributional)
  assert math.isinf(pointwise["final"]["exact/kl_policy_target"])
  targets = out["targets"]
  assert targets["pointwise"]["exact/constraint_rate"] == pytest.approx(1.0, abs=1e-6)
  assert targets["distributional"]["exact/moments"] == pytest.approx(0.5, abs=1e-5)
  # The study's enumeration of p and a against the run's own evaluation at π = a: KL(p‖a).
  for task, run in (("pointwise", pointwise), ("distributional", distributional)):
    assert targets[task]["exact/kl_policy_ref"] == pytest.approx(
      run["initial"]["exact/kl_target_policy"], rel=1e-4
    )
  assert set(out["points"]) == {"pointwise,js", "distributional,forward_kl"}
  rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ")]
  assert rows[:4] == ["| f", "| base a (start)", "| target p", "| JS"]
  assert "**Findings.** Not testable on this grid" in md  # One divergence per target here.


def test_bond_quick(tmp_path):
  out, md = _run("bond", tmp_path)
  runs = {r["point"]: r for r in out["runs"]}
  assert set(runs) == {"n-4_beta-0.5", "n-4_beta-0.5_anchor-ema_total_steps-300_eval_every-25"}
  assert all(_finite(r) for r in runs.values())
  curve = {int(n): c for n, c in out["bon_curve"].items()}
  start = runs["n-4_beta-0.5"]["initial"]
  assert curve[1]["kl_ref"] == pytest.approx(0.0, abs=1e-6)
  assert curve[1]["reward"] == pytest.approx(start["exact/reward"], abs=1e-5)
  assert curve[4]["kl_ref"] == pytest.approx(start["exact/kl_target_policy"], rel=1e-4)
  for n, c in curve.items():  # Ties only lower KL(BoN‖π_ref) below the continuous-limit value.
    assert c["kl_ref"] <= math.log(n) - (n - 1) / n + 1e-5
  assert all(np.diff([c["reward"] for c in curve.values()]) > 0)
  assert out["anchors"]["ema"]["steps"] == [0, 2, 4]
  assert set(out["points"]) == {"beta=0.5,n=4"}
  assert "**Finding (paper Fig. 4" in md


def test_jbond_vs_reinforce_quick(tmp_path):
  out, md = _run("jbond_vs_reinforce", tmp_path)
  assert {(r["group"], r["point"]) for r in out["runs"]} == {
    ("jbond", "loss.gamma-0.5"),
    ("rloo", "loss.beta-1.0"),
  }
  assert all(_finite(r) for r in out["runs"])
  front = out["frontier"]
  assert np.all(np.diff(front["kl"]) > 0) and np.all(np.diff(front["reward"]) > 0)
  beta_B, kl_B, reward_B = map(np.array, (front["beta"], front["kl"], front["reward"]))
  for point in out["points"].values():  # π_β maximises E[r] − β·KL(π‖π_ref): nobody beats it.
    for path in point["paths"]:
      value_PxB = np.array(path["reward"])[:, None] - np.array(path["kl_ref"])[:, None] * beta_B
      assert np.all(value_PxB <= reward_B - beta_B * kl_B + 1e-4)
  assert len(path["step"]) == 3  # Step 0, the evaluation at 2, the final one.
  assert "**Finding (paper Fig. 7" in md


def test_frontier_quick(tmp_path):
  """GRPO and RLOO smoke runs on the exact reward–KL plane: the frontier (π_β by bisection on β
  at each run's own KL) is never beaten — every evaluated point's regret is ≥ 0 — and the
  frontier's entropy falls as KL grows (the optimum spends diversity to gain reward)."""
  out, md = _run("frontier", tmp_path)
  assert {r["group"] for r in out["runs"]} == {"GRPO", "RLOO"}
  assert all(_finite(r) for r in out["runs"])
  front = out["frontier"]
  assert np.all(np.diff(front["kl"]) > 0) and np.all(np.diff(front["reward"]) > 0)
  assert np.all(np.diff(front["entropy"]) < 0)
  for label, method in out["methods"].items():
    assert method["min_regret"] >= -1e-4, label  # π_β is optimal at equal KL.
    for path in method["paths"]:
      assert len(path["step"]) == 3  # Step 0, the evaluation at 2, the final one.
      # π = π_ref = π_∞ at KL 0, where the frontier's slope is infinite (E[r] grows like
      # √(2·Var·KL)): float32's KL ~1e-8 at the start is worth ~1e-4 of reward.
      assert path["regret"][0] == pytest.approx(0.0, abs=1e-3)
    assert method["final_regret"][0] > 0 and method["final_kl"][0] > 0
  assert md.count("ends at KL") == 2 and "**What the exact numbers show.**" in md
