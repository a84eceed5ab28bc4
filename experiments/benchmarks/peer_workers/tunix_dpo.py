"""Tunix DPO through its own trainer: `DPOTrainer.train` over pre-tokenised `TrainingInput`s, a
`llama3.Llama3` policy and an identical frozen reference, on a one-device ('fsdp', 'tp') mesh.
The clock runs in a Tunix training hook (`on_train_step_end`)."""

import jax
import numpy as np
import optax
import protocol
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.sft import hooks
from tunix.sft.dpo import dpo_trainer


class _ClockHook(hooks.TrainingHooks):
  def __init__(self, clock):
    self.clock, self.first_loss = clock, None

  def on_train_step_end(self, train_ctx, train_step, train_loss):
    if self.first_loss is None:
      self.first_loss = float(train_loss)
    params = nnx.state(train_ctx.model, nnx.Param)
    self.clock.step_done(
      lambda: jax.block_until_ready((train_loss, params)), first_loss=self.first_loss
    )

  def on_train_start(self, train_ctx):
    pass

  def on_train_end(self, train_ctx):
    pass

  def on_train_step_start(self, train_ctx):
    pass

  def on_eval_step_start(self, train_ctx):
    pass

  def on_eval_step_end(self, train_ctx, eval_loss):
    pass


def main():
  s = protocol.spec()
  m = s["model"]
  data = protocol.pairs(s)
  config = llama3.ModelConfig(
    num_layers=m["n_layers"],
    vocab_size=m["vocab_size"],
    embed_dim=m["d_model"],
    hidden_dim=m["mlp_dim"],
    num_heads=m["n_heads"],
    head_dim=m["head_dim"],
    num_kv_heads=m["n_kv_heads"],
    rope_theta=int(m["rope_theta"]),
    norm_eps=m["norm_eps"],
  )
  mesh = jax.make_mesh(
    (1, 1), ("fsdp", "tp"), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  with mesh:  # Tunix reads the legacy `with mesh:` context (jax.set_mesh is not enough).
    policy = llama3.Llama3(config, rngs=nnx.Rngs(params=0))
    reference = llama3.Llama3(config, rngs=nnx.Rngs(params=0))
    optimizer = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(s["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
    )
    trainer = dpo_trainer.DPOTrainer(
      model=policy,
      ref_model=reference,
      optimizer=optimizer,
      training_config=dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, beta=0.1),
    )
    clock = protocol.Clock(s)
    trainer.with_training_hooks(_ClockHook(clock))
    ones = lambda a: np.ones(a.shape, np.int32)
    batch = dpo_trainer.TrainingInput(
      prompt_ids=data["prompt"],
      prompt_mask=ones(data["prompt"]),
      chosen_ids=data["chosen"],
      chosen_mask=ones(data["chosen"]),
      rejected_ids=data["rejected"],
      rejected_mask=ones(data["rejected"]),
    )
    trainer.train([batch] * clock.total)


if __name__ == "__main__":
  main()
