"""TRL's dataset types read as TRL reads them: standard and conversational preference records with
an explicit or implicit prompt, unpaired preference (KTO) records or pairs unpaired, prompt-only,
and SFT's language-modeling and prompt-completion records (align_jax/data/corpus.py).

The tokenizer is character-level (one id per character, ChatML's turn tokens added), so the
expected ids of every record are written out by hand, independently of the code under test.
"""

import json

import numpy as np
import pytest

from align_jax.data import corpus, preference, prompts, tokenize

CHARS = " \nabcdefghijklmnopqrstuvwxyz.'?"
SPECIALS = ["<|im_start|>", "<|im_end|>"]
VOCAB = len(CHARS) + len(SPECIALS)


def _ids(text: str) -> list[int]:
  """The character tokenizer's ids, by hand: specials first, then one id per character."""
  out = []
  while text:
    special = next((s for s in SPECIALS if text.startswith(s)), None)
    out.append(len(CHARS) + SPECIALS.index(special) if special else CHARS.index(text[0]))
    text = text[len(special or text[0]) :]
  return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  import tokenizers
  from tokenizers import models as tok_models

  tok = tokenizers.Tokenizer(tok_models.BPE({c: i for i, c in enumerate(CHARS)}, []))
  tok.add_special_tokens(SPECIALS)
  directory = tmp_path_factory.mktemp("chars")
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  return tokenize.load(str(directory))


def _jsonl(tmp_path, records) -> str:
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  return f"jsonl:{path}"


def _rows(arrays) -> list[list[list[int]]]:
  """Each record's K (prompt + response) rows without padding, and each row's scored ids."""
  out = []
  for tokens_KxL, mask_KxL in zip(arrays["tokens_KxL"], arrays["loss_mask_KxL"]):
    ends = [int(np.nonzero(m)[0].max()) + 1 for m in mask_KxL]
    out.append([(t[:e].tolist(), t[m > 0].tolist()) for t, m, e in zip(tokens_KxL, mask_KxL, ends)])
  return out


def _user(content):
  return {"role": "user", "content": content}


def _assistant(content):
  return {"role": "assistant", "content": content}


def _chatml(*turns, generation_prompt=False) -> str:
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
  return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def test_standard_preference_explicit_and_implicit_prompt(tmp_path, tokenizer):
  """TRL's standard preference examples: the implicit prompt "the sky is" is the shared start,
  the space before the first difference going to the responses."""
  text = tokenize.Text(tokenizer)
  explicit = {"prompt": "the sky is", "chosen": " blue.", "rejected": " green."}
  implicit = {"chosen": "the sky is blue.", "rejected": "the sky is green."}
  arrays, counts = preference.read(_jsonl(tmp_path, [explicit, implicit]), "pairs", text=text)
  want = [(_ids("the sky is blue."), _ids(" blue.")), (_ids("the sky is green."), _ids(" green."))]
  assert _rows(arrays) == [want, want] and counts["records"] == 2
  assert preference.implicit_prompt(implicit) == {**implicit, **explicit}
  # Token ids too: the shared ids are the prompt.
  arrays, _ = preference.read(
    _jsonl(tmp_path, [{"chosen": [1, 2, 3], "rejected": [1, 2, 4, 5]}]), "pairs"
  )
  assert _rows(arrays) == [[([1, 2, 3], [3]), ([1, 2, 4, 5], [4, 5])]]


def test_conversational_preference_explicit_implicit_and_mixed_prompt(tmp_path, tokenizer):
  """Messages: the prompt's turns with the generation prompt, each response the assistant's turn;
  an implicit prompt is the shared messages, and a text prompt beside conversational responses
  is replaced by them (TRL's `maybe_extract_prompt`)."""
  text = tokenize.Text(tokenizer, "chatml")
  question = [_user("what color is the sky?")]
  records = [
    {"prompt": question, "chosen": [_assistant("it is blue.")], "rejected": [_assistant("green.")]},
    {
      "chosen": question + [_assistant("it is blue.")],
      "rejected": question + [_assistant("green.")],
    },
    {
      "prompt": "ignored",
      "chosen": question + [_assistant("it is blue.")],
      "rejected": question + [_assistant("green.")],
    },
  ]
  arrays, counts = preference.read(_jsonl(tmp_path, records), "pairs", text=text, vocab_size=VOCAB)
  prompt = _chatml(*question, generation_prompt=True)
  want = [
    (_ids(prompt + "it is blue.<|im_end|>\n"), _ids("it is blue.<|im_end|>\n")),
    (_ids(prompt + "green.<|im_end|>\n"), _ids("green.<|im_end|>\n")),
  ]
  assert _rows(arrays) == [want] * 3 and counts["records"] == 3


def test_unpaired_preference_and_pairs_read_as_unpaired(tmp_path, tokenizer):
  """KTO's records: prompt, completion, label; a pair gives a desirable chosen record and an
  undesirable rejected one, every rejected one after the chosen ones (TRL's unpairing)."""
  text = tokenize.Text(tokenizer)
  records = [
    {"prompt": "the sky is", "completion": " blue.", "label": True},
    {"chosen": "grass is green.", "rejected": "grass is red."},
    {"prompt": "the sea is", "completion": " dry.", "label": False},
    {"prompt": "snow is", "chosen": " white.", "rejected": " black."},
  ]
  arrays, counts = preference.read(_jsonl(tmp_path, records), "binary", text=text)
  want = [
    ("the sky is", " blue.", 1),
    ("grass is", " green.", 1),
    ("the sea is", " dry.", 0),
    ("snow is", " white.", 1),
    ("grass is", " red.", 0),
    ("snow is", " black.", 0),
  ]
  assert _rows(arrays) == [[(_ids(p + c), _ids(c))] for p, c, _ in want]
  np.testing.assert_array_equal(arrays["desirable"], [d for _, _, d in want])
  np.testing.assert_array_equal(arrays["score_K"][:, 0], [d for _, _, d in want])
  assert counts["records"] == 6
  with pytest.raises(preference.DataError, match=r"data.jsonl:1: record has no field 'rejected'"):
    preference.read(_jsonl(tmp_path, [{"prompt": "a", "chosen": "b"}]), "binary", text=text)


def test_prompt_only_records_and_a_preference_dataset_as_prompts(tmp_path, tokenizer):
  text = tokenize.Text(tokenizer, "chatml")
  records = [
    {"prompt": [_user("what color is the sky?")]},
    {"prompt": "what color is the sky?"},
    {
      "chosen": [_user("what color is the sky?"), _assistant("blue.")],
      "rejected": [_user("what color is the sky?"), _assistant("red.")],
    },
  ]
  want = _ids(_chatml(_user("what color is the sky?"), generation_prompt=True))
  arrays, counts = prompts.read(_jsonl(tmp_path, records), prompt_len=len(want), text=text)
  np.testing.assert_array_equal(arrays["prompt_P"], [want] * 3)
  assert counts["records"] == 3


def test_sft_records_text_messages_prompt_completion_and_ids(tmp_path, tokenizer):
  """{"text"}: every token scored, EOS appended; {"messages"}: the template's text, the assistant
  turns scored; {"prompt", "completion"}: the completion scored; ids as they are."""
  text = tokenize.Text(tokenizer, "chatml")
  chat = [_user("hi"), _assistant("hello."), _user("sky?"), _assistant("blue.")]
  records = [
    {"text": "the sky is blue."},
    {"text": "done.<|im_end|>"},  # Already ends with EOS.
    {"messages": chat},
    {"prompt": [_user("sky?")], "completion": [_assistant("blue.")]},
    {"prompt": "the sky is", "completion": " blue."},
    {"text": [3, 4, 5]},
  ]
  arrays, counts = corpus.read(_jsonl(tmp_path, records), text=text, vocab_size=VOCAB)
  eos = _ids("<|im_end|>")
  turn = lambda s: _ids(s + "<|im_end|>\n")
  want = [
    (_ids("the sky is blue.") + eos, _ids("the sky is blue.") + eos),
    (_ids("done.") + eos, _ids("done.") + eos),
    (_ids(_chatml(*chat)), turn("hello.") + turn("blue.")),
    (_ids(_chatml(_user("sky?"), _assistant("blue."))), turn("blue.")),
    (_ids(_chatml(_user("the sky is"), _assistant(" blue."))), turn(" blue.")),  # Text: a turn.
    ([3, 4, 5], [3, 4, 5]),
  ]
  got = [
    (t[0][: int(np.nonzero(m[0])[0].max()) + 1].tolist(), t[0][m[0] > 0].tolist())
    for t, m in zip(arrays["tokens_KxL"], arrays["loss_mask_KxL"])
  ]
  assert got == want
  assert arrays["tokens_KxL"].shape == (6, 1, max(len(ids) for ids, _ in want))
  assert counts == {"records": 6, "truncated": 0, "skipped_unscored": 0}
  # The scored tokens of a conversation are those of its prompt-completion records.
  prompt = text.prompt(chat[:3])
  assert got[2][0][: len(prompt)] == prompt and got[2][0][len(prompt) :] == text.response(chat[3:])


def test_sft_truncation_skips_and_errors(tmp_path, tokenizer):
  text = tokenize.Text(tokenizer, "chatml")
  long_prompt = {"prompt": "a long question?", "completion": " yes."}
  records = [{"text": "abcdef"}, long_prompt, {"text": "ab"}]
  arrays, counts = corpus.read(_jsonl(tmp_path, records), text=text, max_len=5)
  np.testing.assert_array_equal(
    arrays["tokens_KxL"][:, 0], [_ids("abcde"), _ids("ab") + _ids("<|im_end|>") + [0, 0]]
  )
  assert counts == {"records": 2, "truncated": 2, "skipped_unscored": 1}
  for record, message in [
    ({"messages": [_user("hi")]}, "field 'messages': the conversation has no assistant message"),
    ({"messages": "hi"}, "field 'messages' must be a list of chat messages"),
    ({"answer": "hi"}, "record has none of 'text', 'messages', 'prompt' and 'completion'"),
    ({"text": "hi", "x": 1}, None),
  ]:
    source = _jsonl(tmp_path, [record])
    if message is None:
      with pytest.raises(preference.DataError, match="is text; set data.tokenizer"):
        corpus.read(source)
      continue
    with pytest.raises(preference.DataError, match=f"data.jsonl:1: {message}"):
      corpus.read(source, text=text)
  plain = tokenize.Text(tokenizer)
  with pytest.raises(preference.DataError, match="messages need a chat template"):
    corpus.read(_jsonl(tmp_path, [{"messages": [_user("a"), _assistant("b")]}]), text=plain)
