"""Validation on file data: which responses are chosen and rejected in each record format, the
held-out split, and its configuration errors. (Whole runs: tests/test_pipeline.py for SFT and DPO,
tests/data/test_prompts.py for on-policy RLOO.)"""

import json

import numpy as np
import pytest

from align_jax import validate
from align_jax.data import records
from align_jax.errors import ConfigError
from conftest import load_config


def test_chosen_and_rejected_responses_of_each_format():
  tokens = np.zeros((3, 3, 4), np.int32)
  lists = {
    "tokens_KxL": tokens,
    "score_K": np.array([[0.5, 2.0, -1.0], [1.0, 1.0, 0.0], [3.0, 3.0, 3.0]]),
    "response_mask_K": np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], np.float32),
  }
  out = validate._chosen_rejected("lists", lists)
  np.testing.assert_array_equal(out["eval_chosen_K"], [[0, 1, 0], [1, 0, 0], [1, 0, 0]])
  # The padded entry (score 0, masked) is never the worst; an all-tied list has no pair.
  np.testing.assert_array_equal(out["eval_rejected_K"], [[0, 0, 1], [1, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(out["eval_pair"], [1, 0, 0])
  binary = {"tokens_KxL": tokens[:, :2], "desirable": np.array([1.0, 0.0, 1.0])}
  out = validate._chosen_rejected("binary", binary)
  np.testing.assert_array_equal(out["eval_chosen_K"], [[1, 0], [0, 0], [1, 0]])
  np.testing.assert_array_equal(out["eval_rejected_K"], [[0, 0], [1, 0], [0, 0]])
  np.testing.assert_array_equal(out["eval_pair"], [0, 0, 0])  # Unpaired: no accuracy.
  ternary = {"tokens_KxL": tokens[:, :2], "is_tie": np.array([0.0, 1.0, 0.0])}
  out = validate._chosen_rejected("ternary", ternary)
  np.testing.assert_array_equal(out["eval_chosen_K"], [[1, 0]] * 3)
  np.testing.assert_array_equal(out["eval_pair"], [1, 0, 1])
  assert not validate._chosen_rejected("corpus", {"tokens_KxL": tokens[:, :1]})["eval_pair"].any()


def test_eval_fraction_holds_out_records_drawn_with_the_seed(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text(
    "".join(json.dumps({"prompt": [i], "chosen": [1], "rejected": [2]}) + "\n" for i in range(10))
  )
  cfg = load_config("dpo", "smoke")
  cfg.data.source, cfg.data.eval_fraction = f"jsonl:{path}", 0.3
  arrays, counts, _, held = records.read_file(cfg, "pairs", 16)
  assert counts["records"] == 7 and counts["eval_records"] == 3
  kept, out = arrays["tokens_KxL"][:, 0, 0].tolist(), held["tokens_KxL"][:, 0, 0].tolist()
  assert sorted(kept + out) == list(range(10)) and kept == sorted(kept) and out == sorted(out)
  cfg.seed = 1
  assert records.read_file(cfg, "pairs", 16)[3]["tokens_KxL"][:, 0, 0].tolist() != out
  for field, value, message in [
    ("eval_fraction", 1.0, r"data.eval_fraction=1.0 must be in \[0, 1\)"),
    ("eval_source", f"jsonl:{path}", "set one of data.eval_source and data.eval_fraction"),
  ]:
    setattr(cfg.data, field, value)
    with pytest.raises(ConfigError, match=message):
      records.read_file(cfg, "pairs", 16)
  cfg = load_config("dpo", "smoke")
  cfg.data.eval_fraction = 0.1
  with pytest.raises(ConfigError, match="the testbed is evaluated exactly"):
    records.read_file(cfg, "pairs", 16)
