r"""Supervised fine-tuning (maximum likelihood on the scored tokens): the step before DPO or BOND.

Default: rejection-sampling fine-tuning on the testbed: the cached base LM fine-tuned on
responses drawn from the exact Best-of-4 distribution of the chain it was pretrained on
(target.kind = bon, testbed.target_n = 4), so the exact metrics measure how close it comes to
π_BoN (exact/kl_target_policy = KL(BoN ‖ π), the loss's population minimum). From files, the
records are TRL's language-modeling and prompt-completion types (align_jax/data/corpus.py):
{"text"} (every token scored, EOS appended), {"messages"} (the chat template's text, loss on the
assistant turns only) or {"prompt", "completion"} (loss on the completion), from JSONL,
ArrayRecord or TFDS.

  python -m align_jax.main --config=configs/sft.py
  python -m align_jax.main --config=configs/sft.py:smoke --workdir=runs/sft_smoke
  # Your model and data: the architecture comes from the checkpoint's config.json, the chat
  # template from the tokenizer's tokenizer_config.json / chat_template.jinja.
  python -m align_jax.main --config=configs/sft.py --workdir=runs/my_sft \
    --config.init_checkpoint=/models/Qwen3-0.6B --config.data.tokenizer=/models/Qwen3-0.6B \
    --config.data.source=jsonl:chats.jsonl --config.data.max_len=1024 --config.data.batch_size=8
  python -m align_jax.export --workdir=runs/my_sft --out=/models/my-sft   # then DPO from it

Expected (default, 31 s on a 2-core CPU with the base LM cached): exact/kl_target_policy =
KL(BoN ‖ π) 0.64 → 0.06, exact/reward 2.97 → 4.51, exact/bon_quantile E_π[p≤] 0.50 → 0.79.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "sft"
  c.objective = "sft"
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  c.target.kind = "bon"  # The corpus: Best-of-testbed.target_n samples; the exact target too.
  c.optim.lr = 3e-4
  c.total_steps = 100
  c.eval_every = 50
  c.checkpoint_every = 50
  if arg.smoke:
    config_lib.smoke(c)
  return c
