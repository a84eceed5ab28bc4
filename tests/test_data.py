"""Grain pipelines (per-process rows, resumable position) and the JSONL reader's errors."""

import json

import numpy as np
import pytest

from align_jax.data import jsonl, pipeline


def _source(n=40):
  return pipeline.ArraySource({"tokens_KxL": np.arange(n * 6, dtype=np.int32).reshape(n, 2, 3),
                               "loss_mask_KxL": np.ones((n, 2, 3), np.float32)})


def test_processes_together_read_exactly_the_single_process_batches():
  kw = dict(global_batch=8, total_steps=12, seed=5)
  one = pipeline.batches(_source(), **kw, process_index=0, process_count=1)
  parts = [pipeline.batches(_source(), **kw, process_index=p, process_count=2) for p in (0, 1)]
  seen = set()
  for _ in range(12):  # crosses epoch boundaries (40 records, 8 per batch)
    want = next(one)["tokens_KxL"]
    got = np.concatenate([next(it)["tokens_KxL"] for it in parts])
    np.testing.assert_array_equal(got, want)
    seen |= {int(r[0, 0]) for r in want}
  assert len(seen) == 40  # the shuffled epochs cover every record


def test_iterator_state_resumes_at_the_same_record():
  it = pipeline.batches(_source(), global_batch=8, total_steps=10, seed=1)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens_KxL"] for _ in range(3)]
  fresh = pipeline.batches(_source(), global_batch=8, total_steps=10, seed=1)
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["tokens_KxL"], want)


def test_batch_keys_gain_the_batch_letter():
  assert pipeline.batch_key("tokens_KxL") == "tokens_BxKxL"
  assert pipeline.batch_key("loss_mask_KxL") == "loss_mask_BxKxL"


def test_fewer_records_than_a_batch_is_an_error():
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.batches(_source(4), global_batch=8, total_steps=1, seed=0)


def _write(tmp_path, records):
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def test_jsonl_pairs_tokens_and_masks(tmp_path):
  path = _write(tmp_path, [{"prompt": [1, 2], "chosen": [3, 4], "rejected": [5]}])
  out = jsonl.read_pairs(path)
  np.testing.assert_array_equal(out["tokens_KxL"][0], [[1, 2, 3, 4], [1, 2, 5, 0]])
  np.testing.assert_array_equal(out["loss_mask_KxL"][0], [[0, 0, 1, 1], [0, 0, 1, 0]])


@pytest.mark.parametrize("record, kwargs, message", [
    ("{not json", {}, ":1: not JSON"),
    ({"prompt": [1], "chosen": [2]}, {}, ":1: record has no field 'rejected'"),
    ({"prompt": [], "chosen": [2], "rejected": [3]}, {}, ":1: empty prompt or response"),
    ({"prompt": [1], "chosen": [], "rejected": [3]}, {}, ":1: empty prompt or response"),
    ({"prompt": [1], "chosen": ["a"], "rejected": [3]}, {}, "must be a list of token ids"),
    ({"prompt": [1], "chosen": [9], "rejected": [3]}, {"vocab_size": 8}, "token id 9 >= vocab"),
    ({"prompt": [1, 2], "chosen": [3, 4], "rejected": [3]}, {"max_len": 3}, "exceed data.max_len=3"),
])
def test_jsonl_errors_name_file_and_record(tmp_path, record, kwargs, message):
  path = _write(tmp_path, [record])
  with pytest.raises(jsonl.DataError, match=message) as e:
    jsonl.read_pairs(path, **kwargs)
  assert str(e.value).startswith(path)


def test_jsonl_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    jsonl.read_pairs(str(tmp_path / "absent.jsonl"))
