"""On-policy objectives (BOND, J-BOND, REINFORCE) through the rollout: exact metrics move as theory says."""

import jax
import numpy as np
import pytest

from align_jax import train
from align_jax.testbed import target as tb_target
from align_jax.testbed import task
from conftest import load_config, read_jsonl


ON_POLICY = [
  "bond",
  "jbond",
  "reinforce",
  "rloo",
  "remax",
  "fdpg",
  "gdc",
  "grpo",
  "dr_grpo",
  "dapo",
  "gspo",
  "gkd",
]
# The exact divergence each f-DPG divergence minimises (ALGORITHMS.md §1.4).
OWN_DIVERGENCE = {
  "forward_kl": "exact/kl_target_policy",
  "reverse_kl": "exact/kl_policy_target",
  "tv": "exact/tv",
  "js": "exact/js",
}


def _smoke(name, tmp_path, **overrides):
  cfg = load_config(name, "smoke")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    for key, value in overrides.items():
      cfg[key] = value
  return cfg, train.run(cfg, str(tmp_path))


def test_bond_smoke_moves_towards_best_of_n(tmp_path):
  """Six steps from the base: the exact Jeffreys divergence to BoN_4(π_ref) falls (measured
  1.12 → 0.85) and the quantile E_π[p≤] and reward rise (0.506 → 0.555, 2.20 → 2.40)."""
  _, result = _smoke("bond", tmp_path)
  initial, final = result.summary["initial"], result.summary["final"]
  assert final["exact/jeffreys_bon"] < 0.9 * initial["exact/jeffreys_bon"]
  assert final["exact/bon_quantile"] > initial["exact/bon_quantile"] + 0.02
  assert final["exact/reward"] > initial["exact/reward"] + 0.05
  # Before training the policy is the reference: BoN_4 is log 4 − 3/4 ≈ 0.636 nats away at most.
  assert initial["exact/kl_policy_ref"] == pytest.approx(0.0, abs=1e-5)
  assert initial["exact/kl_target_policy"] <= np.log(4) - 0.75 + 1e-4


@pytest.mark.parametrize("name", ["reinforce", "rloo", "remax"])
def test_policy_gradient_smoke_approaches_the_rlhf_optimum(tmp_path, name):
  _, result = _smoke(name, tmp_path)
  initial, final = result.summary["initial"], result.summary["final"]
  assert final["exact/reward"] > initial["exact/reward"] + 0.05
  assert final["exact/kl_policy_target"] < initial["exact/kl_policy_target"]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_grpo_family_smoke_raises_the_exact_reward(tmp_path, name):
  """Six steps, one update per rollout (measured rises: 0.41 GRPO, DAPO, GSPO; 0.4 Dr. GRPO).
  Every step is on-policy, so the trainer's token log-probs equal the sampler's in fp32: the
  agreement metrics bound them (max |Δ log π| ≤ 1e-5, every ratio in [0.999, 1.002])."""
  _, result = _smoke(name, tmp_path)
  initial, final = result.summary["initial"], result.summary["final"]
  assert final["exact/reward"] > initial["exact/reward"] + 0.05
  assert final["exact/kl_policy_ref"] > initial["exact/kl_policy_ref"]
  records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
  assert records and all(r["agreement/max_abs_logp_diff"] <= 1e-5 for r in records)
  assert all(r["agreement/mean_abs_logp_diff"] <= 1e-6 for r in records)
  assert all(r["agreement/ratio_outside_band"] == 0.0 for r in records)
  assert all(r["objective/clip_fraction"] == 0.0 for r in records)  # Ratio 1: nothing clipped.
  if name == "dapo":  # 16 of 24 drawn prompts kept, those with a reward signal first.
    assert all(r["objective/informative"] == 1.0 for r in records)


@pytest.mark.parametrize(
  "name, arg, overrides, own",
  [
    ("gkd", "smoke", {}, "exact/kl_policy_target"),  # Reverse KL on the student's samples.
    ("gkd", "smoke,divergence=jsd", {"anchor": "teacher", "num_anchor": 2}, "exact/js"),
    ("fdpg", "smoke,task=teacher,divergence=forward_kl", {}, "exact/kl_target_policy"),
  ],
)
def test_distillation_smoke_moves_the_student_towards_the_teacher(
  tmp_path, name, arg, overrides, own
):
  """The teacher is the testbed base LM of the larger `testbed` preset, the student the `tiny`
  one; target.kind = teacher makes its exact sequence distribution the run's target. Six steps:
  the run's own exact divergence to the teacher falls by a fifth (measured: GKD reverse KL
  0.034 → 0.019, JSD(0.5) with two teacher samples per prompt 0.0086 → 0.0046, f-DPG forward
  KL 0.036 → 0.031)."""
  cfg = load_config(name, arg)
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.rollout.update(overrides)
  result = train.run(cfg, str(tmp_path))
  initial, final = result.summary["initial"], result.summary["final"]
  assert initial["exact/kl_policy_target"] > 0.01  # The teacher is not the student.
  limit = 0.9 if name == "fdpg" else 0.8
  assert final[own] < limit * initial[own], (own, initial[own], final[own])


def _several_updates(steps, **rollout):
  cfg = load_config("grpo", "smoke")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.total_steps, cfg.checkpoint_every, cfg.log_every, cfg.eval_every = steps, 3, 1, 0
    cfg.rollout.update(rollout)
  return cfg


def test_several_updates_per_rollout_resume_mid_rollout_bit_identically(tmp_path):
  """Two passes of two mini-batches per rollout: steps 1–4 share one rollout, 5–8 the next. A run
  stopped at step 3 (a checkpoint in the middle of the first rollout) and resumed matches the
  straight run bit for bit; only the first update of a rollout is on-policy (ratio 1)."""
  schedule = dict(updates_per_batch=2, minibatches=2)
  straight = train.run(_several_updates(8, **schedule), str(tmp_path / "straight"))
  train.run(_several_updates(3, **schedule), str(tmp_path / "resumed"))
  resumed = train.run(_several_updates(8, **schedule), str(tmp_path / "resumed"))
  for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = {
    r["step"]: r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "loss" in r
  }
  for s in (1, 5):  # A new rollout: the policy is the sampler.
    assert records[s]["agreement/max_abs_logp_diff"] <= 1e-5
    assert records[s]["objective/ratio"] == pytest.approx(1.0, abs=1e-6)
  for s in (2, 3, 4, 6, 7, 8):  # Later updates on the same samples: the policy has moved.
    assert records[s]["agreement/mean_abs_logp_diff"] > 1e-3
  resumed_records = [r for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r]
  assert [r["loss"] for r in resumed_records if r["step"] > 3] == [
    records[s]["loss"] for s in range(4, 9)
  ]
  assert int(straight.state.step) == 8 and straight.state.rollout["tokens_BxKxL"].shape[0] == 16


@pytest.mark.parametrize(
  "rollout, message",
  [
    (dict(minibatches=3), "rollout.minibatches=3 does not divide the rollout's 16 prompts"),
    (dict(updates_per_batch=0), "must both be >= 1"),
  ],
)
def test_a_schedule_that_cannot_run_is_a_config_error(tmp_path, rollout, message):
  from align_jax.errors import ConfigError

  with pytest.raises(ConfigError, match=message):
    train.run(_several_updates(2, **rollout), str(tmp_path))


def test_jbond_raises_reward_and_its_anchor_is_the_ema_of_the_policy(tmp_path):
  cfg, result = _smoke("jbond", tmp_path)
  initial, final = result.summary["initial"], result.summary["final"]
  assert final["exact/reward"] > initial["exact/reward"] + 0.05
  assert np.isfinite(final["exact/kl_policy_ref"]) and final["exact/kl_policy_ref"] > 0
  # One more step from the checkpoint: the anchor must be (1 − η)·anchor + η·params afterwards.
  with cfg.unlocked():
    cfg.total_steps += 1
  before = result.state
  anchor0 = jax.tree.map(np.asarray, before.anchor["params"])
  after = train.run(cfg, str(tmp_path)).state
  eta = cfg.rollout.anchor_ema
  for a0, a1, p1 in zip(
    jax.tree.leaves(anchor0), jax.tree.leaves(after.anchor["params"]), jax.tree.leaves(after.params)
  ):
    np.testing.assert_allclose(
      np.asarray(a1), (1 - eta) * a0 + eta * np.asarray(p1), rtol=1e-5, atol=1e-7
    )
  assert any(
    not np.allclose(a, p)
    for a, p in zip(jax.tree.leaves(after.anchor["params"]), jax.tree.leaves(after.params))
  )


@pytest.mark.parametrize(
  "name, arg, extra",
  [
    ("gdc", "smoke", "exact/constraint_rate"),
    ("fdpg", "smoke", "exact/constraint_rate"),
    ("fdpg", "smoke,divergence=tv", "exact/constraint_rate"),
    # Reverse KL on the pointwise task: its default config is trained below.
    ("fdpg", "smoke,task=distributional,divergence=forward_kl", "exact/moments"),
    ("fdpg", "smoke,task=rlhf,divergence=reverse_kl", "exact/reward"),
    ("fdpg", "smoke,task=hybrid", "exact/constraint_rate"),
  ],
)
def test_fdpg_smoke_reduces_its_own_divergence(tmp_path, name, arg, extra):
  """Six steps: the run's own exact divergence to its target falls, and the constrained quantity
  (constraint rate, moment towards 0.5, reward) moves towards the target's value."""
  cfg = load_config(name, arg)
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
  result = train.run(cfg, str(tmp_path))
  initial, final = result.summary["initial"], result.summary["final"]
  own = OWN_DIVERGENCE[cfg.loss.divergence]
  assert final[own] < initial[own], (own, initial, final)
  assert final[extra] > initial[extra], (extra, initial, final)
  # Contexts drawn so far have a finite running Ẑ; the window holds past pseudo-rewards.
  assert np.isfinite(np.asarray(result.state.stats["log_z_X"])).any()
  assert int(result.state.stats["window"]["count"]) > 0


def _default(name, arg, tmp_path):
  """The default config as the README runs it; one device and only the initial and final exact
  evaluation (neither changes what is trained)."""
  cfg = load_config(name, arg)
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.eval_every = 0
  return train.run(cfg, str(tmp_path)).summary


@pytest.mark.slow  # Default budgets: studies.
@pytest.mark.parametrize(
  "name, arg, divergence",
  [
    ("gdc", None, "forward_kl"),
    ("fdpg", "divergence=reverse_kl", "reverse_kl"),
    ("fdpg", None, "js"),
  ],
)
def test_fdpg_default_configs_halve_their_own_divergence(tmp_path, name, arg, divergence):
  """Measured reductions at the default budget: forward KL −90 %, reverse KL (ε = 0.01) −92 %,
  JS −86 %; the claim is ≥ 50 %. (TV at this budget, −74 % over 3 seeds, is in
  experiments/results/fdpg.md; its smoke run is tested above.)"""
  summary = _default(name, arg, tmp_path)
  own = OWN_DIVERGENCE[divergence]
  assert summary["final"][own] <= 0.5 * summary["initial"][own], summary
  assert (
    summary["final"]["exact/constraint_rate"] > 0.5 > summary["initial"]["exact/constraint_rate"]
  )


@pytest.mark.slow  # The default budget: a study.
def test_bond_default_config_halves_the_jeffreys_divergence_to_best_of_n(tmp_path):
  """β = 0.5, n = 4: measured J 1.12 → 0.06 and E_π[p≤] 0.50 → 0.80 (BoN_4's own is 0.8)."""
  summary = _default("bond", None, tmp_path)
  initial, final = summary["initial"], summary["final"]
  assert final["exact/jeffreys_bon"] <= 0.5 * initial["exact/jeffreys_bon"]
  assert final["exact/bon_quantile"] > initial["exact/bon_quantile"] + 0.1
  assert final["exact/reward"] > initial["exact/reward"]


@pytest.mark.parametrize(
  "name, arg, mesh",
  [
    ("bond", "smoke,anchor=ema", (2, 2, 2)),
    ("fdpg", "smoke", (8, 1, 1)),
    ("grpo", "smoke", (1, 4, 2)),
  ],
)
def test_on_policy_step_is_the_same_on_every_mesh(tmp_path, name, arg, mesh):
  """Three steps (rollout + update) on one device and on a mesh of 8 give the same losses:
  sampling is sharding-invariant and the batch-coupled statistics (Ẑ, baseline window, anchor,
  GRPO's token-mean over the batch) are global; GRPO takes two mini-batches of 8 prompts per
  rollout. The three objectives share the Foundation issue's meshes of 8 (data; data × fsdp ×
  tensor; fsdp × tensor) between them."""
  losses = {}
  for shape in [(1, 1, 1), mesh]:
    cfg = load_config(name, arg)
    with cfg.unlocked():
      cfg.mesh.shape = shape
      cfg.total_steps, cfg.log_every, cfg.testbed.exact_eval = 3, 1, False
      if name == "bond":
        cfg.rollout.num_anchor = 4  # One group of n = 4 (the default 16 only costs time here).
      if name == "grpo":
        cfg.rollout.minibatches, cfg.loss.aggregation = 2, "token-mean"
    workdir = tmp_path / "_".join(map(str, shape))
    train.run(cfg, str(workdir))
    losses[shape] = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
  assert len(losses[(1, 1, 1)]) == 3 and len(set(losses[(1, 1, 1)])) == 3
  for shape, values in losses.items():
    np.testing.assert_allclose(values, losses[(1, 1, 1)], atol=1e-5, err_msg=str(shape))


def test_fdpg_resume_restores_running_z_and_baseline_window_exactly(tmp_path):
  def cfg(steps):
    c = load_config("fdpg", "smoke")
    with c.unlocked():
      c.mesh.shape = (1, 1, 1)
      c.total_steps, c.checkpoint_every, c.eval_every = steps, 3, 0
    return c

  straight = train.run(cfg(6), str(tmp_path / "straight")).state
  train.run(cfg(3), str(tmp_path / "resumed"))
  resumed = train.run(cfg(6), str(tmp_path / "resumed")).state
  for a, b in zip(
    jax.tree.leaves((straight.params, straight.stats)),
    jax.tree.leaves((resumed.params, resumed.stats)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert 0 < int(straight.stats["window"]["count"]) <= 6 * 16 * 4  # ≤ steps × prompts × samples


def test_bond_trains_on_a_learned_bradley_terry_reward_model(tmp_path):
  """configs/bt_reward.py's run exports its parameters; BOND trained on that model's reward
  (tests/test_rollout.py checks the rollout scores with it) still raises the gold reward."""
  rm, _ = _smoke("bt_reward", tmp_path / "rm")
  assert (tmp_path / "rm" / "params").is_dir()
  cfg, learned = _smoke("bond", tmp_path / "learned", reward_model=str(tmp_path / "rm"))
  records = [r for r in read_jsonl(tmp_path / "learned" / "metrics.jsonl") if "loss" in r]
  assert records and all(np.isfinite(r["loss"]) for r in records)
  assert learned.summary["final"]["exact/reward"] > learned.summary["initial"]["exact/reward"]


def test_reward_model_must_be_a_finished_reward_model_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="no finished reward-model run"):
    _smoke("bond", tmp_path / "bond", reward_model=str(tmp_path / "absent"))


def test_fdpg_offline_proposal_samples_from_q_and_is_replaced_by_the_rule(tmp_path):
  """Samples come from the frozen proposal q (importance weights π/q ≠ 1 once π moves); at a
  multiple of anchor_every, q ← π exactly when the §1.6 rule said π is closer to the target."""
  cfg = load_config("fdpg", "smoke,proposal=offline")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.total_steps, cfg.rollout.anchor_every, cfg.log_every = 4, 4, 1
  result = train.run(cfg, str(tmp_path))
  records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
  assert records[0]["objective/importance_weight"] == pytest.approx(1.0, abs=1e-4)  # q = π at 0
  assert abs(records[-1]["objective/importance_weight"] - 1.0) > 1e-4
  state = result.state
  same = all(
    np.array_equal(a, p)
    for a, p in zip(jax.tree.leaves(state.anchor["params"]), jax.tree.leaves(state.params))
  )
  assert same == bool(state.stats["q_update"])
  assert bool(state.stats["q_update"])  # Four steps towards the target beat the base here.


def test_lsc_reward_transform_trains_on_log_sigmoid_centred_reward(tmp_path):
  """testbed.reward_transform = lsc: the rollout's reward is log σ(r − E_ref[r|x]) (< 0, increasing
  in r, invariant to shifting r), and training on it still raises the gold reward."""
  import jax.numpy as jnp

  cfg, result = _smoke(
    "rloo", tmp_path, testbed=dict(load_config("rloo", "smoke").testbed, reward_transform="lsc")
  )
  assert result.summary["final"]["exact/reward"] > result.summary["initial"]["exact/reward"]
  tb = task.make(cfg.testbed)
  ref_XxY = jnp.log(jnp.full(tb.reward_XxY.shape, 1.0 / tb.reward_XxY.shape[1]))
  u_XxY = np.asarray(tb_target.training_reward(cfg, tb, ref_XxY))
  r_ref_X = tb.reward_XxY.mean(axis=1, keepdims=True)
  np.testing.assert_allclose(u_XxY, -np.logaddexp(0.0, -(tb.reward_XxY - r_ref_X)), rtol=1e-5)
  assert np.all(u_XxY < 0)
