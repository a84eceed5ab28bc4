"""Prompt-only records for on-policy objectives, from the sources of preference.py, as P-token rows.

A record's prompt is its "prompt" field (text, chat messages, or token ids), else its "messages"
field (chat messages, the user's last), else, for these TFDS text datasets, the field below; a
preference record's implicit prompt counts (`preference.implicit_prompt`: TRL's prompt-only view
of a preference dataset). Text
is formatted and tokenized by a `tokenize.Text` (data.tokenizer, data.chat_template).

| TFDS name     | prompt field | what                                  | splits                    |
|---------------|--------------|---------------------------------------|---------------------------|
| xsum          | document     | BBC article (one-line summaries)      | train, validation, test   |
| cnn_dailymail | article      | news article (summarisation)          | train, validation, test   |
| reddit_tifu   | documents    | Reddit post (TL;DR summarisation)     | train                     |
| imdb_reviews  | text         | film review (sentiment)               | train, test, unsupervised |

Every prompt is exactly P = prompt_len tokens (the sampler and the teacher-forced log-probs take
unpadded prompts of one length): a longer prompt loses tokens from the end of its text, keeping
the template's tail (end of turn and assistant header; EOS when the tokenizer appends one); a
shorter one is skipped. Token-id prompts are cut from their end. Counts: records (kept),
truncated_prompts, skipped_short_prompts. Only the first `limit` records of the source are read
(0: all).
"""

import numpy as np

from align_jax.data import preference
from align_jax.errors import DataError

DATASETS = {
  "xsum": "document",
  "cnn_dailymail": "article",
  "reddit_tifu": "documents",
  "imdb_reviews": "text",
}
COUNTS = ("records", "truncated_prompts", "skipped_short_prompts")


def read(
  source: str, *, prompt_len: int, text=None, limit: int = 0, vocab_size: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Reads prompts into {"prompt_P": int32 [N, P], "prompt_index": int32 [N]} and counts.

  Args:
    source: a source string of preference.read ("jsonl:PATH", "tfds:xsum/train", ...).
    prompt_len: P, tokens per prompt (>= 1).
    text: a `tokenize.Text`; None: text prompts are an error.
    limit: read at most this many records (0: all).
    vocab_size: if given, token ids must be below it.

  Raises:
    DataError: a record without a prompt, bad text or ids, or no prompt of P tokens.
    ValueError: a bad prompt_len (e.g. no room for text inside the chat template).
  """
  frame = text.frame if text is not None else 0
  if prompt_len <= frame:
    raise DataError(
      f"data.prompt_len={prompt_len} must exceed the {frame} tokens the chat "
      "template adds around a prompt (set data.prompt_len for prompt sources)"
    )
  label, source_records = preference.records(source)
  field = DATASETS.get(_tfds_name(source))
  counts = dict.fromkeys(COUNTS, 0)
  rows, seen = [], 0
  for where, record in source_records:
    if limit and seen == limit:
      break
    seen += 1
    record = preference.implicit_prompt(record)
    key = next((k for k in ("prompt", "messages", field) if k in record), None)
    if key is None:
      wanted = " or ".join(repr(k) for k in ("prompt", "messages", field) if k)
      raise DataError(f"{where}: record has no field {wanted}")
    value = preference.plain(record[key])
    formatted = isinstance(value, str) or (
      isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)
    )
    ids = preference.token_ids(value, key, where, vocab_size, None if text is None else text.prompt)
    if len(ids) < prompt_len:
      counts["skipped_short_prompts"] += 1
      continue
    if len(ids) > prompt_len:  # Cut the text's end; keep the template's tail.
      tail = text.prompt_tail(value) if formatted else 0
      ids = ids[: prompt_len - tail] + ids[len(ids) - tail :]
      counts["truncated_prompts"] += 1
    rows.append(ids)
  if not seen:
    raise DataError(f"{label}: no records")
  if not rows:
    raise DataError(
      f"{label}: none of {seen} prompts has data.prompt_len={prompt_len} tokens "
      f"({counts['skipped_short_prompts']} shorter)"
    )
  counts["records"] = len(rows)
  return {
    "prompt_P": np.asarray(rows, np.int32),
    "prompt_index": np.arange(len(rows), dtype=np.int32),
  }, counts


def _tfds_name(source: str) -> str:
  """ "tfds:reddit_tifu/short:1.1.2/train@dir" -> "reddit_tifu"; "" for other sources."""
  kind, _, rest = source.partition(":")
  return rest.partition("@")[0].split("/")[0].split(":")[0] if kind == "tfds" else ""
