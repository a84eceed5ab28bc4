r"""Text to token ids exactly as Hugging Face tokenizers give them, and chat-template formatting.

`load(path)` (data.tokenizer) reads a `tokenizer.json` through `tokenizers`, a SentencePiece
`tokenizer.model` through `sentencepiece`, or a Hugging Face tokenizer directory holding either
(tokenizer.json first, as transformers does), with the `tokenizer_config.json` /
`special_tokens_map.json` beside it. `Tokenizer.encode(text, add_special_tokens)` gives the ids of
transformers (v5) `tokenizer(text, add_special_tokens=...)["input_ids"]` for the same files:

- tokenizer.json: its own post-processor adds BOS/EOS (transformers ignores add_bos_token /
  add_eos_token of the config when a tokenizer.json is present).
- tokenizer.model: text is split on the special and added tokens of the config (else the model's
  control pieces); each piece is encoded by SentencePiece, with the "▁" dummy prefix (when the model
  has one) only on a first piece that starts the text and does not start with a space ("always" on
  every piece with `legacy: true`, never with `add_prefix_space: false`); BOS/EOS are added by
  the config's add_bos_token / add_eos_token (default false). Models are assumed to use identity
  normalisation, as Llama and Gemma do.

`Text(tokenizer, chat_template, system_prompt)` turns a record's text into ids (data.chat_template):

| chat_template  | prompt                                     | response                          |
|----------------|--------------------------------------------|-----------------------------------|
| ''             | text: as it is, no special tokens;         | text as it is; messages: as       |
|                | messages: the tokenizer's own template     | `tokenizer` below                 |
| tokenizer      | the tokenizer's own Jinja template         | the text the template adds for    |
| PATH.jinja     | (tokenizer_config.json / chat_template.    | the assistant's message after the |
|                | jinja; `chat_template.py`), or this file's | prompt and its generation prompt  |
| plain          | `tokenizer(text)` (BOS/EOS as configured)  | text + EOS (when there is one)    |
| llama3         | Llama 3 template, generation prompt added  | content.strip() + <|eot_id|>      |
| gemma          | Gemma 2/3 template (a system message opens | content.strip() + <end_of_turn>\n |
|                | the first user turn)                       |                                   |
| chatml         | `<|im_start|>role\n...<|im_end|>\n` turns  | content + <|im_end|>\n            |
| qwen2, qwen2.5 | ChatML with Qwen's default system message  | as chatml                         |

The named templates (llama3 ... qwen2.5) are built in, for tokenizers without a template of their
own. A chat prompt's ids are those of `apply_chat_template(messages, add_generation_prompt=True)`;
the response is the text that template writes for the assistant's turn after it (TRL's cut),
encoded on its own (so a response's tokens are exactly the scored ones). A prompt is text (one
user message) or a list of {"role", "content"} messages (system / user / assistant, the user's
last); a response is text or a message list ending with the assistant's message (any earlier
messages must be the prompt's); a conversation (`Text.conversation`, SFT) is scored on its
assistant turns. The sampler stops at the template's end of turn (the first token it writes after
an assistant message), else at EOS.
"""

import abc
import json
import os
import re

from align_jax.data import chat_template as chat_template_lib
from align_jax.errors import DataError, MissingFileError

TEMPLATES = ("", "plain", "llama3", "gemma", "chatml", "qwen2", "qwen2.5")
_DEFAULT_SYSTEM = {
  "qwen2": "You are a helpful assistant.",
  "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
}
# The token that ends an assistant turn (the sampler's stop token).
_END_OF_TURN = {
  "llama3": "<|eot_id|>",
  "gemma": "<end_of_turn>",
  "chatml": "<|im_end|>",
  "qwen2": "<|im_end|>",
  "qwen2.5": "<|im_end|>",
}
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


class Tokenizer(abc.ABC):
  """One tokenizer file and its configuration; `encode` is transformers' `tokenizer(text)`.

  Subclasses: `_JsonTokenizer` (tokenizer.json) and `_SentencePieceTokenizer` (tokenizer.model).
  """

  def __init__(self, path: str, config: dict):
    self.path = path
    self.bos_token = _content(config.get("bos_token"))
    self.eos_token = _content(config.get("eos_token"))
    # What a Jinja chat template sees: the named special tokens, and the template itself.
    self.special_tokens = {
      k: _content(config[k]) for k in chat_template_lib.SPECIAL_TOKENS if config.get(k) is not None
    }
    self.chat_template = chat_template_lib.find(os.path.dirname(path), config)

  @abc.abstractmethod
  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`, with BOS/EOS when `add_special_tokens` (as the HF tokenizer adds)."""

  @abc.abstractmethod
  def find(self, token: str) -> int | None:
    """The id of a token of the vocabulary (or an added token), or None."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """1 + the largest id it can give (added tokens included)."""

  def encode_continuation(self, text: str) -> list[int]:
    """Ids of `text` where it continues a longer text (a chat turn after its prompt): without the
    marks a text's start gets (a SentencePiece dummy prefix). transformers' piece trick: `text`
    is encoded after a newline whose ids are then dropped (else on its own)."""
    newline = self.encode("\n")
    ids = self.encode("\n" + text)
    return ids[len(newline) :] if ids[: len(newline)] == newline else self.encode(text)

  def token_id(self, token: str) -> int:
    token_id = self.find(token)
    if token_id is None:
      raise DataError(f"data.tokenizer {self.path!r}: token {token!r} is not in its vocabulary")
    return token_id

  @property
  def bos_id(self) -> int | None:
    return None if self.bos_token is None else self.token_id(self.bos_token)

  @property
  def eos_id(self) -> int | None:
    return None if self.eos_token is None else self.token_id(self.eos_token)


class _JsonTokenizer(Tokenizer):
  """A tokenizer.json through `tokenizers`."""

  def __init__(self, path: str, config: dict):
    super().__init__(path, config)
    import tokenizers  # pylint: disable=g-import-not-at-top

    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The library raises bare Exceptions for malformed files.
      raise DataError(f"data.tokenizer {path!r}: not a tokenizer.json ({e})") from None
    for token in (self.bos_token, self.eos_token):
      if token is not None:
        self.token_id(token)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def find(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceTokenizer(Tokenizer):
  """A SentencePiece tokenizer.model, with transformers' special tokens and prefix rule."""

  def __init__(self, path: str, config: dict):
    try:
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
      from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise DataError(
        f"data.tokenizer {path!r}: a tokenizer.model needs the sentencepiece "
        "package (pip install sentencepiece)"
      ) from None
    with open(path, "rb") as f:
      raw = f.read()
    try:
      proto = sentencepiece_model_pb2.ModelProto.FromString(raw)
      self._sp = spm.SentencePieceProcessor(model_proto=raw)
    except Exception as e:  # protobuf / sentencepiece errors have no common base.
      raise DataError(f"data.tokenizer {path!r}: not a SentencePiece model ({e})") from None
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    spec = proto.trainer_spec  # BOS, EOS and UNK default to the model's own pieces.
    defaults = {
      f"{k}_token": getattr(spec, f"{k}_piece")
      for k in ("bos", "eos", "unk")
      if getattr(spec, f"{k}_id") >= 0
    }
    config = {**defaults, **{k: v for k, v in config.items() if v is not None}}
    super().__init__(path, config)
    # Pieces are encoded without the dummy prefix; `encode` adds it where transformers does.
    self._prefix = "never"
    if proto.normalizer_spec.add_dummy_prefix and config.get("add_prefix_space", True):
      self._prefix = "always" if config.get("legacy", False) else "first"
    proto.normalizer_spec.add_dummy_prefix = False
    self._bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    # Special and added tokens, matched in the text before SentencePiece sees it.
    self._special = {_content(v): int(k) for k, v in config.get("added_tokens_decoder", {}).items()}
    named = [_content(config.get(k)) for k in _SPECIAL_KEYS]
    named += [_content(t) for t in config.get("additional_special_tokens") or []]
    for token in filter(None, named):
      if token not in self._special:
        if token not in pieces:
          raise DataError(
            f"data.tokenizer {path!r}: special token {token!r} is not in the SentencePiece model"
          )
        self._special[token] = pieces[token]
    self._pieces = pieces
    self._split = re.compile(
      "(" + "|".join(re.escape(t) for t in sorted(self._special, key=len, reverse=True)) + ")"
    )
    self._add_bos = bool(config.get("add_bos_token", False)) and self.bos_token is not None
    self._add_eos = bool(config.get("add_eos_token", False)) and self.eos_token is not None

  def encode(self, text: str, add_special_tokens: bool = False, *, start: bool = True) -> list[int]:
    ids = []
    parts = self._split.split(text) if self._special else [text]
    for k, part in enumerate(parts):
      if k % 2:  # A special token.
        ids.append(self._special[part])
      elif part:
        first = k == 0 and start
        prefix = (self._prefix == "always" and (k or start)) or (self._prefix == "first" and first)
        if prefix and not part.startswith((" ", "▁")):
          part = " " + part
        ids.extend(self._bare.encode(part))
    if add_special_tokens:
      ids = [self.bos_id] * self._add_bos + ids + [self.eos_id] * self._add_eos
    return ids

  def encode_continuation(self, text: str) -> list[int]:
    return self.encode(text, start=False)

  def find(self, token: str) -> int | None:
    return self._special.get(token, self._pieces.get(token))

  @property
  def vocab_size(self) -> int:
    return max([len(self._pieces), *(i + 1 for i in self._special.values())])


def load(path: str) -> Tokenizer:
  """The tokenizer at `path`: a tokenizer.json, a tokenizer.model, or a directory with either."""
  if os.path.isdir(path):
    found = [
      os.path.join(path, f)
      for f in ("tokenizer.json", "tokenizer.model")
      if os.path.isfile(os.path.join(path, f))
    ]
    if not found:
      raise MissingFileError(
        f"data.tokenizer {path!r}: no tokenizer.json or tokenizer.model in this directory"
      )
    file = found[0]
  elif os.path.isfile(path):
    file = path
  else:
    raise MissingFileError(f"data.tokenizer {path!r}: no such file or directory")
  config = _config(os.path.dirname(file))
  if file.endswith(".model"):
    return _SentencePieceTokenizer(file, config)
  return _JsonTokenizer(file, config)


def _config(directory: str) -> dict:
  """tokenizer_config.json, with special tokens it lacks taken from special_tokens_map.json."""
  config = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # The latter wins.
    file = os.path.join(directory, name)
    if os.path.isfile(file):
      try:
        with open(file) as f:
          config |= json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not JSON ({e})") from None
  return config


def _content(token) -> str | None:
  """A special token as written in a config: a string, or an AddedToken dict."""
  return token.get("content") if isinstance(token, dict) else token


# ---- Chat templates ------------------------------------------------------------------------------


def messages_of(value, *, last: str, system_prompt: str = "", ends: bool = True) -> list[dict]:
  """Text (one `last` message) or a message list, checked (`ends`: the last message is `last`'s);
  raises DataError."""
  if isinstance(value, str):
    messages = [{"role": last, "content": value}]
  elif isinstance(value, (list, tuple)) and value:
    messages = list(value)
  else:
    raise DataError(f"expected text or a non-empty list of messages, got {type(value).__name__}")
  for i, m in enumerate(messages):
    if not (
      isinstance(m, dict)
      and isinstance(m.get("content"), str)
      and m.get("role") in ("system", "user", "assistant")
    ):
      raise DataError(f"message {i} is not {{'role': system|user|assistant, 'content': text}}")
  if ends and messages[-1]["role"] != last:
    raise DataError(f"the last message is the {messages[-1]['role']}'s, not the {last}'s")
  if system_prompt and messages[0]["role"] != "system":
    messages.insert(0, {"role": "system", "content": system_prompt})
  return messages


def render(
  messages: list[dict],
  template: str,
  *,
  bos_token: str | None = None,
  add_generation_prompt: bool = True,
) -> str:
  """The text of a family's chat template (as its Jinja template renders it) for `messages`."""
  bos = bos_token or ""
  if template == "llama3":
    text = bos + "".join(
      f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
      for m in messages
    )
    return text + (
      "<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else ""
    )
  if template == "gemma":
    prefix = ""
    if messages[0]["role"] == "system":
      prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    text = bos
    for i, m in enumerate(messages):
      if (m["role"] == "user") != (i % 2 == 0):
        raise DataError("gemma: conversation roles must alternate user/assistant/user/...")
      role = "model" if m["role"] == "assistant" else m["role"]
      text += (
        f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{m['content'].strip()}<end_of_turn>\n"
      )
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")
  if template in ("chatml", "qwen2", "qwen2.5"):
    if template in _DEFAULT_SYSTEM and messages[0]["role"] != "system":
      messages = [{"role": "system", "content": _DEFAULT_SYSTEM[template]}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
  raise DataError(
    f"data.chat_template {template!r} is not a chat template; use one of {TEMPLATES[2:]}"
  )


class Text:
  """A record's text -> token ids: prompts through the chat template, responses as its
  assistant turn, whole conversations with their assistant mask (module docstring). Raises
  DataError for text it cannot format.

  Attributes:
    stop_id: the token that ends a response (the template's end of turn; EOS otherwise, or None).
    frame: tokens the template adds around a text prompt (BOS, turn headers, ...).
    tail: of those, the ones after the text (a cut prompt keeps them); `prompt_tail` per prompt.
  """

  def __init__(self, tokenizer: Tokenizer, chat_template: str = "", system_prompt: str = ""):
    self.tokenizer, self.template, self.system_prompt = tokenizer, chat_template, system_prompt
    self.jinja = None  # The Jinja template messages go through (else a named template).
    if chat_template in ("", "tokenizer") or chat_template.endswith(".jinja"):
      source = (
        chat_template_lib.read(chat_template)
        if chat_template.endswith(".jinja")
        else tokenizer.chat_template
      )
      if source is None and chat_template:
        raise DataError(
          f"data.chat_template={chat_template!r}: data.tokenizer {tokenizer.path!r} has no chat "
          "template (tokenizer_config.json 'chat_template' or chat_template.jinja)"
        )
      if source is not None:
        self.jinja = chat_template_lib.Template(source, chat_template or tokenizer.path)
    elif chat_template not in TEMPLATES:
      raise DataError(
        f"data.chat_template {chat_template!r} is unknown; use '', tokenizer, a .jinja file or "
        f"one of {TEMPLATES[1:]}"
      )
    self.chat = chat_template != "" and chat_template != "plain"  # Text is a user message too.
    self.messages = self.chat or self.jinja is not None  # Messages can be formatted.
    if system_prompt and not self.messages:
      raise DataError("data.system_prompt needs a chat template (data.chat_template)")
    text_ids = tokenizer.encode("a")
    ids = tokenizer.encode("a", add_special_tokens=chat_template == "plain")
    starts = [i for i in range(len(ids)) if ids[i : i + len(text_ids)] == text_ids]
    self.tail = len(ids) - starts[0] - len(text_ids) if starts else 0
    self.stop_id = tokenizer.eos_id
    self.chat_tail = self.tail
    try:
      if self.messages:
        _, after = self._render(self._messages("\x00", "user"), True).split("\x00")
        self.chat_tail = len(tokenizer.encode(after))
      if self.jinja is not None:  # Its end of turn: the first token after an assistant message.
        turn = tokenizer.encode(self._turn("\x01", None).split("\x01", 1)[1].lstrip())
        self.stop_id = turn[0] if turn else tokenizer.eos_id
    except DataError:
      if chat_template:  # Asked for: the template must work. '' : text records need none.
        raise
    if self.chat and self.jinja is None:
      self.stop_id = tokenizer.token_id(_END_OF_TURN[chat_template])
    if self.chat:
      self.tail = self.chat_tail
    self.frame = len(self.prompt(""))

  def prompt(self, value) -> list[int]:
    """A prompt (text or messages) -> ids, as the tokenizer's `apply_chat_template` gives them."""
    if isinstance(value, str) and not self.chat:
      return self.tokenizer.encode(value, add_special_tokens=self.template == "plain")
    return self.tokenizer.encode(self._render(self._messages(value, "user"), True))

  def prompt_tail(self, value) -> int:
    """The tokens after a formatted prompt's own text (kept when the prompt is cut)."""
    return self.tail if isinstance(value, str) else self.chat_tail

  def response(self, value, prompt=None) -> list[int]:
    """A response -> ids of its assistant turn after `prompt` (the record's prompt).

    Text, or messages: the assistant's one message, optionally after the prompt's messages. With
    a chat template (or the tokenizer's own, after a prompt of messages) the turn is the text the
    template adds for it after the prompt with its generation prompt (as TRL cuts a completion);
    else the text itself (plain: + EOS).
    """
    if not isinstance(value, str):
      messages = messages_of(value, last="assistant")
      if len(messages) > 1 and (
        prompt is None or messages[:-1] != messages_of(prompt, last="user")
      ):
        raise DataError("the messages before the assistant's are not the prompt's")
      if not self.messages:
        raise DataError("chat messages need a chat template (data.chat_template)")
      return self.tokenizer.encode_continuation(self._turn(messages[-1]["content"], prompt))
    if self.chat or (self.messages and _is_messages(prompt)):  # A templated prompt's turn.
      return self.tokenizer.encode_continuation(self._turn(value, prompt))
    ids = self.tokenizer.encode(value)
    return ids + [self.stop_id] if self.template == "plain" and self.stop_id is not None else ids

  def conversation(self, value) -> tuple[list[int], list[int]]:
    """A whole conversation -> (ids, assistant mask): the template's text of the messages, with
    1 on the tokens of each assistant turn (its content and end of turn, as `response` gives
    them after the prompt before it) and 0 elsewhere.

    A template with `{% generation %}` blocks marks the assistant text itself (transformers'
    assistant mask). Otherwise assistant turn i is the text between the rendering of
    messages[:i] with the generation prompt and that of messages[:i + 1]; both must start the
    whole conversation's rendering (a template that rewrites earlier turns once later ones
    follow, as Qwen3's drops earlier reasoning, is refused). Each piece is encoded on its own, as
    prompts and responses are.
    """
    if not self.messages:
      raise DataError("chat messages need a chat template (data.chat_template)")
    messages = self._messages(value, "assistant", ends=False)
    if not any(m["role"] == "assistant" for m in messages):
      raise DataError("the conversation has no assistant message")
    full, spans = self._render_spans(messages, False)
    if not (self.jinja is not None and self.jinja.tracks_generation):
      spans = []
      for i, m in enumerate(messages):
        if m["role"] != "assistant":
          continue
        start = self._render(messages[:i], True) if i else ""
        end = self._render(messages[: i + 1], False)
        if not (end.startswith(start) and full.startswith(end)):
          raise DataError(
            f"the chat template renders assistant turn {i} differently once later turns "
            "follow; give each turn its own record (prompt + completion)"
          )
        spans.append((len(start), len(end)))
    ids, mask = [], []
    for piece, scored in _pieces(full, spans):
      encode = self.tokenizer.encode_continuation if ids else self.tokenizer.encode
      piece_ids = encode(piece)
      ids += piece_ids
      mask += [scored] * len(piece_ids)
    return ids, mask

  def _messages(self, value, last: str, ends: bool = True) -> list[dict]:
    if not self.messages:
      raise DataError("chat messages need a chat template (data.chat_template)")
    return messages_of(value, last=last, system_prompt=self.system_prompt, ends=ends)

  def _turn(self, content: str, prompt) -> str:
    """The text the template writes for an assistant message `content` after `prompt` (its
    messages, or one placeholder user message when the prompt is not text or messages)."""
    is_prompt = isinstance(prompt, str) or _is_messages(prompt)
    context = self._messages(prompt if is_prompt else "\x00", "user")
    start = self._render(context, True)
    full = self._render([*context, {"role": "assistant", "content": content}], False)
    if not full.startswith(start):
      raise DataError(
        "the chat template renders the prompt differently once a response follows; "
        "its turns cannot be scored apart"
      )
    return full[len(start) :]

  def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
    return self._render_spans(messages, add_generation_prompt)[0]

  def _render_spans(self, messages, add_generation_prompt) -> tuple[str, list]:
    if self.jinja is not None:
      return self.jinja.render(messages, add_generation_prompt, **self.tokenizer.special_tokens)
    text = render(
      messages,
      self.template,
      bos_token=self.tokenizer.bos_token,
      add_generation_prompt=add_generation_prompt,
    )
    return text, []


def _is_messages(value) -> bool:
  return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)


def _pieces(text: str, spans) -> list[tuple[str, int]]:
  """`text` cut at the spans' ends: (piece, 1 inside a span else 0), empty pieces dropped."""
  pieces, at = [], 0
  for start, end in sorted(spans):
    if start < at:
      raise DataError("the chat template's assistant spans overlap")
    pieces += [(text[at:start], 0), (text[start:end], 1)]
    at = end
  pieces.append((text[at:], 0))
  return [(p, scored) for p, scored in pieces if p]
