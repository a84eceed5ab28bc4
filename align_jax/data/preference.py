"""Preference data in six formats, from JSONL, ArrayRecord or TFDS, as padded arrays.

Formats (`fmt`); every record also has "prompt". Prompts and responses are token ids (lists of
non-negative ints) or, with a tokenizer (`text`: data.tokenizer, data.chat_template), text or chat
messages as Hugging Face datasets write them (`tokenize.Text`: a prompt is text or a message list;
a response is text, or the assistant's message after the prompt's messages, which it may repeat
first). Unknown extra fields are ignored.

| fmt       | fields besides prompt                   | K         | score_K            | extra     |
|-----------|-----------------------------------------|-----------|--------------------|-----------|
| pairs     | chosen, rejected                        | 2         | [1, 0]             |           |
| lists     | responses [K'], scores or ranks [K']    | list_size | scores, or −rank   |           |
| negatives | rejected                                | 1         | [0]                |           |
| binary    | completion, label (true/false or 1/0)   | 1         | [label]            | desirable |
| ternary   | a, b, label ("a" / "b" / "tie")         | 2         | [1, 0]; tie [½, ½] | is_tie    |
| distribution | completion, distribution or votes [C] | 1        | [mean category/(C−1)] | label_dist_C |

TRL's dataset types read as they are: "pairs" and "binary" records may leave the prompt implicit
(`implicit_prompt`: the shared start of "chosen" and "rejected", TRL's `extract_prompt`), and a
"binary" (KTO / BCO) source may hold pairs, each read as a desirable chosen and an undesirable
rejected record (TRL's `unpair_preference_dataset`; every rejected one after the chosen ones).
"distribution" (DPRM): the share of a population choosing each of C ordered categories (worst
first), given directly ("distribution", non-negative, normalised here) or as vote counts ("votes",
non-negative ints, turned into the posterior mean (1 + n_c)/Σ(1 + n) of a uniform Dirichlet prior);
every record must have the same C. "lists": scores are floats, higher = better; ranks are ints >= 1, 1 = best (ties share a rank);
responses keep their order. "ternary": the winner comes first (a first for a tie).

Sources (`source`), each record a JSON object:
- "jsonl:PATH" or a PATH ending in ".jsonl": one object per line, blank lines ignored; errors
  read "PATH:LINE: ...".
- "arrayrecord:PATH" or a PATH ending in ".array_record": each record the UTF-8 JSON bytes of one
  object; errors read "PATH[record N]: ..." with N counted from 0.
- "tfds:NAME/SPLIT" or "tfds:NAME/SPLIT@DATA_DIR": `tfds.data_source(NAME, split=SPLIT,
  data_dir=DATA_DIR)` (NAME may hold a config, "name/config:1.0.0"), a random-access ArrayRecord
  source as Grain reads it; features are named as the fields above. Without tensorflow, store
  token ids as `Sequence(np.int32)` or `Tensor(shape=(None,), dtype=np.int32)` and "responses" as
  `Sequence(Tensor(shape=(None,), dtype=np.int32, encoding="bytes"))`. Errors read
  "tfds:NAME/SPLIT[index N]: ...".

Output (N kept records): tokens_KxL int32 [N, K, L] (prompt + response, right-padded with 0),
loss_mask_KxL float32 (1 on response tokens), score_K float32 [N, K], response_mask_K float32
[N, K] (0 for padding entries of short lists: no tokens, score 0), and desirable / is_tie float32
[N]. L = max_len, or the longest prompt + response when max_len = 0.

Bad data raises DataError naming the source and record; these cases are instead counted in
`counts` (always all keys of COUNTS):
- records: records kept.
- padded_lists: lists shorter than K (list_size, or the longest kept list when list_size = 0).
  A list longer than list_size is an error.
- truncated_responses: responses of kept records cut from their end so prompt + response fits
  max_len (the prompt is never cut; a prompt leaving no room for one response token is an error).
- skipped_all_tied: lists whose scores are all equal (incl. one-response lists).
- skipped_identical_pair: pairs / ternary records whose two responses are equal token-for-token
  after truncation.
A source with no records, or whose records are all skipped, is an error.
"""

import functools
import json
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
from align_jax.errors import DataError, MissingFileError

FORMATS = ("pairs", "lists", "negatives", "binary", "ternary", "distribution")
COUNTS = (
  "records",
  "padded_lists",
  "truncated_responses",
  "skipped_all_tied",
  "skipped_identical_pair",
)
_FIXED_K = {"pairs": 2, "negatives": 1, "binary": 1, "ternary": 2, "distribution": 1}
_EXTRA = {"binary": "desirable", "ternary": "is_tie"}


def read(
  source: str,
  fmt: str,
  *,
  max_len: int = 0,
  list_size: int = 0,
  vocab_size: int | None = None,
  text=None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Reads a preference data source into padded arrays.

  Args:
    source: "jsonl:PATH", "arrayrecord:PATH", "tfds:NAME/SPLIT[@DATA_DIR]", or a path ending in
      ".jsonl" / ".array_record" (see the module docstring).
    fmt: one of FORMATS.
    max_len: sequence length L; longer responses are truncated (0: the longest record).
    list_size: K for "lists" (0: the longest list); other formats have a fixed K and accept 0 or it.
    vocab_size: if given, token ids must be below it.
    text: a `tokenize.Text` (tokenizer and chat template); then text and message fields are
      tokenized, token-id fields are taken as they are. None: text is an error.

  Returns:
    (arrays, counts): record fields as described in the module docstring, and the counts of
    kept, padded, truncated and skipped records.

  Raises:
    DataError: a malformed record, an empty source, or every record skipped.
    FileNotFoundError: a file source that does not exist.
    ValueError: a bad fmt, source string, max_len or list_size.
  """
  if fmt not in FORMATS:
    raise DataError(f"data format {fmt!r}: expected one of {FORMATS}")
  if max_len < 0 or list_size < 0:
    raise DataError(f"max_len={max_len} and list_size={list_size} must be >= 0")
  if fmt in _FIXED_K and list_size not in (0, _FIXED_K[fmt]):
    raise DataError(f"list_size={list_size}: format {fmt!r} has {_FIXED_K[fmt]} responses")
  label, rows = records(source)
  counts = dict.fromkeys(COUNTS, 0)
  kept, undesirable, seen, categories = [], [], 0, 0
  for where, record, unpaired in _entries(rows, fmt):
    seen += unpaired != "rejected"
    prompt, responses, scores, extra = _parse(record, fmt, where, vocab_size, text)
    if list_size and len(responses) > list_size:
      raise DataError(f"{where}: {len(responses)} responses exceed list_size={list_size}")
    if fmt == "distribution":
      categories = categories or len(extra["label_dist"])
      if len(extra["label_dist"]) != categories:
        raise DataError(
          f"{where}: {len(extra['label_dist'])} categories; earlier records have {categories}"
        )
    truncated = 0
    if max_len:
      room = max_len - len(prompt)
      if room < 1:
        raise DataError(
          f"{where}: prompt of {len(prompt)} tokens leaves no room for a response "
          f"within max_len={max_len}"
        )
      truncated = sum(len(r) > room for r in responses)
      responses = [r[:room] for r in responses]
    if len(responses) == 2 and fmt != "lists" and responses[0] == responses[1]:
      counts["skipped_identical_pair"] += 1
      continue
    if fmt == "lists" and len(set(scores)) == 1:
      counts["skipped_all_tied"] += 1
      continue
    counts["truncated_responses"] += truncated
    # An unpaired pair's rejected half goes after every chosen one (TRL's order), so the KTO
    # mismatched completion of a record (the previous one's) is another prompt's.
    (undesirable if unpaired == "rejected" else kept).append((prompt, responses, scores, extra))
  kept += undesirable
  if not seen:
    raise DataError(f"{label}: no records")
  if not kept:
    raise DataError(f"{label}: all {seen} records were skipped ({counts})")
  return _arrays(kept, fmt, max_len, list_size, counts), counts


def is_messages(value) -> bool:
  """Whether a field holds chat messages (a list of {"role", "content"} dicts), as TRL decides."""
  return (
    isinstance(value, (list, tuple))
    and bool(value)
    and isinstance(value[0], dict)
    and "role" in value[0]
    and "content" in value[0]
  )


def implicit_prompt(record: dict) -> dict:
  """A preference record with its prompt made explicit, as TRL's `maybe_extract_prompt` does.

  Without a "prompt" field, or with one of another kind than "chosen" (text vs messages), the
  prompt is the shared start of "chosen" and "rejected": characters of text (less a space just
  before the first difference), messages of a conversation, or token ids; both keep the rest.
  (TRL's one quirk is not copied: a first difference at index 0 never moves the cut to -1.)

  Examples:
    >>> implicit_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    {'chosen': ' blue.', 'rejected': ' green.', 'prompt': 'The sky is'}
  """
  if "chosen" not in record or "rejected" not in record:
    return record
  chosen, rejected = (_listed(plain(record[k])) for k in ("chosen", "rejected"))
  if "prompt" in record and is_messages(plain(record["prompt"])) == is_messages(chosen):
    return record
  n = min(len(chosen), len(rejected))
  if not n or isinstance(chosen, (int, float)):  # The field checks name what is wrong.
    return record
  for idx in range(n):
    if chosen[idx] != rejected[idx]:
      if idx and chosen[idx - 1] == " ":
        idx -= 1
      break
  return {**record, "chosen": chosen[idx:], "rejected": rejected[idx:], "prompt": chosen[:idx]}


def _listed(value):
  """A 1-d integer array as a list (token ids from TFDS); anything else as it is."""
  return value.tolist() if isinstance(value, np.ndarray) and value.ndim == 1 else value


def _entries(rows, fmt: str) -> Iterator[tuple[str, dict, str]]:
  """(where, record, unpaired) of each source record, its implicit prompt made explicit. For
  "binary", a pair without "completion" gives two records, as TRL's `unpair_preference_dataset`
  does: the chosen one desirable, the rejected one not (unpaired says which half)."""
  for where, record in rows:
    if fmt in ("pairs", "binary"):
      record = implicit_prompt(record)
    if fmt == "binary" and "completion" not in record and "chosen" in record:
      for half, label in (("chosen", True), ("rejected", False)):
        if half not in record:
          raise DataError(f"{where}: record has no field {half!r}")
        prompt = {"prompt": record["prompt"]} if "prompt" in record else {}
        yield where, {**prompt, "completion": record[half], "label": label}, half
    else:
      yield where, record, ""


def check_source(source: str) -> None:
  """Fails early (before any model work) on a malformed source string or a missing file."""
  kind, sep, rest = source.partition(":")
  if sep and kind == "tfds":
    return
  path = rest if sep and kind in ("jsonl", "arrayrecord") else source
  if not (sep and kind in ("jsonl", "arrayrecord")) and not source.endswith(
    (".jsonl", ".array_record")
  ):
    raise DataError(
      f"data source {source!r}: expected jsonl:PATH, arrayrecord:PATH, "
      "tfds:NAME/SPLIT[@DATA_DIR], or a path ending in .jsonl or .array_record"
    )
  readable(path, f"data source {source!r}")


def readable(path: str, what: str) -> None:
  """Fails with one line unless `path` is a file whose first bytes can be read."""
  if os.path.isdir(path):
    raise DataError(f"{what}: {path} is a directory, not a file")
  if not os.path.exists(path):
    raise MissingFileError(f"{what}: no such file")
  try:
    with open(path, "rb") as f:
      f.read(1)
  except OSError as e:
    raise DataError(f"{what}: {path} cannot be read ({e.strerror})") from None


def records(source: str) -> tuple[str, Iterator[tuple[str, dict]]]:
  """(label for messages, iterator of (record location, record)) for a source string."""
  kind, sep, rest = source.partition(":")
  if not (sep and kind in ("jsonl", "arrayrecord", "tfds")):
    kind, rest = None, source
    if source.endswith(".jsonl"):
      kind = "jsonl"
    elif source.endswith(".array_record"):
      kind = "arrayrecord"
  if kind == "tfds":
    name_split, _, data_dir = rest.partition("@")
    name, _, split = name_split.rpartition("/")
    if name and split:
      return f"tfds:{name_split}", _tfds_records(name, split, data_dir or None)
  elif kind and rest:
    readable(rest, f"data source {source!r}")
    return rest, (_jsonl_records if kind == "jsonl" else _arrayrecord_records)(rest)
  raise DataError(
    f"data source {source!r}: expected jsonl:PATH, arrayrecord:PATH, "
    "tfds:NAME/SPLIT[@DATA_DIR], or a path ending in .jsonl or .array_record"
  )


def _decode(raw: bytes, where: str) -> dict:
  try:
    record = json.loads(raw)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: not JSON ({e.msg})") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not UTF-8 JSON ({e.reason})") from None
  if not isinstance(record, dict):
    raise DataError(f"{where}: not a JSON object")
  return record


def _jsonl_records(path: str) -> Iterator[tuple[str, dict]]:
  with open(path, "rb") as f:
    line = 0
    try:
      for line, raw in enumerate(f, start=1):
        if raw.strip():
          yield f"{path}:{line}", _decode(raw, f"{path}:{line}")
    except OSError as e:  # A read that fails part-way (I/O error, a file removed under us).
      raise DataError(f"{path}:{line + 1}: cannot be read ({e.strerror})") from None


def _arrayrecord_records(path: str) -> Iterator[tuple[str, dict]]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  try:
    reader = array_record_module.ArrayRecordReader(path)
    raws = reader.read_all()
    reader.close()
  except RuntimeError as e:
    raise DataError(f"{path}: not a readable ArrayRecord file ({e})") from None
  for n, raw in enumerate(raws):
    yield f"{path}[record {n}]", _decode(raw, f"{path}[record {n}]")


def _tfds_records(name: str, split: str, data_dir: str | None) -> Iterator[tuple[str, dict]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # Registers xsum and cnn_dailymail (TFDS imports them only alongside TensorFlow).
  import tensorflow_datasets.summarization  # pylint: disable=g-import-not-at-top,unused-import

  ds = tfds.data_source(name, split=split, data_dir=data_dir)
  for n in range(len(ds)):
    yield f"tfds:{name}/{split}[index {n}]", ds[n]


def plain(value):
  """numpy scalars and 0-d arrays -> Python scalars; bytes -> str where valid UTF-8."""
  if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
    value = value.item()
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError:
      pass
  return value


def _field(record: dict, key: str, where: str):
  if key not in record:
    raise DataError(f"{where}: record has no field {key!r}")
  return record[key]


def token_ids(
  value, key: str, where: str, vocab_size: int | None, encode: Callable | None = None
) -> list[int]:
  """A non-empty list of token ids below vocab_size, from a list, tuple or 1-d integer array, or
  from text or chat messages through `encode`."""
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError:
      raise DataError(f"{where}: field {key!r} is bytes that are not UTF-8 text") from None
  messages = isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)
  if isinstance(value, str) or messages:
    if encode is None:
      raise DataError(
        f"{where}: field {key!r} is {'messages' if messages else 'text'}; set "
        "data.tokenizer (a tokenizer.json, tokenizer.model or tokenizer directory) "
        "or give token ids"
      )
    try:
      value = list(encode(value))
    except ValueError as e:
      raise DataError(f"{where}: field {key!r}: {e}") from None
  if isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.integer):
    value = value.tolist()
  if not isinstance(value, (list, tuple)):
    raise DataError(
      f"{where}: field {key!r} must be a list of token ids, got {type(value).__name__}"
    )
  ids = [int(t) if isinstance(t, np.integer) else t for t in value]
  for t in ids:
    if isinstance(t, bool) or not isinstance(t, int):
      raise DataError(f"{where}: field {key!r} must be a list of token ids, has {t!r}")
  if not ids:
    raise DataError(f"{where}: field {key!r} is empty")
  if min(ids) < 0:
    raise DataError(f"{where}: field {key!r} has negative token id {min(ids)}")
  if vocab_size is not None and max(ids) >= vocab_size:
    raise DataError(f"{where}: field {key!r} has token id {max(ids)} >= vocab size {vocab_size}")
  return ids


def _sequence(value, key: str, where: str) -> list:
  if isinstance(value, np.ndarray) and value.ndim >= 1:
    value = list(value)
  if not isinstance(value, (list, tuple)):
    raise DataError(f"{where}: field {key!r} must be a list, got {type(value).__name__}")
  return [plain(v) for v in value]


def _scores(record: dict, n: int, where: str) -> list[float]:
  """ "scores" (finite numbers) or "ranks" (ints >= 1, as −rank) for n responses."""
  if ("scores" in record) == ("ranks" in record):
    raise DataError(f"{where}: record needs exactly one of the fields 'scores' and 'ranks'")
  key = "scores" if "scores" in record else "ranks"
  values = _sequence(record[key], key, where)
  if len(values) != n:
    raise DataError(f"{where}: field {key!r} has {len(values)} values for {n} responses")
  for v in values:
    if key == "scores" and (
      isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    ):
      raise DataError(f"{where}: field 'scores' must hold finite numbers, has {v!r}")
    if key == "ranks" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise DataError(f"{where}: field 'ranks' must hold ints >= 1 (1 = best), has {v!r}")
  return [float(v) if key == "scores" else -float(v) for v in values]


def _label_distribution(record: dict, where: str) -> list[float]:
  """ "distribution" (normalised) or "votes" (uniform-prior posterior mean) over C >= 2 categories."""
  if ("distribution" in record) == ("votes" in record):
    raise DataError(f"{where}: record needs exactly one of the fields 'distribution' and 'votes'")
  key = "distribution" if "distribution" in record else "votes"
  values = _sequence(record[key], key, where)
  if len(values) < 2:
    raise DataError(f"{where}: field {key!r} needs at least 2 categories, has {len(values)}")
  for v in values:
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
    if bad or (key == "votes" and not isinstance(v, int)):
      kind = "non-negative ints" if key == "votes" else "non-negative numbers"
      raise DataError(f"{where}: field {key!r} must hold {kind}, has {v!r}")
  counts = np.asarray(values, np.float64) + (1.0 if key == "votes" else 0.0)
  if counts.sum() <= 0:
    raise DataError(f"{where}: field 'distribution' sums to 0")
  return (counts / counts.sum()).tolist()


def _parse(record: dict, fmt: str, where: str, vocab_size: int | None, text=None):
  """One record -> (prompt, responses, scores, extra fields)."""

  def ids(key: str, value=None) -> list[int]:
    if text is None:
      encode = None
    elif key == "prompt":
      encode = text.prompt
    else:  # A response given as messages must follow the record's prompt.
      encode = functools.partial(text.response, prompt=plain(record.get("prompt")))
    return token_ids(
      _field(record, key, where) if value is None else value, key, where, vocab_size, encode
    )

  prompt = ids("prompt")
  if fmt == "pairs":
    return prompt, [ids("chosen"), ids("rejected")], [1.0, 0.0], {}
  if fmt == "negatives":
    return prompt, [ids("rejected")], [0.0], {}
  if fmt == "lists":
    values = _sequence(_field(record, "responses", where), "responses", where)
    if not values:
      raise DataError(f"{where}: field 'responses' is empty")
    responses = [ids(f"responses[{i}]", v) for i, v in enumerate(values)]
    return prompt, responses, _scores(record, len(responses), where), {}
  if fmt == "distribution":
    dist = _label_distribution(record, where)
    mean = float(np.dot(dist, np.arange(len(dist)))) / (len(dist) - 1)
    return prompt, [ids("completion")], [mean], {"label_dist": dist}
  label = plain(_field(record, "label", where))
  if fmt == "binary":
    if not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
      raise DataError(f"{where}: field 'label' must be true/false or 1/0, got {label!r}")
    return prompt, [ids("completion")], [float(label)], {"desirable": float(label)}
  if label not in ("a", "b", "tie"):
    raise DataError(f"{where}: field 'label' must be \"a\", \"b\" or \"tie\", got {label!r}")
  a, b = ids("a"), ids("b")
  tie = label == "tie"
  return (
    prompt,
    [b, a] if label == "b" else [a, b],
    [0.5, 0.5] if tie else [1.0, 0.0],
    {"is_tie": float(tie)},
  )


def _arrays(
  kept: list, fmt: str, max_len: int, list_size: int, counts: dict[str, int]
) -> dict[str, np.ndarray]:
  """Pads the kept records into the output arrays; counts padded lists."""
  K = _FIXED_K.get(fmt) or list_size or max(len(r) for _, r, _, _ in kept)
  L = max_len or max(len(p) + len(x) for p, r, _, _ in kept for x in r)
  N = len(kept)
  tokens = np.zeros((N, K, L), np.int32)
  loss_mask = np.zeros((N, K, L), np.float32)
  score = np.zeros((N, K), np.float32)
  response_mask = np.zeros((N, K), np.float32)
  extra = np.zeros((N,), np.float32)
  for n, (prompt, responses, scores, fields) in enumerate(kept):
    counts["padded_lists"] += len(responses) < K
    for k, response in enumerate(responses):
      tokens[n, k, : len(prompt) + len(response)] = prompt + response
      loss_mask[n, k, len(prompt) : len(prompt) + len(response)] = 1.0
    score[n, : len(scores)] = scores
    response_mask[n, : len(responses)] = 1.0
    extra[n] = fields.get(_EXTRA.get(fmt), 0.0)
  counts["records"] = N
  arrays = {
    "tokens_KxL": tokens,
    "loss_mask_KxL": loss_mask,
    "score_K": score,
    "response_mask_K": response_mask,
  }
  if fmt in _EXTRA:
    arrays[_EXTRA[fmt]] = extra
  if fmt == "distribution":
    arrays["label_dist_C"] = np.array([f["label_dist"] for _, _, _, f in kept], np.float32)
  return arrays


def with_mismatched(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Binary records (K = 1) gain K index 1: their prompt followed by the previous record's completion.

  KTO's reference point z0 is a batch estimate of KL(π‖π_ref) from such mismatched (prompt,
  completion) pairs (ALGORITHMS.md §5.6). The pairs are drawn once over the dataset, here; TRL
  rotates completions inside each batch instead (`objectives.binary.kto_reference_point`). A
  mismatched sequence longer than L is cut from its end; it only enters z0, never the loss. Its
  score is 0.
  """
  tokens_NxL, mask_NxL = arrays["tokens_KxL"][:, 0], arrays["loss_mask_KxL"][:, 0]
  n, length = tokens_NxL.shape
  starts_N = np.argmax(mask_NxL > 0, axis=1)  # Every kept response has at least one token.
  other_tokens, other_mask = np.zeros_like(tokens_NxL), np.zeros_like(mask_NxL)
  for i in range(n):
    j = (i - 1) % n
    seq = np.concatenate([tokens_NxL[i, : starts_N[i]], tokens_NxL[j][mask_NxL[j] > 0]])[:length]
    other_tokens[i, : len(seq)] = seq
    other_mask[i, starts_N[i] : len(seq)] = 1.0
  return {
    **arrays,
    "tokens_KxL": np.stack([tokens_NxL, other_tokens], axis=1),
    "loss_mask_KxL": np.stack([mask_NxL, other_mask], axis=1),
    "score_K": np.concatenate([arrays["score_K"], np.zeros((n, 1), np.float32)], axis=1),
    "response_mask_K": np.ones((n, 2), np.float32),
  }
