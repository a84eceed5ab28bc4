"""A tokenizer's own Jinja chat template, rendered as `transformers.apply_chat_template` renders it.

`find(directory, config)` reads the template a Hugging Face tokenizer directory carries, in
transformers' order: `chat_template.jinja`, else tokenizer_config.json's "chat_template" (a
string, or a list of named templates of which "default" is used). `Template(source)` compiles it in
the environment transformers builds (`_compile_jinja_template`, transformers 5):

- jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols
  extension and the `{% generation %}` ... `{% endgeneration %}` block, which marks assistant text;
- globals raise_exception(message) (a TemplateError), strftime_now(format) (today's date, local
  time), dict and namespace (whose attribute names cannot start with "_"); the tojson filter is
  json.dumps without ASCII escaping.

`Template.render(messages, add_generation_prompt, **special_tokens)` passes what
apply_chat_template passes: messages, tools=None, documents=None, add_generation_prompt and the
tokenizer's named special tokens (bos_token, eos_token, unk_token, sep_token, pad_token,
cls_token, mask_token, where set). It returns the text and the character spans of its
`{% generation %}` blocks (the assistant mask transformers' `return_assistant_tokens_mask` gives).
"""

import datetime
import json
import os

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from align_jax.errors import DataError, MissingFileError

FILE = "chat_template.jinja"
# transformers' named special tokens, passed to the template when the tokenizer has them.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
SPECIAL_TOKENS += ("mask_token",)


def find(directory: str, config: dict) -> str | None:
  """The chat template of a tokenizer directory (and its tokenizer_config.json `config`), or None."""
  path = os.path.join(directory, FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):  # Named templates: [{"name", "template"}, ...].
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
      raise DataError(
        f"{directory}: tokenizer_config.json has chat templates {sorted(named)} but no 'default'"
      )
    template = named["default"]
  return template if isinstance(template, str) and template else None


def read(path: str) -> str:
  """A template file's text (data.chat_template=PATH.jinja)."""
  if not os.path.isfile(path):
    raise MissingFileError(f"data.chat_template {path!r}: no such file")
  with open(path, encoding="utf-8") as f:
    return f.read()


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: renders its body and records its character span
  in the output (transformers' AssistantTracker)."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    call = self.call_method("_track", [jinja2.nodes.ContextReference()])
    return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

  def _track(self, context, caller):
    text = caller()
    blocks, spans = context.get("__blocks__"), context.get("__spans__")
    if blocks is not None:
      start = sum(len(b) for b in blocks)
      spans.append((start, start + len(text)))
    return text


class _Namespace(jinja2.utils.Namespace):
  """Jinja's namespace, refusing attribute names that start with "_" (as transformers')."""

  def __init__(*args, **kwargs):
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


class _Dict:
  """`dict(...)` and `dict.fromkeys(...)` in templates, nothing else of the type."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(
    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals.update(
    raise_exception=_raise_exception,
    strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt),
    dict=_Dict(),
    namespace=_Namespace,
  )
  return env


class Template:
  """A compiled chat template (module docstring)."""

  def __init__(self, source: str, where: str = "chat template"):
    self.source = source
    self.tracks_generation = "generation" in source and "endgeneration" in source
    try:
      self._template = _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise DataError(f"{where}: not a Jinja template (line {e.lineno}: {e.message})") from None

  def render(
    self, messages: list[dict], add_generation_prompt: bool, **special_tokens: str
  ) -> tuple[str, list[tuple[int, int]]]:
    """(the text, the character spans of its {% generation %} blocks) for `messages`."""
    blocks, spans = [], []
    variables = dict(
      messages=[dict(m) for m in messages],
      tools=None,
      documents=None,
      add_generation_prompt=add_generation_prompt,
      **{k: v for k, v in special_tokens.items() if v is not None},
      __blocks__=blocks,
      __spans__=spans,
    )
    try:
      for block in self._template.generate(**variables):
        blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
      raise DataError(f"chat template: {e}") from None
    return "".join(blocks), spans
