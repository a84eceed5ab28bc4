"""TRL DPO through its own trainer: `DPOTrainer.train` on a random `LlamaForCausalLM` (the same
shape), a deep copy as the frozen reference, a word-level tokenizer built in memory (token i is
the word `t<i>`), fp32 on CPU, no gradient checkpointing (as in align_jax and Tunix). The clock
runs in a `TrainerCallback.on_step_end`."""

import copy
import tempfile

import protocol
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer


class _ClockCallback(TrainerCallback):
  def __init__(self, clock):
    self.clock = clock

  def on_step_end(self, args, state, control, **kwargs):
    self.clock.step_done()  # PyTorch on CPU runs synchronously: nothing to wait for.


def _tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0"
  )


def main():
  s = protocol.spec()
  m = s["model"]
  data = protocol.pairs(s)
  torch.manual_seed(s["seed"])
  policy = LlamaForCausalLM(
    LlamaConfig(
      vocab_size=m["vocab_size"],
      hidden_size=m["d_model"],
      intermediate_size=m["mlp_dim"],
      num_hidden_layers=m["n_layers"],
      num_attention_heads=m["n_heads"],
      num_key_value_heads=m["n_kv_heads"],
      head_dim=m["head_dim"],
      rope_theta=m["rope_theta"],
      rms_norm_eps=m["norm_eps"],
      max_position_embeddings=s["prompt_len"] + s["response_len"],
      tie_word_embeddings=False,
      pad_token_id=0,
      eos_token_id=1,
      bos_token_id=None,
    )
  )
  reference = copy.deepcopy(policy)
  words = lambda row: " ".join(f"t{i}" for i in row)
  clock = protocol.Clock(s)
  B = s["batch"]
  dataset = Dataset.from_dict(
    {
      "prompt": [words(r) for r in data["prompt"]] * clock.total,
      "chosen": [" " + words(r) for r in data["chosen"]] * clock.total,
      "rejected": [" " + words(r) for r in data["rejected"]] * clock.total,
    }
  )
  args = DPOConfig(
    output_dir=tempfile.mkdtemp(),
    per_device_train_batch_size=B,
    max_steps=clock.total,
    learning_rate=s["lr"],
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    max_grad_norm=1.0,
    beta=0.1,
    max_length=None,
    logging_strategy="no",
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    dataloader_num_workers=0,
    disable_tqdm=True,
    seed=s["seed"],
    bf16=False,
    fp16=False,
    gradient_checkpointing=False,
  )  # TRL's default is True; align_jax's remat is off here.
  trainer = DPOTrainer(
    model=policy,
    ref_model=reference,
    args=args,
    train_dataset=dataset,
    processing_class=_tokenizer(m["vocab_size"]),
    callbacks=[_ClockCallback(clock)],
  )
  trainer.train()


if __name__ == "__main__":
  main()
