"""Prompt-only text sources (TFDS text datasets, JSONL) for on-policy runs, and their exact resume.

TFDS datasets come from `tfds.testing.mock_data` (random text); JSONL files are written here. The
tokenizer is character-level (one id per character, chat-template tokens added), so the expected ids
of every prompt are computed independently of the code under test.
"""

import contextlib
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from align_jax import checkpoint, models, train
from align_jax.data import pipeline, prompts, tokenize
from align_jax.data.preference import DataError
from conftest import load_config, read_jsonl

CHARS = " \nabcdefghijklmnopqrstuvwxyz.'"
SPECIALS = ["<|im_start|>", "<|im_end|>"]
VOCAB = len(CHARS) + len(SPECIALS)
CHATML_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
_TO_GLOBAL = pipeline.to_global


def _ids(text: str) -> list[int]:
  """The character tokenizer's ids, by hand: specials first, then one id per character."""
  out = []
  while text:
    special = next((s for s in SPECIALS if text.startswith(s)), None)
    out.append(len(CHARS) + SPECIALS.index(special) if special else CHARS.index(text[0]))
    text = text[len(special or text[0]) :]
  return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  import tokenizers
  from tokenizers import models as tok_models

  tok = tokenizers.Tokenizer(tok_models.BPE({c: i for i, c in enumerate(CHARS)}, []))
  tok.add_special_tokens(SPECIALS)
  directory = tmp_path_factory.mktemp("chars")
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  return str(directory)


def _expected(text: str, prompt_len: int, tail: int) -> list[int] | None:
  ids = _ids(text)
  if len(ids) < prompt_len:
    return None
  return ids[: prompt_len - tail] + ids[len(ids) - tail :] if len(ids) > prompt_len else ids


@pytest.mark.parametrize(
  "name, field",
  [
    ("xsum", "document"),
    ("cnn_dailymail", "article"),
    ("reddit_tifu/short", "documents"),
    ("imdb_reviews", "text"),
  ],
)
def test_tfds_text_datasets_give_their_prompt_field(tokenizer_dir, name, field):
  text = tokenize.Text(tokenize.load(tokenizer_dir))
  with tfds.testing.mock_data(num_examples=24):
    arrays, counts = prompts.read(f"tfds:{name}/train", prompt_len=6, text=text, vocab_size=VOCAB)
    import tensorflow_datasets.summarization  # noqa: F401  (registers xsum, cnn_dailymail)

    raw = tfds.data_source(name, split="train")
    documents = [raw[i][field] for i in range(len(raw))]
  want = [w for w in (_expected(d, 6, 0) for d in documents) if w is not None]
  assert len(want) > 12  # Most mock documents are longer than 6 characters.
  np.testing.assert_array_equal(arrays["prompt_P"], want)
  np.testing.assert_array_equal(arrays["prompt_index"], np.arange(len(want)))
  assert counts == {
    "records": len(want),
    "skipped_short_prompts": 24 - len(want),
    "truncated_prompts": sum(len(_ids(d)) > 6 for d in documents),
  }


def test_jsonl_text_messages_and_token_ids_with_a_chat_template(tokenizer_dir, tmp_path):
  path = tmp_path / "prompts.jsonl"
  records = [
    {"prompt": "summarise the article. it was a long day."},
    {"messages": [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"}]},
    {"prompt": "ok"},  # Shorter than P with its template: skipped.
    {"prompt": [i % VOCAB for i in range(45)], "chosen": "ignored"},
  ]
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  text = tokenize.Text(tokenize.load(tokenizer_dir), "chatml")
  assert text.tail == len(_ids(CHATML_TAIL)) and text.stop_id == _ids("<|im_end|>")[0]
  P = 40
  arrays, counts = prompts.read(f"jsonl:{path}", prompt_len=P, text=text, vocab_size=VOCAB)
  chatml = [
    f"<|im_start|>user\n{records[0]['prompt']}" + CHATML_TAIL,
    "<|im_start|>system\nbe brief.<|im_end|>\n<|im_start|>user\nhi" + CHATML_TAIL,
  ]
  first, second = _ids(chatml[0]), _ids(chatml[1])
  assert len(first) > P and len(second) == P  # One cut, one exactly P tokens.
  tail = len(_ids(CHATML_TAIL))
  np.testing.assert_array_equal(
    arrays["prompt_P"], [first[: P - tail] + first[-tail:], second, [i % VOCAB for i in range(P)]]
  )
  assert counts == {"records": 3, "truncated_prompts": 2, "skipped_short_prompts": 1}
  # Only the first `limit` records are read.
  arrays, counts = prompts.read(f"jsonl:{path}", prompt_len=P, text=text, limit=1)
  assert counts["records"] == 1 and arrays["prompt_P"].shape == (1, P)


def test_bad_prompt_sources_name_the_record(tokenizer_dir, tmp_path):
  text = tokenize.Text(tokenize.load(tokenizer_dir), "chatml")
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"prompt": "abc"}) + "\n" + json.dumps({"text": "abc"}) + "\n")
  with pytest.raises(DataError, match=f"^{path}:2: record has no field 'prompt' or 'messages'$"):
    prompts.read(str(path), prompt_len=20, text=text)
  path.write_text(
    json.dumps(
      {"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "x"}]}
    )
    + "\n"
  )
  with pytest.raises(DataError, match=":1: field 'messages': the last message is the assistant's"):
    prompts.read(str(path), prompt_len=20, text=text)
  path.write_text(json.dumps({"prompt": "abc"}) + "\n")
  with pytest.raises(DataError, match="is text; set data.tokenizer"):
    prompts.read(str(path), prompt_len=2)
  with pytest.raises(DataError, match=r"none of 1 prompts has data.prompt_len=40 tokens"):
    prompts.read(str(path), prompt_len=40, text=text)
  frame = len(_ids("<|im_start|>user\n" + CHATML_TAIL))
  with pytest.raises(ValueError, match=f"data.prompt_len={frame} must exceed the {frame} tokens"):
    prompts.read(str(path), prompt_len=frame, text=text)


# ---- On-policy runs from text prompts, resumed mid-epoch ----------------------------------------


def _reward_model(workdir) -> str:
  """A reward-model run's workdir (config.json + params) holding a random scalar head."""
  model = dict(models.preset("tiny").to_dict(), vocab_size=VOCAB, n_layers=1, num_scores=1)
  params = models.init_params(models.ModelConfig(**model), jax.random.key(7))
  checkpoint.save_params(os.path.join(workdir, "params"), params)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"objective": "bt_reward", "model": model}, f)
  return str(workdir)


def _config(source, tokenizer, reward_model, steps):
  c = load_config("rloo", "smoke")
  with c.unlocked():
    c.model.vocab_size, c.model.n_layers = VOCAB, 1
    c.init_checkpoint, c.reward_model = "", reward_model
    c.data.source, c.data.tokenizer, c.data.chat_template = source, tokenizer, "chatml"
    c.data.prompt_len, c.data.batch_size = 24, 8
    c.mesh.shape = (1, 1, 1)
    c.total_steps, c.checkpoint_every, c.log_every = steps, 3, 1
  return c


def _run_recording(monkeypatch, cfg, workdir):
  """Runs cfg; returns the final state and every local batch the loop read."""
  seen = []
  monkeypatch.setattr(pipeline, "to_global", lambda b, mesh: seen.append(b) or _TO_GLOBAL(b, mesh))
  return train.run(cfg, str(workdir)).state, seen


@pytest.mark.parametrize("kind", ["tfds", "jsonl"])
def test_on_policy_run_on_text_prompts_resumes_at_the_same_record(
  tokenizer_dir, tmp_path, monkeypatch, kind
):
  """RLOO on text prompts through the CLI's train.run: stopped after 3 steps (mid-epoch: 20
  prompts, 8 per step) and resumed, it reads exactly the records and ids of an uninterrupted run
  and ends in the same state."""
  if kind == "jsonl":
    source = str(tmp_path / "prompts.jsonl")
    rng = np.random.default_rng(0)
    with open(source, "w") as f:
      for i in range(20):
        words = rng.choice(["the", "cat", "sat", "on", "a", "mat", "today"], size=8 + i % 5)
        f.write(json.dumps({"prompt": f"{i} " + " ".join(words)}) + "\n")
    context = contextlib.nullcontext()
  else:
    source, context = "tfds:xsum/train", tfds.testing.mock_data(num_examples=20)
  rm = _reward_model(tmp_path / "rm")
  with context:
    straight, seen_straight = _run_recording(
      monkeypatch, _config(source, tokenizer_dir, rm, 6), tmp_path / "straight"
    )
    _, seen_first = _run_recording(
      monkeypatch, _config(source, tokenizer_dir, rm, 3), tmp_path / "resumed"
    )
    resumed, seen_after = _run_recording(
      monkeypatch, _config(source, tokenizer_dir, rm, 6), tmp_path / "resumed"
    )
  assert len(seen_straight) == 6 and len(seen_first) == 3 and len(seen_after) == 3
  for want, got in zip(seen_straight, seen_first + seen_after):
    np.testing.assert_array_equal(got["prompt_index"], want["prompt_index"])
    np.testing.assert_array_equal(got["prompt_P"], want["prompt_P"])
  # The first epoch is a permutation of the prompts; step 3 ends inside the second.
  indices = np.concatenate([b["prompt_index"] for b in seen_straight]).tolist()
  n = max(indices) + 1
  assert 8 < n <= 20 and 24 % n and sorted(indices[:n]) == list(range(n))
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_on_policy_validation_on_held_out_prompts(tokenizer_dir, tmp_path):
  """RLOO with data.eval_fraction: a quarter of the prompts is never trained on and is evaluated at
  the start, every eval_every steps and at the end. At the start the policy is the reference, so
  the KL estimate is exactly 0; lengths count the generated tokens (≤ max_new_tokens)."""
  source = tmp_path / "prompts.jsonl"
  rng = np.random.default_rng(0)
  source.write_text(
    "".join(
      json.dumps({"prompt": f"{i} " + " ".join(rng.choice(["the", "cat", "sat", "mat"], size=9))})
      + "\n"
      for i in range(20)
    )
  )
  cfg = _config(str(source), tokenizer_dir, _reward_model(tmp_path / "rm"), 4)
  cfg.data.eval_fraction, cfg.eval_every, cfg.optim.lr = 0.25, 2, 1e-2
  result = train.run(cfg, str(tmp_path / "run"))
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  names = {"eval/reward", "eval/kl", "eval/entropy", "eval/completions/mean_length"}
  assert set(summary["initial"]) == set(summary["final"]) == names
  assert summary["data/records"] == 15 and summary["data/eval_records"] == 5
  assert summary["initial"]["eval/kl"] == 0.0 and summary["final"]["eval/kl"] != 0.0
  for s in (summary["initial"], summary["final"]):
    assert s["eval/entropy"] > 0 and 1 <= s["eval/completions/mean_length"] <= 4
  evaluated = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/kl" in r]
  assert [r["step"] for r in evaluated] == [2]  # Start and end are in summary.json.
  assert result.summary["final"] == summary["final"]
