"""Token ids and chat-template prompts equal those of Hugging Face `transformers` exactly.

The test builds its tokenizers (nothing is downloaded): a byte-level BPE tokenizer.json trained with
`tokenizers`, and two SentencePiece tokenizer.model files trained with `SentencePieceTrainer`, laid
out like Llama 2 (dummy prefix, <s>/</s>) and Gemma (no dummy prefix, <bos>/<eos>, turn tokens).
The Jinja templates below are the families' published chat templates (Qwen2.5's without its
tool-calling branches).
"""

import json
import os
import random

import pytest

from align_jax.data import tokenize

os.environ["HF_HUB_OFFLINE"] = "1"
import sentencepiece as spm  # noqa: E402
import transformers  # noqa: E402  The `parity` extra.

LLAMA3 = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
  "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
  " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
  "{{ content }}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA2 = (
  "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
  "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
  "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
  "user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = "
  "'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + "
  "'\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt"
  " %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
  "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2 = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. ' +
        'You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
           or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

CORPUS = [
  "The quick brown fox jumps over the lazy dog. Summarise the article below in one sentence.",
  "Ünïcödé text, naïve café, 漢字とかな, emoji ✓ and digits 1234567890 3.14159.",
  "Policy gradients, best-of-n distillation and preference optimisation align language models.",
  "  Leading spaces,\ttabs,\n\nnew lines\nand trailing spaces   ",
  "def f(x):\n    return x ** 2  # a comment\n",
]
SAMPLES = CORPUS + [
  "",
  " ",
  "Hello world!",
  " leading space",
  "▁already a metaspace",
  "trailing\n",
  "a<s>b</s>c <unk> <bos>x<eos> <start_of_turn>user\nhi<end_of_turn>",
  "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
  "<|im_start|>system\nBe brief.<|im_end|>\n",
  "unseen: ЖЯЮ ξψω ﬁ",
]
LLAMA3_SPECIALS = [
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eot_id|>",
  "<|im_start|>",
  "<|im_end|>",
]


def _fuzz(n: int, seed: int) -> list[str]:
  """Random strings of words, whitespace runs and special-token strings."""
  words = [
    "Hello",
    "world",
    " ",
    "  ",
    "\n",
    "\n\n",
    "x",
    "<s>",
    "</s>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|im_start|>",
    "▁",
    "ü",
    "漢",
    "12345",
    "\t",
    ".",
    "[INST]",
    "fox",
    " the",
  ]
  rng = random.Random(seed)
  return ["".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(n)]


def _write_config(directory, **config):
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
  """Directories: a byte-level BPE tokenizer.json (Llama 3 layout: BOS added by its
  post-processor), a Llama-2-like and a Gemma-like SentencePiece tokenizer.model."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  root = tmp_path_factory.mktemp("tokenizers")
  corpus = str(root / "corpus.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(CORPUS * 20))

  bpe = root / "bpe"
  bpe.mkdir()
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train(
    [corpus],
    trainers.BpeTrainer(
      vocab_size=400,
      special_tokens=LLAMA3_SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  tok.post_processor = processors.TemplateProcessing(
    single="<|begin_of_text|> $A",
    pair="<|begin_of_text|> $A <|begin_of_text|> $B",
    special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
  )
  tok.save(str(bpe / "tokenizer.json"))
  # add_eos_token is ignored by transformers (and here) when a tokenizer.json is present.
  _write_config(
    bpe,
    tokenizer_class="PreTrainedTokenizerFast",
    bos_token="<|begin_of_text|>",
    eos_token="<|end_of_text|>",
    add_eos_token=True,
  )

  common = dict(
    input=corpus,
    vocab_size=600,
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  for name, legacy in (("sp_llama", False), ("sp_llama_legacy", True)):
    directory = root / name
    directory.mkdir()
    if not legacy:
      spm.SentencePieceTrainer.train(
        model_prefix=str(directory / "tokenizer"),
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        **common,
      )
    else:
      (directory / "tokenizer.model").write_bytes((root / "sp_llama/tokenizer.model").read_bytes())
    _write_config(
      directory,
      tokenizer_class="LlamaTokenizer",
      bos_token="<s>",
      eos_token="</s>",
      unk_token="<unk>",
      add_bos_token=True,
      add_eos_token=legacy,
      legacy=legacy,
    )
  gemma = root / "sp_gemma"
  gemma.mkdir()
  spm.SentencePieceTrainer.train(
    model_prefix=str(gemma / "tokenizer"),
    add_dummy_prefix=False,
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    pad_piece="<pad>",
    eos_piece="<eos>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
    **common,
  )
  _write_config(
    gemma,
    tokenizer_class="GemmaTokenizer",
    bos_token="<bos>",
    eos_token="<eos>",
    unk_token="<unk>",
    pad_token="<pad>",
    mask_token="<mask>",
    additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    add_bos_token=True,
    add_eos_token=False,
  )
  return root


@pytest.mark.parametrize("name", ["bpe", "sp_llama", "sp_llama_legacy", "sp_gemma"])
def test_encode_equals_transformers(tokenizers_dir, name):
  directory = str(tokenizers_dir / name)
  ours = tokenize.load(directory)
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
  for text in SAMPLES + _fuzz(400, seed=hash(name) % 1000):
    for special in (False, True):
      assert ours.encode(text, special) == hf(text, add_special_tokens=special)["input_ids"], (
        text,
        special,
      )
  # BOS/EOS as configured: the BPE's post-processor adds BOS; Llama adds BOS (and EOS when
  # add_eos_token); Gemma adds BOS.
  added = {
    "bpe": ([ours.bos_id], []),
    "sp_llama": ([1], []),
    "sp_llama_legacy": ([1], [2]),
    "sp_gemma": ([2], []),
  }[name]
  plain = ours.encode("Hello world")
  assert ours.encode("Hello world", True) == added[0] + plain + added[1]
  if name == "bpe":  # A bare tokenizer.json too, as PreTrainedTokenizerFast reads it.
    file = str(tokenizers_dir / name / "tokenizer.json")
    bare = transformers.PreTrainedTokenizerFast(tokenizer_file=file)
    assert tokenize.load(file).encode(SAMPLES[1], True) == bare(SAMPLES[1])["input_ids"]


def _hf_chat(directory, template):
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  hf.chat_template = template

  def apply(messages, add_generation_prompt):
    return hf.apply_chat_template(
      messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )

  return apply


CONVERSATIONS = [
  [{"role": "user", "content": "  Summarise: the quick brown fox.\n"}],
  [
    {"role": "user", "content": "Hello world!"},
    {"role": "assistant", "content": "Hi there. "},
    {"role": "user", "content": "Ünïcödé 漢字 12345"},
  ],
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}] + CONVERSATIONS[1]


@pytest.mark.parametrize(
  "name, template, jinja, system",
  [
    ("bpe", "llama3", LLAMA3, True),
    ("bpe", "chatml", CHATML, True),
    ("bpe", "qwen2", QWEN2, True),
    ("bpe", "qwen2.5", QWEN25, True),
    ("sp_gemma", "gemma", GEMMA2, False),
    ("sp_gemma", "gemma", GEMMA3, True),
  ],
)
def test_chat_templates_equal_apply_chat_template(tokenizers_dir, name, template, jinja, system):
  directory = str(tokenizers_dir / name)
  text = tokenize.Text(tokenize.load(directory), template)
  hf = _hf_chat(directory, jinja)
  for messages in CONVERSATIONS + ([WITH_SYSTEM] if system else []):
    prompt = text.prompt(messages)
    assert prompt == hf(messages, True)
    # Prompt + response: the whole conversation as the template writes it.
    reply = "  A short answer, with 3 numbers: 1 2 3.\n"
    full = hf(messages + [{"role": "assistant", "content": reply}], False)
    assert prompt + text.response(reply) == full
    assert (
      prompt + text.response(messages + [{"role": "assistant", "content": reply}], prompt=messages)
      == full
    )
  # Text is one user message; the tail (end of turn + assistant header) ends every prompt.
  user = "Summarise: the quick brown fox."
  ids = text.prompt(user)
  assert ids == hf([{"role": "user", "content": user}], True)
  assert ids[-text.tail :] == text.prompt("x")[-text.tail :]
  # The end-of-turn token stops a response (then "\n", except in Llama 3).
  assert text.response("ok")[-1 if template == "llama3" else -2] == text.stop_id


def test_system_prompt_is_the_first_message(tokenizers_dir):
  directory = str(tokenizers_dir / "bpe")
  text = tokenize.Text(tokenize.load(directory), "qwen2.5", system_prompt="Be brief.")
  assert text.prompt("Hi") == _hf_chat(directory, QWEN25)(
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True
  )


def test_plain_template_is_the_tokenizer_call_and_responses_end_with_eos(tokenizers_dir):
  for name in ("bpe", "sp_llama", "sp_llama_legacy"):
    directory = str(tokenizers_dir / name)
    tok = tokenize.load(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    text = tokenize.Text(tok, "plain")
    assert text.prompt(CORPUS[0]) == hf(CORPUS[0])["input_ids"]
    assert text.response(CORPUS[2]) == tok.encode(CORPUS[2]) + [hf.eos_token_id]
    assert text.tail == (1 if name == "sp_llama_legacy" else 0)  # EOS after the text.
    raw = tokenize.Text(tok)  # No template: text as it is.
    assert raw.prompt(CORPUS[0]) == hf(CORPUS[0], add_special_tokens=False)["input_ids"]
    assert raw.response(CORPUS[2]) == tok.encode(CORPUS[2])


def test_bad_tokenizers_and_templates(tokenizers_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    tokenize.load(str(tmp_path / "absent.json"))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    tokenize.load(str(tmp_path))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not a tokenizer.json"):
    tokenize.load(str(tmp_path / "bad.json"))
  (tmp_path / "tokenizer.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenize.load(str(tmp_path / "tokenizer.model"))
  gemma = tokenize.load(str(tokenizers_dir / "sp_gemma"))
  with pytest.raises(ValueError, match="token '<|eot_id|>' is not in its vocabulary"):
    tokenize.Text(gemma, "llama3")
  with pytest.raises(ValueError, match="data.chat_template 'llama2' is unknown"):
    tokenize.Text(gemma, "llama2")
  with pytest.raises(ValueError, match="data.system_prompt needs a chat template"):
    tokenize.Text(gemma, "plain", system_prompt="Be brief.")
  text = tokenize.Text(gemma, "gemma")
  with pytest.raises(ValueError, match="last message is the assistant's, not the user's"):
    text.prompt([{"role": "assistant", "content": "hi"}])
  with pytest.raises(ValueError, match="message 0 is not"):
    text.prompt([{"role": "bot", "content": "hi"}])
  with pytest.raises(ValueError, match="roles must alternate"):
    text.prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
  with pytest.raises(ValueError, match="not the prompt's"):
    text.response(
      [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], prompt="c"
    )
  with pytest.raises(ValueError, match="chat messages need a chat template"):
    tokenize.Text(gemma).prompt([{"role": "user", "content": "a"}])


# ---- The tokenizer's own Jinja template --------------------------------------------------------

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")
# template -> (tokenizer, takes a system message, end-of-turn token)
OWN_TEMPLATES = {
  "llama3.2": ("bpe", True, "<|eot_id|>"),
  "llama3.3": ("bpe", True, "<|eot_id|>"),
  "gemma2": ("sp_gemma", False, "<end_of_turn>"),
  "gemma3": ("sp_gemma", True, "<end_of_turn>"),
  "qwen2.5": ("bpe", True, "<|im_end|>"),
  "qwen3": ("bpe", True, "<|im_end|>"),
  "mistral_nemo": ("sp_llama", True, "</s>"),
}


def _template_source(name):
  with open(os.path.join(TEMPLATE_DIR, f"{name}.jinja")) as f:
    return f.read()


def _with_template(tokenizers_dir, tmp_path, tokenizer, name, as_file):
  """A copy of a tokenizer directory carrying template `name`: in tokenizer_config.json, or as
  chat_template.jinja (which transformers prefers)."""
  import shutil

  directory = tmp_path / f"{tokenizer}_{name}"
  shutil.copytree(tokenizers_dir / tokenizer, directory)
  if as_file:
    (directory / "chat_template.jinja").write_text(_template_source(name))
  else:
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(
      json.dumps({**config, "chat_template": _template_source(name)})
    )
  return str(directory)


def _apply(hf, messages, add_generation_prompt):
  return hf.apply_chat_template(
    messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
  )


@pytest.mark.parametrize("name", OWN_TEMPLATES)
def test_own_templates_equal_apply_chat_template_with_assistant_masks(
  tokenizers_dir, tmp_path, name
):
  """The published templates of Llama 3.2 / 3.3, Gemma 2 / 3, Qwen2.5 / 3 and Mistral Nemo, read
  from the tokenizer directory: prompts, responses and whole conversations give transformers' ids;
  each conversation's assistant mask covers exactly the tokens between the prompt before each
  assistant turn (with its generation prompt) and the end of that turn."""
  tokenizer, system, end_of_turn = OWN_TEMPLATES[name]
  directory = _with_template(tokenizers_dir, tmp_path, tokenizer, name, as_file=name < "m")
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  ours = tokenize.load(directory)
  text = tokenize.Text(ours)  # '' : the tokenizer's own template for messages.
  assert text.jinja is not None and text.jinja.source == hf.chat_template
  assert text.stop_id == ours.token_id(end_of_turn)
  reply = "  A short answer, with 3 numbers: 1 2 3.\n"
  conversations = CONVERSATIONS + ([WITH_SYSTEM] if system else [])
  for messages in conversations:
    prompt = text.prompt(messages)
    assert prompt == _apply(hf, messages, True)
    done = [*messages, {"role": "assistant", "content": reply}]
    full = _apply(hf, done, False)
    refused = name == "mistral_nemo" and messages[0]["role"] == "system"  # It moves the system.
    if refused:
      with pytest.raises(ValueError, match="renders the prompt differently"):
        text.response(reply, prompt=messages)
      continue
    assert prompt + text.response(reply, prompt=messages) == full
    assert prompt + text.response(done, prompt=messages) == full
    turns = [i for i, m in enumerate(done) if m["role"] == "assistant"]
    if name == "qwen3" and len(turns) > 1:  # Earlier turns lose their (empty) think block.
      with pytest.raises(ValueError, match=r"renders assistant turn \d differently"):
        text.conversation(done)
      continue
    ids, mask = text.conversation(done)
    assert ids == full
    want = [0] * len(full)
    for i in turns:
      start, end = len(_apply(hf, done[:i], True)), len(_apply(hf, done[: i + 1], False))
      want[start:end] = [1] * (end - start)
    assert mask == want and sum(mask) > 0
  # "tokenizer": text prompts are one user message too.
  as_user = tokenize.Text(ours, "tokenizer")
  assert as_user.prompt("Hello world!") == _apply(
    hf, [{"role": "user", "content": "Hello world!"}], True
  )
  if name != "mistral_nemo":  # Here [/INST] is no control token: it merges with the text before.
    assert as_user.prompt("Hello world!")[-as_user.tail :] == as_user.prompt("x")[-as_user.tail :]


def test_generation_blocks_give_transformers_assistant_masks(tokenizers_dir, tmp_path):
  """A template with {% generation %} blocks (TRL's assistant-only loss) marks the assistant text
  itself: the mask equals transformers' return_assistant_tokens_mask."""
  directory = _with_template(tokenizers_dir, tmp_path, "bpe", "qwen2.5_generation_tags", True)
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  text = tokenize.Text(tokenize.load(directory), "tokenizer")
  assert text.jinja.tracks_generation
  done = WITH_SYSTEM + [{"role": "assistant", "content": "Fine. "}]
  ids, mask = text.conversation(done)
  out = hf.apply_chat_template(
    done, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
  )
  assert ids == out["input_ids"] and mask == out["assistant_masks"] and 0 < sum(mask) < len(mask)
  # The {% generation %} span stops before the turn's newline, the prefix rule would not.
  assert text.tokenizer.encode("\n") == ids[-1:] and mask[-1] == 0 and mask[-2] == 1


def test_own_template_errors(tokenizers_dir, tmp_path):
  bare = tokenize.load(str(tokenizers_dir / "bpe"))
  with pytest.raises(ValueError, match="has no chat template"):
    tokenize.Text(bare, "tokenizer")
  with pytest.raises(FileNotFoundError, match="no such file"):
    tokenize.Text(bare, str(tmp_path / "absent.jinja"))
  (tmp_path / "bad.jinja").write_text("{% for %}")
  with pytest.raises(ValueError, match="not a Jinja template"):
    tokenize.Text(bare, str(tmp_path / "bad.jinja"))
  text = tokenize.Text(bare, os.path.join(TEMPLATE_DIR, "gemma2.jinja"))  # A file of one's own.
  with pytest.raises(ValueError, match="chat template: System role not supported"):
    text.prompt([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])
  with pytest.raises(ValueError, match="chat messages need a chat template"):
    tokenize.Text(bare).prompt([{"role": "user", "content": "a"}])
  # A template that cannot render a plain user turn: text records ('') still read, messages fail
  # on use, and asking for it ('tokenizer') fails at once.
  directory = _with_template(tokenizers_dir, tmp_path, "bpe", "gemma2", as_file=True)
  (tmp_path / "bpe_gemma2" / "chat_template.jinja").write_text("{{ raise_exception('no') }}")
  raw = tokenize.Text(tokenize.load(directory))
  assert raw.prompt("Hello") == bare.encode("Hello") and raw.stop_id == bare.eos_id
  with pytest.raises(ValueError, match="chat template: no"):
    raw.prompt([{"role": "user", "content": "a"}])
  with pytest.raises(ValueError, match="chat template: no"):
    tokenize.Text(tokenize.load(directory), "tokenizer")
