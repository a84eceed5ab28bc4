"""align_jax DPO as train.py runs it: configs/dpo.py's loss and optimizer, the jitted donated
`train_step` with the reference forward inside, host batches through `pipeline.to_global`, and
the metrics fetched one step late and checked for NaN (`MetricWriter`), every step."""

import tempfile

import jax
import numpy as np
import protocol

from align_jax.metrics import MetricWriter
from experiments.benchmarks import harness


def main():
  s = protocol.spec()
  data = protocol.pairs(s)
  cfg = harness.run_config("dpo")
  cfg.optim.lr = s["lr"]
  cfg.data.share_prompt = s.get("share_prompt", "auto")
  model_cfg = harness.model_config("tiny_llama", **s["model"])
  B, P = data["prompt"].shape
  L = P + data["chosen"].shape[1]
  st = harness.build_step(cfg, model_cfg, shared_prompt=P, rows=2, length=L)  # Pairs' prompts.
  tokens_BxKxL = np.stack(
    [np.concatenate([data["prompt"], data[r]], axis=1) for r in ("chosen", "rejected")], axis=1
  )
  mask_BxKxL = np.zeros(tokens_BxKxL.shape, np.float32)
  mask_BxKxL[:, :, P:] = 1.0
  batch = {"tokens_KxL": tokens_BxKxL, "loss_mask_KxL": mask_BxKxL}
  clock = protocol.Clock(s)
  writer = MetricWriter(tempfile.mkdtemp(), total_steps=clock.total, log_every=10**9, is_main=False)
  first_loss = None
  for i in range(clock.total):
    metrics = st(batch)
    writer.submit(i + 1, metrics)
    if first_loss is None:
      first_loss = float(metrics["loss"])
    clock.step_done(lambda: jax.block_until_ready(st.state), first_loss=first_loss)
  writer.flush()


if __name__ == "__main__":
  main()
