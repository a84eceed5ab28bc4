"""Preference data readers: each format's arrays, source agreement, bad data errors and counts."""

import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from align_jax.data import preference
from align_jax.data.preference import DataError

_IDS = tfds.features.Sequence(np.int32)
_IDS_TENSOR = tfds.features.Tensor(shape=(None,), dtype=np.int32)
_LIST = tfds.features.Sequence(
  tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES)
)

# The same records for every source; each set has a skipped record and a truncation at MAX_LEN.
MAX_LEN = 5
RECORDS = {
  "pairs": [
    {"prompt": [1, 2], "chosen": [3, 4, 5, 6], "rejected": [7]},
    {"prompt": [8], "chosen": [9], "rejected": [9]},
    {"prompt": [10, 11, 12], "chosen": [13], "rejected": [14, 15]},
  ],
  "lists": [
    {"prompt": [1], "responses": [[2, 3], [4], [5, 6, 7, 8, 9]], "scores": [0.5, -1, 2]},
    {"prompt": [2, 3], "responses": [[4], [5]], "scores": [1, 1]},
    {"prompt": [4, 5], "responses": [[6], [7, 8]], "scores": [3, 1]},
  ],
  "negatives": [{"prompt": [1, 2, 3], "rejected": [4, 5, 6]}, {"prompt": [7], "rejected": [8]}],
  "binary": [
    {"prompt": [1], "completion": [2, 3], "label": True},
    {"prompt": [4, 5], "completion": [6, 7, 8, 9], "label": False},
  ],
  "ternary": [
    {"prompt": [1], "a": [2], "b": [3, 4], "label": "b"},
    {"prompt": [5], "a": [6], "b": [6], "label": "a"},
    {"prompt": [7, 8], "a": [9, 10, 11, 12], "b": [13], "label": "tie"},
  ],
}
FEATURES = {
  "pairs": {"prompt": _IDS, "chosen": _IDS_TENSOR, "rejected": _IDS},
  "lists": {"prompt": _IDS, "responses": _LIST, "scores": tfds.features.Sequence(np.float32)},
  "negatives": {"prompt": _IDS_TENSOR, "rejected": _IDS},
  "binary": {"prompt": _IDS, "completion": _IDS, "label": tfds.features.Scalar(np.bool_)},
  "ternary": {"prompt": _IDS, "a": _IDS, "b": _IDS, "label": tfds.features.Text()},
  "pairs_text": {"prompt": _IDS, "chosen": tfds.features.Text(), "rejected": _IDS},
}


class PreferenceTestData(tfds.core.GeneratorBasedBuilder):
  """RECORDS as a TFDS dataset, one config per format (in order: shuffling is off)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in FEATURES]

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(FEATURES[self.builder_config.name]),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    if self.builder_config.name == "pairs_text":
      records = [{"prompt": [1], "chosen": "hello", "rejected": [2]}]
    else:
      records = RECORDS[self.builder_config.name]
    yield from enumerate(records)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  for name in FEATURES:
    PreferenceTestData(config=name, data_dir=data_dir).download_and_prepare(
      file_format="array_record"
    )
  return data_dir


def _jsonl(tmp_path, records, name="data.jsonl") -> str:
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def _arrayrecord(tmp_path, records, name="data.array_record") -> str:
  path = str(tmp_path / name)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for r in records:
    writer.write(r if isinstance(r, bytes) else json.dumps(r).encode())
  writer.close()
  return path


def _check(arrays, expected):
  assert set(arrays) == set(expected)
  for key, want in expected.items():
    want = np.asarray(want, np.int32 if key == "tokens_KxL" else np.float32)
    assert arrays[key].dtype == want.dtype, key
    np.testing.assert_array_equal(arrays[key], want, err_msg=key)


def _counts(**nonzero):
  return {k: nonzero.get(k, 0) for k in preference.COUNTS}


def test_pairs(tmp_path):
  path = _jsonl(
    tmp_path,
    [
      {"prompt": [5, 6], "chosen": [7], "rejected": [8, 9], "extra": "x"},
      {"prompt": [1], "chosen": [2, 3, 4], "rejected": [2]},
    ],
  )
  arrays, counts = preference.read(path, "pairs")
  _check(
    arrays,
    {
      "tokens_KxL": [[[5, 6, 7, 0], [5, 6, 8, 9]], [[1, 2, 3, 4], [1, 2, 0, 0]]],
      "loss_mask_KxL": [[[0, 0, 1, 0], [0, 0, 1, 1]], [[0, 1, 1, 1], [0, 1, 0, 0]]],
      "score_K": [[1, 0], [1, 0]],
      "response_mask_K": [[1, 1], [1, 1]],
    },
  )
  assert counts == _counts(records=2)


def test_lists_scores_ranks_and_padding(tmp_path):
  path = _jsonl(
    tmp_path,
    [
      {"prompt": [1], "responses": [[2], [3, 4], [5]], "scores": [0.5, 2, -1]},
      {"prompt": [6, 7], "responses": [[8], [9]], "ranks": [2, 1]},
    ],
  )
  arrays, counts = preference.read(f"jsonl:{path}", "lists")
  _check(
    arrays,
    {
      "tokens_KxL": [[[1, 2, 0], [1, 3, 4], [1, 5, 0]], [[6, 7, 8], [6, 7, 9], [0, 0, 0]]],
      "loss_mask_KxL": [[[0, 1, 0], [0, 1, 1], [0, 1, 0]], [[0, 0, 1], [0, 0, 1], [0, 0, 0]]],
      "score_K": [[0.5, 2, -1], [-2, -1, 0]],
      "response_mask_K": [[1, 1, 1], [1, 1, 0]],
    },
  )
  assert counts == _counts(records=2, padded_lists=1)
  arrays, counts = preference.read(path, "lists", list_size=4, max_len=4)
  assert arrays["tokens_KxL"].shape == (2, 4, 4)
  np.testing.assert_array_equal(arrays["response_mask_K"], [[1, 1, 1, 0], [1, 1, 0, 0]])
  assert counts == _counts(records=2, padded_lists=2)


def test_negatives(tmp_path):
  path = _jsonl(
    tmp_path, [{"prompt": [1, 2], "rejected": [3]}, {"prompt": [1], "rejected": [4, 5]}]
  )
  arrays, counts = preference.read(path, "negatives")
  _check(
    arrays,
    {
      "tokens_KxL": [[[1, 2, 3]], [[1, 4, 5]]],
      "loss_mask_KxL": [[[0, 0, 1]], [[0, 1, 1]]],
      "score_K": [[0], [0]],
      "response_mask_K": [[1], [1]],
    },
  )
  assert counts == _counts(records=2)


def test_binary(tmp_path):
  path = _jsonl(
    tmp_path,
    [
      {"prompt": [1], "completion": [2], "label": True},
      {"prompt": [3], "completion": [4, 5], "label": 0},
      {"prompt": [6], "completion": [7], "label": 1},
    ],
  )
  arrays, counts = preference.read(path, "binary")
  _check(
    arrays,
    {
      "tokens_KxL": [[[1, 2, 0]], [[3, 4, 5]], [[6, 7, 0]]],
      "loss_mask_KxL": [[[0, 1, 0]], [[0, 1, 1]], [[0, 1, 0]]],
      "score_K": [[1], [0], [1]],
      "response_mask_K": [[1], [1], [1]],
      "desirable": [1, 0, 1],
    },
  )
  assert counts == _counts(records=3)


def test_ternary_winner_first(tmp_path):
  path = _jsonl(
    tmp_path,
    [{"prompt": [1], "a": [2], "b": [3, 4], "label": label} for label in ("a", "b", "tie")],
  )
  arrays, counts = preference.read(path, "ternary")
  _check(
    arrays,
    {
      "tokens_KxL": [[[1, 2, 0], [1, 3, 4]], [[1, 3, 4], [1, 2, 0]], [[1, 2, 0], [1, 3, 4]]],
      "loss_mask_KxL": [[[0, 1, 0], [0, 1, 1]], [[0, 1, 1], [0, 1, 0]], [[0, 1, 0], [0, 1, 1]]],
      "score_K": [[1, 0], [1, 0], [0.5, 0.5]],
      "response_mask_K": [[1, 1]] * 3,
      "is_tie": [0, 0, 1],
    },
  )
  assert counts == _counts(records=3)


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_sources_agree(tmp_path, tfds_dir, fmt):
  records = RECORDS[fmt]
  from_jsonl = preference.read(_jsonl(tmp_path, records), fmt, max_len=MAX_LEN)
  from_arrayrecord = preference.read(
    f"arrayrecord:{_arrayrecord(tmp_path, records)}", fmt, max_len=MAX_LEN
  )
  from_tfds = preference.read(
    f"tfds:preference_test_data/{fmt}/train@{tfds_dir}", fmt, max_len=MAX_LEN
  )
  skipped = 0 if fmt in ("negatives", "binary") else 1
  assert from_jsonl[1]["records"] == len(records) - skipped
  assert from_jsonl[1]["truncated_responses"] == 1
  for arrays, counts in (from_arrayrecord, from_tfds):
    assert counts == from_jsonl[1]
    assert set(arrays) == set(from_jsonl[0])
    for key, value in arrays.items():
      assert value.dtype == from_jsonl[0][key].dtype
      np.testing.assert_array_equal(value, from_jsonl[0][key], err_msg=key)


def test_truncation_keeps_prompt_and_first_response_tokens(tmp_path):
  path = _jsonl(tmp_path, [{"prompt": [1, 2, 3], "chosen": [4, 5, 6, 7], "rejected": [8]}])
  arrays, counts = preference.read(path, "pairs", max_len=5)
  _check(
    arrays,
    {
      "tokens_KxL": [[[1, 2, 3, 4, 5], [1, 2, 3, 8, 0]]],
      "loss_mask_KxL": [[[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]],
      "score_K": [[1, 0]],
      "response_mask_K": [[1, 1]],
    },
  )
  assert counts == _counts(records=1, truncated_responses=1)
  path = _jsonl(
    tmp_path,
    [{"prompt": [1], "responses": [[2, 3, 4], [5, 6], [7, 8, 9]], "ranks": [1, 2, 3]}],
    "lists.jsonl",
  )
  arrays, counts = preference.read(path, "lists", max_len=3)
  np.testing.assert_array_equal(arrays["tokens_KxL"], [[[1, 2, 3], [1, 5, 6], [1, 7, 8]]])
  np.testing.assert_array_equal(arrays["loss_mask_KxL"], [[[0, 1, 1]] * 3])
  assert counts == _counts(records=1, truncated_responses=2)
  arrays, _ = preference.read(path, "lists", max_len=6)
  np.testing.assert_array_equal(arrays["tokens_KxL"][0, 0], [1, 2, 3, 4, 0, 0])


def test_skips_are_counted(tmp_path):
  path = _jsonl(
    tmp_path,
    [
      {"prompt": [1], "chosen": [2], "rejected": [3]},
      {"prompt": [1], "chosen": [4, 5], "rejected": [4, 5]},
      {"prompt": [1], "chosen": [6, 7, 8], "rejected": [6, 7, 9]},
      {"prompt": [2], "chosen": [3], "rejected": [4]},
    ],
  )
  arrays, counts = preference.read(path, "pairs")
  assert counts == _counts(records=3, skipped_identical_pair=1)
  np.testing.assert_array_equal(arrays["tokens_KxL"][:, 0, :2], [[1, 2], [1, 6], [2, 3]])
  # Equal after truncation to max_len=3: skipped too (its truncations are not counted).
  arrays, counts = preference.read(path, "pairs", max_len=3)
  assert counts == _counts(records=2, skipped_identical_pair=2)
  np.testing.assert_array_equal(arrays["tokens_KxL"][:, 0], [[1, 2, 0], [2, 3, 0]])

  path = _jsonl(
    tmp_path,
    [
      {"prompt": [1], "a": [2], "b": [2], "label": "tie"},
      {"prompt": [1], "a": [2], "b": [3], "label": "tie"},
    ],
    "t.jsonl",
  )
  assert preference.read(path, "ternary")[1] == _counts(records=1, skipped_identical_pair=1)

  path = _jsonl(
    tmp_path,
    [
      {"prompt": [1], "responses": [[2], [3], [4], [5]], "scores": [1] * 4},
      {"prompt": [1], "responses": [[2], [3]], "ranks": [2, 2]},
      {"prompt": [1], "responses": [[2]], "scores": [0.3]},
      {"prompt": [1], "responses": [[2], [3]], "ranks": [2, 1]},
    ],
    "l.jsonl",
  )
  arrays, counts = preference.read(path, "lists")
  assert counts == _counts(records=1, skipped_all_tied=3)
  # K is the longest kept list, not the skipped 4-response one.
  np.testing.assert_array_equal(arrays["score_K"], [[-2, -1]])


def _error(source, fmt, **kwargs) -> str:
  with pytest.raises(DataError) as e:
    preference.read(source, fmt, **kwargs)
  return str(e.value)


GOOD = {
  "pairs": {"prompt": [1], "chosen": [2], "rejected": [3]},
  "lists": {"prompt": [1], "responses": [[2], [3]], "scores": [1, 0]},
  "negatives": {"prompt": [1], "rejected": [3]},
  "binary": {"prompt": [1], "completion": [2], "label": True},
  "ternary": {"prompt": [1], "a": [2], "b": [3], "label": "a"},
}
LIST3 = {"prompt": [1], "responses": [[2], [3], [4]]}


@pytest.mark.parametrize(
  "fmt, record, kwargs, message",
  [
    ("pairs", {"prompt": [1], "chosen": [2]}, {}, "record has no field 'rejected'"),
    (
      "pairs",
      {"prompt": [1], "chosen": 5, "rejected": [3]},
      {},
      "field 'chosen' must be a list of token ids, got int",
    ),
    ("pairs", {"prompt": [1], "chosen": [2, 1.5], "rejected": [3]}, {}, "'chosen' .* has 1.5"),
    ("pairs", {"prompt": [True], "chosen": [2], "rejected": [3]}, {}, "'prompt' .* has True"),
    (
      "pairs",
      {"prompt": [1], "chosen": "a reply", "rejected": [3]},
      {},
      "field 'chosen' is text; set data.tokenizer",
    ),
    (
      "pairs",
      {"prompt": [1], "chosen": [2], "rejected": [3, -1]},
      {},
      "field 'rejected' has negative token id -1",
    ),
    (
      "pairs",
      {"prompt": [1], "chosen": [2, 10], "rejected": [3]},
      {"vocab_size": 10},
      "field 'chosen' has token id 10 >= vocab size 10",
    ),
    ("pairs", "{\"prompt\": [1], ", {}, "not JSON"),
    ("pairs", "[1, 2]", {}, "not a JSON object"),
    ("pairs", {"prompt": [], "chosen": [2], "rejected": [3]}, {}, "field 'prompt' is empty"),
    ("pairs", {"prompt": [1], "chosen": [], "rejected": [3]}, {}, "field 'chosen' is empty"),
    (
      "pairs",
      {"prompt": [1, 2, 3], "chosen": [2], "rejected": [3]},
      {"max_len": 3},
      "prompt of 3 tokens leaves no room for a response within max_len=3",
    ),
    ("lists", {"prompt": [1], "responses": [], "scores": []}, {}, "field 'responses' is empty"),
    (
      "lists",
      {"prompt": [1], "responses": [[2], []], "scores": [1, 0]},
      {},
      r"field 'responses\[1\]' is empty",
    ),
    (
      "lists",
      {"prompt": [1], "responses": 3, "scores": [1]},
      {},
      "field 'responses' must be a list, got int",
    ),
    ("lists", {**LIST3, "scores": [1, 2, 3]}, {"list_size": 2}, "3 responses exceed list_size=2"),
    ("lists", {**LIST3, "scores": [1, 2]}, {}, "field 'scores' has 2 values for 3 responses"),
    ("lists", {**LIST3, "ranks": [1, 2, 3, 4]}, {}, "field 'ranks' has 4 values for 3 responses"),
    ("lists", LIST3, {}, "exactly one of the fields 'scores' and 'ranks'"),
    ("lists", {**LIST3, "scores": [1, 2, 3], "ranks": [3, 2, 1]}, {}, "exactly one of"),
    ("lists", {**LIST3, "ranks": [1, 0, 2]}, {}, r"'ranks' must hold ints >= 1 .*has 0"),
    ("lists", {**LIST3, "scores": [1, float("nan"), 2]}, {}, "'scores' must hold finite numbers"),
    ("binary", {"prompt": [1], "completion": [2], "label": 2}, {}, "must be true/false or 1/0"),
    ("binary", {"prompt": [1], "completion": [2]}, {}, "record has no field 'label'"),
    (
      "ternary",
      {"prompt": [1], "a": [2], "b": [3], "label": "c"},
      {},
      "must be \"a\", \"b\" or \"tie\", got 'c'",
    ),
    ("negatives", {"prompt": [1], "rejected": []}, {}, "field 'rejected' is empty"),
  ],
)
def test_bad_records_name_source_and_record(tmp_path, fmt, record, kwargs, message):
  path = _jsonl(tmp_path, [GOOD[fmt], record])
  text = _error(path, fmt, **kwargs)
  assert text.startswith(f"{path}:2: "), text
  assert re.search(message, text), text


def test_bad_arrayrecord_records(tmp_path):
  path = _arrayrecord(tmp_path, [GOOD["pairs"], b"{\"prompt\": "])
  assert _error(path, "pairs").startswith(f"{path}[record 1]: not JSON")
  path = _arrayrecord(tmp_path, [GOOD["pairs"], GOOD["pairs"], b"\xff"], "b.array_record")
  assert _error(path, "pairs").startswith(f"{path}[record 2]: not UTF-8 JSON")
  path = _arrayrecord(tmp_path, [{"prompt": [1], "chosen": [2]}], "c.array_record")
  assert _error(path, "pairs") == f"{path}[record 0]: record has no field 'rejected'"
  path = tmp_path / "text.array_record"
  path.write_text("not an array record\n")
  assert "not a readable ArrayRecord file" in _error(str(path), "pairs")


def test_bad_tfds_records(tfds_dir):
  source = f"tfds:preference_test_data/pairs/train@{tfds_dir}"
  assert _error(source, "pairs", vocab_size=14) == (
    "tfds:preference_test_data/pairs/train[index 2]: field 'rejected' has token id 15 >= "
    "vocab size 14"
  )
  source = f"tfds:preference_test_data/pairs_text/train@{tfds_dir}"
  assert _error(source, "pairs").startswith(
    "tfds:preference_test_data/pairs_text/train[index 0]: field 'chosen' is text; set data.tokenizer"
  )


def test_empty_or_all_skipped_sources(tmp_path):
  path = _jsonl(tmp_path, ["", "  "])
  assert _error(path, "pairs") == f"{path}: no records"
  path = _arrayrecord(tmp_path, [])
  assert _error(path, "binary") == f"{path}: no records"
  path = _jsonl(tmp_path, [{"prompt": [1], "chosen": [2], "rejected": [2]}] * 2, "p.jsonl")
  assert _error(path, "pairs").startswith(f"{path}: all 2 records were skipped")
  path = _jsonl(
    tmp_path, [{"prompt": [1], "responses": [[2], [3]], "scores": [1, 1]}] * 3, "l.jsonl"
  )
  assert _error(path, "lists").startswith(f"{path}: all 3 records were skipped")


@pytest.mark.parametrize(
  "source, fmt, kwargs, error",
  [
    ("data.txt", "pairs", {}, "expected jsonl:PATH"),
    ("tfds:no_split", "pairs", {}, "expected jsonl:PATH"),
    ("jsonl:", "pairs", {}, "expected jsonl:PATH"),
    ("GOOD", "triples", {}, "data format 'triples'"),
    ("GOOD", "pairs", {"list_size": 3}, "format 'pairs' has 2 responses"),
    ("GOOD", "lists", {"max_len": -1}, "must be >= 0"),
  ],
)
def test_bad_arguments(tmp_path, source, fmt, kwargs, error):
  if source == "GOOD":
    source = _jsonl(tmp_path, [GOOD["pairs"]])
  with pytest.raises(ValueError, match=error):
    preference.read(source, fmt, **kwargs)


def test_missing_file(tmp_path):
  for source in (str(tmp_path / "absent.jsonl"), f"arrayrecord:{tmp_path}/absent"):
    with pytest.raises(FileNotFoundError, match="no such file"):
      preference.read(source, "pairs")


def test_binary_records_gain_the_previous_completion_after_their_prompt(tmp_path):
  path = tmp_path / "binary.jsonl"
  path.write_text(
    "\n".join(
      json.dumps(r)
      for r in [
        {"prompt": [1, 2], "completion": [3, 4, 5], "label": True},
        {"prompt": [6], "completion": [7], "label": False},
        {"prompt": [2, 2, 2], "completion": [1, 1], "label": 1},
      ]
    )
    + "\n"
  )
  arrays, _ = preference.read(f"jsonl:{path}", "binary", max_len=5)
  out = preference.with_mismatched(arrays)
  # Row 0 takes row 2's completion, row 1 row 0's, row 2 row 1's (cyclically).
  np.testing.assert_array_equal(
    out["tokens_KxL"][:, 1], [[1, 2, 1, 1, 0], [6, 3, 4, 5, 0], [2, 2, 2, 7, 0]]
  )
  np.testing.assert_array_equal(
    out["loss_mask_KxL"][:, 1], [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]]
  )
  np.testing.assert_array_equal(out["tokens_KxL"][:, 0], arrays["tokens_KxL"][:, 0])
  np.testing.assert_array_equal(out["desirable"], [1, 0, 1])
  assert out["score_K"].shape == out["response_mask_K"].shape == (3, 2)


def test_distribution_labels_from_votes_and_shares(tmp_path):
  from align_jax.objectives import reward_model

  votes = [0, 1, 2, 5, 8, 4]
  path = tmp_path / "dist.jsonl"
  path.write_text(
    "\n".join(
      json.dumps(r)
      for r in [
        {"prompt": [1], "completion": [2, 3], "votes": votes},
        {"prompt": [4, 5], "completion": [6], "distribution": [0, 0, 1, 1, 0, 2]},
      ]
    )
    + "\n"
  )
  arrays, counts = preference.read(f"jsonl:{path}", "distribution")
  # ALGORITHMS.md §7.6: uniform prior pseudo-counts 1 and these votes.
  np.testing.assert_allclose(
    arrays["label_dist_C"][0],
    [0.038462, 0.076923, 0.115385, 0.230769, 0.346154, 0.192308],
    atol=1e-6,
  )
  np.testing.assert_allclose(
    arrays["label_dist_C"][0],
    np.asarray(
      reward_model.dprm_posterior(np.array([votes], np.float32), np.ones((1, 6), np.float32))
    )[0],
    atol=1e-6,
  )
  np.testing.assert_allclose(arrays["label_dist_C"][1], [0, 0, 0.25, 0.25, 0, 0.5])
  np.testing.assert_allclose(
    arrays["score_K"][:, 0],
    [np.dot(arrays["label_dist_C"][0], np.arange(6)) / 5, (0.5 + 0.75 + 2.5) / 5],
    rtol=1e-6,
  )
  np.testing.assert_array_equal(arrays["loss_mask_KxL"][0, 0], [0, 1, 1])
  assert counts["records"] == 2


@pytest.mark.parametrize(
  "record, message",
  [
    ({"prompt": [1], "completion": [2]}, "exactly one of the fields 'distribution' and 'votes'"),
    ({"prompt": [1], "completion": [2], "votes": [1, 2.5]}, "must hold non-negative ints"),
    ({"prompt": [1], "completion": [2], "distribution": [0.5, -0.5]}, "non-negative numbers"),
    ({"prompt": [1], "completion": [2], "distribution": [1.0]}, "at least 2 categories"),
    ({"prompt": [1], "completion": [2], "distribution": [0, 0]}, "sums to 0"),
    (
      {"prompt": [1], "completion": [2], "votes": [1, 2, 3]},
      "3 categories; earlier records have 2",
    ),
  ],
)
def test_distribution_errors_name_the_record(tmp_path, record, message):
  path = tmp_path / "dist.jsonl"
  path.write_text(
    json.dumps({"prompt": [1], "completion": [2], "votes": [1, 0]})
    + "\n"
    + json.dumps(record)
    + "\n"
  )
  with pytest.raises(DataError) as e:
    preference.read(f"jsonl:{path}", "distribution")
  assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def _word_tokenizer(tmp_path):
  """A word-level tokenizer.json over the testbed's 8 tokens a..h (ids 0..7)."""
  import tokenizers
  from tokenizers import models as tok_models, pre_tokenizers

  tok = tokenizers.Tokenizer(
    tok_models.WordLevel({c: i for i, c in enumerate("abcdefgh")}, unk_token="h")
  )
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return str(path)


def test_text_records_are_tokenized_with_a_tokenizer_json(tmp_path):
  from align_jax.data import tokenize

  text = tokenize.Text(tokenize.load(_word_tokenizer(tmp_path)))
  path = tmp_path / "text.jsonl"
  path.write_text(json.dumps({"prompt": "a b", "chosen": "c d e", "rejected": [5]}) + "\n")
  arrays, _ = preference.read(f"jsonl:{path}", "pairs", text=text)
  np.testing.assert_array_equal(arrays["tokens_KxL"][0], [[0, 1, 2, 3, 4], [0, 1, 5, 0, 0]])
  np.testing.assert_array_equal(arrays["loss_mask_KxL"][0], [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])
  with pytest.raises(DataError, match="is text; set data.tokenizer"):
    preference.read(f"jsonl:{path}", "pairs")
  path.write_text(json.dumps({"prompt": "a", "chosen": "   ", "rejected": "b"}) + "\n")
  with pytest.raises(DataError, match=":1: field 'chosen' is empty"):
    preference.read(f"jsonl:{path}", "pairs", text=text)
  with pytest.raises(FileNotFoundError, match="no such file"):
    tokenize.load(str(tmp_path / "absent.json"))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not a tokenizer.json"):
    tokenize.load(str(tmp_path / "bad.json"))
