"""The practitioner's pipeline on tiny models: a tokenizer directory, a Hugging Face checkpoint and
JSONL files -> SFT -> export -> DPO -> export -> transformers generates what align_jax generates.

The tokenizer is a byte-level BPE with ChatML's turn tokens; the model a random tiny Qwen2 whose
vocabulary is larger than the tokenizer's. Nothing is downloaded; both runs go through `train.run`
and `export.export` as the command line calls them.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from align_jax import export, logps, models, sampling, train  # noqa: E402
from align_jax.data import preference, tokenize  # noqa: E402
from align_jax.models import hf  # noqa: E402
from conftest import load_config, read_jsonl  # noqa: E402

import torch  # noqa: E402  The parity extra.
import transformers  # noqa: E402

SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
  "{% endif %}"
)
QUESTIONS = ["what color is the sky?", "is snow cold?", "where is the sea?", "who are you?"]


def _user(content):
  return {"role": "user", "content": content}


def _assistant(content):
  return {"role": "assistant", "content": content}


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return f"jsonl:{path}"


def _hf_dir(root):
  """A tiny random Qwen2 (vocabulary 8 above the tokenizer's) with its tokenizer beside it: a
  byte-level BPE trained on the questions and answers, as Qwen's (transformers reads it as a
  Qwen2Tokenizer)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = QUESTIONS + ["answer 0.", "answer 1.", "yes.", "no idea.", "user", "assistant"]
  tok.train_from_iterator(
    texts * 4,
    trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  directory = root / "base"
  config = transformers.Qwen2Config(
    vocab_size=tok.get_vocab_size() + 8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    bos_token_id=None,
    eos_token_id=tok.token_to_id("<|im_end|>"),
  )
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.save_pretrained(directory)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML,
      }
    )
  )
  return directory, tok.get_vocab_size() + 8


def _configure(cfg, init, source, batch_size=8, steps=4):
  cfg.init_checkpoint = str(init)
  cfg.data.source = source
  cfg.data.tokenizer = str(init)  # Messages go through its own template (tokenizer_config.json).
  cfg.data.batch_size = batch_size
  cfg.total_steps = steps
  cfg.log_every, cfg.checkpoint_every = 1, steps
  cfg.mesh.shape = (1, 1, 1)
  cfg.optim.lr = 1e-2


def test_sft_then_dpo_from_files_exports_what_transformers_generates(tmp_path):
  base, vocab_size = _hf_dir(tmp_path)
  sft_data = _write_jsonl(
    tmp_path / "sft.jsonl",
    [{"messages": [_user(q), _assistant(f"answer {i}.")]} for i, q in enumerate(QUESTIONS * 4)],
  )
  pairs = _write_jsonl(
    tmp_path / "pairs.jsonl",
    [
      {
        "chosen": [_user(q), _assistant("yes.")],  # Conversational, implicit prompt.
        "rejected": [_user(q), _assistant("no idea.")],
      }
      for q in QUESTIONS * 4
    ],
  )

  held_pairs = _write_jsonl(
    tmp_path / "held.jsonl",
    [
      {"prompt": [_user(q)], "chosen": [_assistant("yes.")], "rejected": [_assistant("no.")]}
      for q in QUESTIONS
    ],
  )

  sft = load_config("sft", "smoke")
  _configure(sft, base, sft_data)
  sft.data.eval_fraction = 0.25  # 4 of the 16 conversations are held out.
  sft_result = train.run(sft, str(tmp_path / "sft"))
  initial, final = sft_result.summary["initial"], sft_result.summary["final"]
  assert final["eval/loss"] < initial["eval/loss"]
  assert final["eval/objective/nll_per_token"] == final["eval/loss"]
  model_cfg = json.load(open(tmp_path / "sft" / "config.json"))["model"]
  assert (model_cfg["family"], model_cfg["vocab_size"], model_cfg["d_model"]) == (
    "qwen2",
    vocab_size,
    32,
  )
  assert (sft_result.summary["data/records"], sft_result.summary["data/eval_records"]) == (12, 4)
  losses = [r["loss"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl") if "loss" in r]
  assert losses[-1] < losses[0]
  export.export(str(tmp_path / "sft"), str(tmp_path / "sft_hf"))

  dpo = load_config("dpo", "smoke")
  _configure(dpo, tmp_path / "sft_hf", pairs)  # The tokenizer travelled with the export.
  dpo.data.eval_source = held_pairs
  dpo_result = train.run(dpo, str(tmp_path / "dpo"))
  # Validation with TRL's names: at the start π = π_ref, so every implicit reward is 0; at the
  # end they are β·log(π/π_ref) of the held-out pairs, computed here independently.
  initial, final = dpo_result.summary["initial"], dpo_result.summary["final"]
  assert initial["eval/loss"] == pytest.approx(np.log(2.0), abs=1e-6)
  for k in ("chosen", "rejected", "margins", "accuracies"):
    assert initial[f"eval/rewards/{k}"] == 0.0
  arrays, _ = preference.read(
    held_pairs, "pairs", text=tokenize.Text(tokenize.load(str(tmp_path / "sft_hf")))
  )
  cfg, graphdef, _ = _model(tmp_path / "sft_hf")
  shapes = models.abstract(cfg)[1]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ref = hf.load_params(str(tmp_path / "sft_hf"), cfg, jax.tree.map(lambda _: device, shapes))
  tokens, mask = jnp.asarray(arrays["tokens_KxL"]), jnp.asarray(arrays["loss_mask_KxL"])
  logp = np.asarray(logps.sequence_logps(graphdef, dpo_result.state.params, tokens, mask))
  reward = dpo.loss.beta * (logp - np.asarray(logps.sequence_logps(graphdef, ref, tokens, mask)))
  want = {
    "eval/rewards/chosen": reward[:, 0].mean(),
    "eval/rewards/rejected": reward[:, 1].mean(),
    "eval/rewards/margins": (reward[:, 0] - reward[:, 1]).mean(),
    "eval/rewards/accuracies": (reward[:, 0] > reward[:, 1]).mean(),
    "eval/logps/chosen": logp[:, 0].mean(),
    "eval/logps/rejected": logp[:, 1].mean(),
    "eval/loss": np.mean(np.logaddexp(0.0, -(reward[:, 0] - reward[:, 1]))),
  }
  assert {k: final[k] for k in want} == pytest.approx(want, abs=2e-5)
  assert final["eval/rewards/accuracies"] == 1.0 and final["eval/rewards/margins"] > 0
  losses = [r["loss"] for r in read_jsonl(tmp_path / "dpo" / "metrics.jsonl") if "loss" in r]
  assert abs(losses[0] - np.log(2.0)) < 1e-5 and losses[-1] < losses[0]  # Starts at π = π_ref.
  export.export(str(tmp_path / "dpo"), str(tmp_path / "dpo_hf"))

  # transformers reads the export: its tokenizer's chat template gives our prompt ids, and its
  # greedy continuation is align_jax's greedy continuation of the run's final parameters.
  out = tmp_path / "dpo_hf"
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  text = tokenize.Text(tokenize.load(str(out)))
  prompt = [_user(QUESTIONS[0])]
  ids = text.prompt(prompt)
  assert ids == hf_tok.apply_chat_template(
    prompt, add_generation_prompt=True, tokenize=True, return_dict=False
  )
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  hf_model.generation_config.eos_token_id = None  # Compare N tokens, whatever they are.
  N = 12
  with torch.no_grad():
    want = hf_model.generate(
      torch.tensor([ids]), max_new_tokens=N, do_sample=False, attention_mask=torch.ones(1, len(ids))
    )[0, len(ids) :].tolist()
  cfg, graphdef, _ = _model(out)
  got = sampling.sample(
    graphdef,
    dpo_result.state.params,
    jnp.asarray([ids], jnp.int32),
    jax.random.key(0),
    sampling.SamplingConfig(temperature=0.0, max_new_tokens=N),
  )["tokens_RxL"][0, len(ids) :]
  assert np.asarray(got).tolist() == want
  # Training moved the model: its greedy reply differs from the untouched checkpoint's.
  original = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
  original.generation_config.eos_token_id = None
  with torch.no_grad():
    before = original.generate(
      torch.tensor([ids]), max_new_tokens=N, do_sample=False, attention_mask=torch.ones(1, len(ids))
    )[0, len(ids) :].tolist()
  assert before != want


def _model(directory):
  from align_jax import models

  cfg = models.ModelConfig(**hf.config_fields(hf.read_config(directory)))
  graphdef, _, _ = models.abstract(cfg)
  return cfg, graphdef, None


def test_start_up_checks_tokenizer_against_the_model_and_export_of_a_non_run_dir(tmp_path, caplog):
  """One line each: a tokenizer larger than the model's vocabulary is an error; a BOS or end of
  turn that the checkpoint's generation_config.json does not name is a warning; exporting a
  directory that is not a run names what it is."""
  import subprocess
  import sys

  from align_jax.data import records
  from align_jax.errors import CheckpointError, ConfigError, MissingFileError
  from conftest import subprocess_env

  base, vocab_size = _hf_dir(tmp_path)
  text = tokenize.Text(tokenize.load(str(base)))
  assert text.tokenizer.vocab_size == vocab_size - 8
  records.check_tokenizer(text, vocab_size, str(base))  # Fits; its end of turn is the EOS.
  assert not caplog.records
  with pytest.raises(ConfigError, match=f"has {vocab_size - 8} tokens, more than the model's "):
    records.check_tokenizer(text, vocab_size - 9, str(base))
  (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
  records.check_tokenizer(text, vocab_size, str(base))
  assert [r.getMessage() for r in caplog.records] == [
    f"data.tokenizer's end of a response (id 1) is not among init_checkpoint {str(base)!r}'s "
    "generation_config.json eos_token_id [0]: the exported model will not stop where "
    "training stopped"
  ]

  with pytest.raises(CheckpointError, match="no model section \\(a Hugging Face model directory"):
    export.export(str(base), str(tmp_path / "out"))
  (tmp_path / "bad").mkdir()
  with pytest.raises(MissingFileError, match="no config.json \\(not a run directory\\)"):
    export.export(str(tmp_path / "bad"), str(tmp_path / "out"))
  (tmp_path / "bad" / "config.json").write_text("{")
  with pytest.raises(CheckpointError, match="its config.json is not JSON"):
    export.export(str(tmp_path / "bad"), str(tmp_path / "out"))
  out = subprocess.run(
    [sys.executable, "-m", "align_jax.export", f"--workdir={base}", f"--out={tmp_path / 'o'}"],
    env=subprocess_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
    f"error: --workdir {str(base)!r}: its config.json has no model section (a Hugging Face "
    "model directory)"
  ]
