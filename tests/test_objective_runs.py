"""Every offline objective's config trains on the testbed and moves the exact metrics the right way.

The objectives are discovered: every registry entry (`objectives.OBJECTIVES`) that trains a policy
on fixed records (data format not "prompts", not a reward model) and has a configs/<name>.py. Each
config's smoke variant (tiny base LM, 6 steps, lr 1e-3, no warm-up) runs through `train.run`
on one device. The exact expected reward and the held-out ranking accuracy are computed by
enumeration, so they carry no sampling noise: any change is the policy's. Bradley–Terry labels
favour higher reward, so every objective must raise E_π[r] above the base. The margin, 0.05 in
reward units, is about a third of the smallest rise measured at this budget (D2O: ≈ 0.14, KTO/BCO:
≈ 0.17, ORPO: ≈ 0.27, SimPO: ≈ 0.43, DPO: ≈ 0.44, listwise: ≈ 0.53–0.60) and ~10⁴ times the float32
evaluation error; the ranking accuracy over 2048 held-out pairs must rise too (one pair is 5e-4).
"""

import json
import os

import numpy as np
import pytest

from align_jax import objectives, train
from conftest import ROOT, load_config

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
OFFLINE = sorted(
  name
  for name, o in objectives.OBJECTIVES.items()
  if o.data != "prompts" and not o.scores and name in CONFIGS
)
# Config files named otherwise than the objective they train.
CONFIG_OBJECTIVE = {"pretrain_testbed": "sft", "gdc": "fdpg"}
REWARD_MARGIN = 0.05


def test_every_objective_has_a_config_file_and_every_config_file_an_objective():
  """configs/<name>.py trains objective <name> (or is listed in CONFIG_OBJECTIVE), and every
  registry entry is trained by some config file: a new objective comes with its config."""
  trained = {name: load_config(name).objective for name in CONFIGS}
  assert trained == {name: CONFIG_OBJECTIVE.get(name, name) for name in CONFIGS}
  assert set(trained.values()) == set(objectives.OBJECTIVES)
  assert {"dpo", "simpo", "orpo", "lipo", "pro"} <= set(OFFLINE)  # Discovery finds them.


@pytest.mark.parametrize("name", OFFLINE)
def test_smoke_config_raises_exact_reward_and_ranking_accuracy(tmp_path, name):
  cfg = load_config(name, "smoke")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
  result = train.run(cfg, str(tmp_path))
  initial, final = result.summary["initial"], result.summary["final"]
  assert final["exact/reward"] > initial["exact/reward"] + REWARD_MARGIN, (initial, final)
  assert final["exact/ranking_accuracy"] > initial["exact/ranking_accuracy"]
  assert initial["exact/kl_policy_ref"] == pytest.approx(0.0, abs=1e-5)
  assert final["exact/kl_policy_ref"] > 0.0
  if (
    name == "d2o"
  ):  # Trained only on harmful negatives: the harm rate must fall (measured ≈ −57 %).
    assert final["exact/harm"] < 0.75 * initial["exact/harm"], (initial, final)
  summary = json.load(open(os.path.join(tmp_path, "summary.json")))
  assert summary["final"] == final


def test_bco_reward_shift_lives_in_the_checkpointed_state(tmp_path):
  """δ averages every implicit reward seen: count = steps × batch; the checkpoint holds both."""
  import orbax.checkpoint as ocp

  cfg = load_config("bco", "smoke")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
  result = train.run(cfg, str(tmp_path))
  stats = result.state.stats
  assert float(stats["count"]) == cfg.total_steps * cfg.data.batch_size
  assert float(stats["delta"]) != 0.0
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore(os.path.join(tmp_path, "checkpoints", str(cfg.total_steps), "state"))
  np.testing.assert_array_equal(saved["stats"]["delta"], stats["delta"])
  np.testing.assert_array_equal(saved["stats"]["count"], stats["count"])


@pytest.mark.parametrize(
  "name, gold_margin, label_margin", [("bt_reward", 0.1, 0.05), ("dprm", 0.07, 0.02)]
)
def test_reward_model_learns_held_out_gold_order(tmp_path, name, gold_margin, label_margin):
  """Chance is 0.5 on 2048 held-out pairs (standard error ≈ 0.011). The smoke runs reached ≈ 0.75
  (BT) and ≈ 0.63 (DPRM, trained on one-response ratings) against the gold order, ≈ 0.65 and ≈ 0.54
  against the noisy BT labels; the margins keep at least 5 standard errors below those."""
  cfg = load_config(name, "smoke")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
  result = train.run(cfg, str(tmp_path))
  final = result.summary["final"]
  assert final["exact/gold_pair_accuracy"] > 0.5 + gold_margin, result.summary
  assert final["exact/pair_accuracy"] > 0.5 + label_margin, result.summary
  assert final["exact/gold_pair_accuracy"] > result.summary["initial"]["exact/gold_pair_accuracy"]
  assert result.state.params["score_DxO"].shape[1] == cfg.model.num_scores
  assert "unembed_DxV" not in result.state.params


def test_bco_density_ratio_weights_multiply_undesirable_losses_only(tmp_path):
  import jax.numpy as jnp
  from align_jax import objectives

  bco = objectives.get("bco")
  logp = jnp.array([[-3.0, -9.0], [-4.0, -9.0], [-5.0, -9.0]])
  batch = {
    "ref_logp_BxK": jnp.array([[-3.5, -9.0], [-3.0, -9.0], [-5.5, -9.0]]),
    "desirable_B": jnp.array([1.0, 0.0, 0.0]),
    "example_mask_B": jnp.ones(3),
  }
  stats = {"delta": jnp.float32(0.0), "count": jnp.float32(0.0)}
  plain, _, _ = bco.fn(logp, batch, stats, beta=0.1, delta_momentum=-1.0)
  weights = jnp.array([1.0, 3.0, 0.5])
  weighted, _, _ = bco.fn(
    logp, {**batch, "udm_weight_B": weights}, stats, beta=0.1, delta_momentum=-1.0
  )
  np.testing.assert_allclose(weighted, plain * weights, rtol=1e-6)

  cfg = load_config("bco", "smoke")
  with cfg.unlocked():
    cfg.mesh.shape = (1, 1, 1)
    cfg.data.udm = True
  result = train.run(cfg, str(tmp_path))
  # Testbed desirability depends on the response, not the prompt: the ratio stays near 1.
  assert 0.5 <= result.summary["data/udm_mean_weight"] <= 2.0
  assert result.summary["final"]["exact/reward"] > result.summary["initial"]["exact/reward"]
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.data.udm = True
  with pytest.raises(ValueError, match="data.udm is BCO's"):
    train.run(cfg, str(tmp_path / "dpo"))


def test_dpo_trains_on_text_pairs_through_a_tokenizer(tmp_path):
  """data.tokenizer: text records are encoded by a tokenizer.json (a word-level one over the tiny
  model's 8 ids), then train as token ids would."""
  import tokenizers
  from tokenizers import models as tok_models, pre_tokenizers

  tok = tokenizers.Tokenizer(
    tok_models.WordLevel({c: i for i, c in enumerate("abcdefgh")}, unk_token="h")
  )
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  rng = np.random.default_rng(0)
  words = lambda n: " ".join(rng.choice(list("abcdefgh"), n))
  (tmp_path / "pairs.jsonl").write_text(
    "".join(
      json.dumps({"prompt": words(2), "chosen": words(3), "rejected": words(2)}) + "\n"
      for _ in range(32)
    )
  )
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.mesh.shape, cfg.total_steps, cfg.log_every = (1, 1, 1), 2, 1
    cfg.data.source = f"jsonl:{tmp_path / 'pairs.jsonl'}"
    cfg.data.tokenizer = str(tmp_path / "tokenizer.json")
  result = train.run(cfg, str(tmp_path / "run"))
  assert result.summary["data/records"] == 32 and int(result.state.step) == 2
