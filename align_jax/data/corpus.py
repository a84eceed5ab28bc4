"""Supervised fine-tuning records from files ("corpus", the `sft` objective), as TRL reads them.

From the sources of preference.py (JSONL, ArrayRecord, TFDS), one record each, in TRL's
language-modeling and prompt-completion types; with a tokenizer (`text`, data.tokenizer and
data.chat_template) text and messages are tokenized, token-id fields are taken as they are:

| record                        | tokens                                       | scored (loss mask)        |
|-------------------------------|----------------------------------------------|---------------------------|
| {"text": "..."}               | `tokenizer(text)` (its BOS), then EOS unless | every token               |
|                               | the text ends with it (TRL's SFT)            |                           |
| {"text": [ids]}               | the ids                                      | every token               |
| {"messages": [...]}           | the chat template's text of the conversation | the assistant turns       |
|                               | (`Text.conversation`)                        | (content and end of turn) |
| {"prompt": .., "completion": ..} | prompt and completion as preference.py's  | the completion            |
|                               | prompt and response                          |                           |

A record is one row (K = 1): tokens_KxL int32 [N, 1, L] right-padded with 0, loss_mask_KxL
float32 (position 0 is never predicted, so never scored). L = max_len, or the longest record
when max_len = 0; a longer record loses its end. Counts (`COUNTS`): records (kept),
truncated (cut at max_len), skipped_unscored (no scored token left after position 0). Bad data
raises DataError naming the source and record.
"""

import numpy as np

from align_jax.data import preference
from align_jax.errors import DataError

COUNTS = ("records", "truncated", "skipped_unscored")


def read(
  source: str, *, max_len: int = 0, vocab_size: int | None = None, text=None
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Reads SFT records into {"tokens_KxL", "loss_mask_KxL"} and counts (module docstring).

  Args:
    source: a source string of preference.read ("jsonl:PATH", "tfds:NAME/SPLIT", ...).
    max_len: L; longer records are cut (0: the longest record).
    vocab_size: if given, token ids must be below it.
    text: a `tokenize.Text`; None: text and messages are errors.
  """
  if max_len < 0:
    raise DataError(f"max_len={max_len} must be >= 0")
  label, rows = preference.records(source)
  counts = dict.fromkeys(COUNTS, 0)
  kept, seen = [], 0
  for where, record in rows:
    seen += 1
    ids, mask = _parse(record, where, vocab_size, text)
    if max_len and len(ids) > max_len:
      ids, mask = ids[:max_len], mask[:max_len]
      counts["truncated"] += 1
    if not any(mask[1:]):
      counts["skipped_unscored"] += 1
      continue
    kept.append((ids, mask))
  if not seen:
    raise DataError(f"{label}: no records")
  if not kept:
    raise DataError(f"{label}: no record has a scored token ({counts})")
  L = max_len or max(len(ids) for ids, _ in kept)
  tokens = np.zeros((len(kept), 1, L), np.int32)
  loss_mask = np.zeros((len(kept), 1, L), np.float32)
  for n, (ids, mask) in enumerate(kept):
    tokens[n, 0, : len(ids)] = ids
    loss_mask[n, 0, : len(mask)] = mask
  counts["records"] = len(kept)
  return {"tokens_KxL": tokens, "loss_mask_KxL": loss_mask}, counts


def _parse(record: dict, where: str, vocab_size, text) -> tuple[list[int], list[int]]:
  """One record -> (ids, loss mask)."""
  check = lambda ids, key: preference.token_ids(ids, key, where, vocab_size)
  if "text" in record:
    value = preference.plain(record["text"])
    if isinstance(value, str) and text is not None:
      tok = text.tokenizer
      ids = tok.encode(value, add_special_tokens=True)
      if tok.eos_id is not None and (not ids or ids[-1] != tok.eos_id):
        ids.append(tok.eos_id)
    else:
      ids = value
    ids = check(ids, "text")
    return ids, [1] * len(ids)
  if "messages" in record:
    value = _messages(record["messages"])
    if not preference.is_messages(value):
      raise DataError(f"{where}: field 'messages' must be a list of chat messages")
    if text is None:
      raise DataError(f"{where}: field 'messages' needs data.tokenizer and a chat template")
    try:
      ids, mask = text.conversation(value)
    except DataError as e:
      raise DataError(f"{where}: field 'messages': {e}") from None
    return check(ids, "messages"), mask
  if "prompt" in record and "completion" in record:
    prompt = preference.token_ids(
      preference.plain(record["prompt"]),
      "prompt",
      where,
      vocab_size,
      None if text is None else text.prompt,
    )
    response = preference.token_ids(
      preference.plain(record["completion"]),
      "completion",
      where,
      vocab_size,
      None
      if text is None
      else lambda v: text.response(v, prompt=preference.plain(record["prompt"])),
    )
    return prompt + response, [0] * len(prompt) + [1] * len(response)
  raise DataError(f"{where}: record has none of 'text', 'messages', 'prompt' and 'completion'")


def _messages(value):
  """Messages as a list of dicts; TFDS stores a sequence of dicts as a dict of sequences."""
  if isinstance(value, dict) and "role" in value and "content" in value:
    roles, contents = value["role"], value["content"]
    value = [{"role": r, "content": c} for r, c in zip(roles, contents)]
  if isinstance(value, (list, tuple)):
    return [
      {k: preference.plain(v) for k, v in m.items()} if isinstance(m, dict) else m for m in value
    ]
  return value
