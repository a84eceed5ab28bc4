"""Grain pipelines: per-process rows, resumable position, batch field names."""

import numpy as np
import pytest

from align_jax.data import pipeline


def _source(n=40):
  return pipeline.ArraySource(
    {
      "tokens_KxL": np.arange(n * 6, dtype=np.int32).reshape(n, 2, 3),
      "loss_mask_KxL": np.ones((n, 2, 3), np.float32),
    }
  )


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


def test_scalar_record_fields_gain_a_batch_axis():
  assert pipeline.batch_key("score_K") == "score_BxK"
  assert pipeline.batch_key("is_tie") == "is_tie_B"
  assert pipeline.batch_key("desirable") == "desirable_B"
