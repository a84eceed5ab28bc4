"""Text to token ids for the data readers: a Hugging Face `tokenizer.json` through `tokenizers`.

Text fields are encoded as they are, without special tokens: prompt formatting (chat templates,
BOS/EOS) belongs to each model's preset. A record's prompt and response are encoded separately and
concatenated, so the response's tokens are exactly the scored ones.
"""

import os
from collections.abc import Callable


def load(path: str) -> Callable[[str], list[int]]:
  """The encode function of the tokenizer saved at `path` (a tokenizer.json)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.tokenizer {path!r}: no such file")
  import tokenizers  # Only runs that read text need it.
  try:
    tokenizer = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # The library raises bare Exceptions for malformed files.
    raise ValueError(f"data.tokenizer {path!r}: not a tokenizer.json ({e})") from None
  return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
