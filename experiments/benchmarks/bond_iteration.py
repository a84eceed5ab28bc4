r"""One BOND iteration split into sampling (the rollout) and training (the update).

  python -m experiments.benchmarks.bond_iteration                     # tiny Llama on CPU
  python -m experiments.benchmarks.bond_iteration --num_anchor=8 --prompt_len=128 \
      --new_tokens=64 --out=bond_iteration_p128  # prompts shared: the sampler's prefill, the rows
  python -m experiments.benchmarks.bond_iteration --preset=llama_1b --batch=2 --prompt_len=128 \
      --new_tokens=128 --remat --attention_impl=auto --out=bond_iteration_llama_1b  # accelerator

The iteration is train.py's: the jitted `rollout.rollout` (configs/bond.py: 2 policy + 16
anchor samples per prompt through `sampling.sample`, the reference's log-probs of all of them,
the reward) then the jitted, donated `step.train_step` on its batch. The reward is a rule on the
tokens (harness._rule_score), standing in for the testbed's, which only exists for its 8-token
language. Rollout and update are timed apart (each waited for), alternating, medians.
"""

import argparse
import time

import jax
import numpy as np

from align_jax import sharding
from experiments.benchmarks import harness, report, roofline


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny_llama")
  p.add_argument("--batch", type=int, default=4, help="prompts per iteration")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--num_anchor", type=int, default=16, help="anchor samples per prompt")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--attention_impl", default=None, help="xla | cudnn | auto (model default: xla)")
  p.add_argument("--out", default="bond_iteration")
  args = p.parse_args(argv)

  cfg = harness.run_config("bond")
  cfg.sampling.max_new_tokens = args.new_tokens
  cfg.data.batch_size = args.batch
  cfg.rollout.num_anchor = args.num_anchor
  model_cfg = harness.model_config(
    args.preset, remat=args.remat or None, attention_impl=args.attention_impl
  )
  env = report.environment()
  s = harness.build_step(
    cfg,
    model_cfg,
    shared_prompt=args.prompt_len,
    rows=cfg.rollout.num_policy + cfg.rollout.num_anchor,
    length=args.prompt_len + args.new_tokens,
  )
  make_batch = harness.build_rollout(s, args.batch, args.prompt_len)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, model_cfg.vocab_size, (args.batch, args.prompt_len), np.int32)
  index = np.arange(args.batch, dtype=np.int32)

  def iteration():
    t0 = time.perf_counter()
    batch = jax.block_until_ready(make_batch(s.state, prompts, index, s.ref_params))
    t1 = time.perf_counter()
    jax.block_until_ready(s.update(batch))
    return t1 - t0, time.perf_counter() - t1, batch

  (compile_roll, compile_step, batch) = iteration()
  times, probes = [], []
  for _ in range(args.reps):
    times.append(iteration()[:2])
    if jax.devices()[0].platform == "cpu":  # The denominators under the same load.
      probes.append(roofline.probe(model_cfg.dtype))
  roll_s, step_s = (float(np.median(t)) for t in zip(*times))
  mem_gib, mem_kind = report.peak_memory()  # Before the probes' buffers.
  peaks = roofline.device_peaks(model_cfg.dtype, probes)

  B, K, L = batch["tokens_BxKxL"].shape
  P, N = args.prompt_len, args.new_tokens
  # FLOPs: every matmul of the traced programs (the decode loop N times, its longest), as run:
  # one prefill per prompt, the prompt's samples scored in one shared row.
  with jax.set_mesh(s.mesh), sharding.use_rules(s.table):
    rollout_jaxpr = jax.make_jaxpr(make_batch)(s.state, prompts, index, s.ref_params)
  sample_flops = roofline.jaxpr_matmul_flops(rollout_jaxpr, while_trips=N)
  update_flops = roofline.jaxpr_matmul_flops(harness.step_jaxpr(s, batch))
  peak = peaks["peak_flops_per_s"]
  rows = [
    {
      "part": "sampling (rollout)",
      "ms (median)": 1e3 * roll_s,
      "share %": 100 * roll_s / (roll_s + step_s),
      "tokens/s": B * K * N / roll_s,
      "matmul GFLOP": sample_flops / 1e9,
      "MFU %": 100 * sample_flops / roll_s / peak,
      "compile_s": compile_roll,
    },
    {
      "part": "training (update)",
      "ms (median)": 1e3 * step_s,
      "share %": 100 * step_s / (roll_s + step_s),
      "tokens/s": B * (P + K * N) / step_s,
      "matmul GFLOP": update_flops / 1e9,
      "MFU %": 100 * update_flops / step_s / peak,
      "compile_s": compile_step,
    },
  ]
  notes = [
    f"model {args.preset} ({model_cfg.dtype}, remat {model_cfg.remat}, attention "
    f"{model_cfg.attention_impl}); {B} prompts x K = "
    f"{K} samples ({cfg.rollout.num_policy} policy + {cfg.rollout.num_anchor} anchor) of "
    f"{P} prompt + {N} new tokens; sampling tokens/s counts generated tokens, training "
    "tokens/s useful tokens, B·(P + K·N) (each prompt once: its samples share its row).",
    "FLOPs: every matmul of the traced rollout (its two decode loops counted N times each) "
    "and update, as they run (one prefill per prompt; a prompt's samples in one shared row); "
    "no reference forward in the update (the rollout computed its log-probs).",
    f"MFU denominator {peak / 1e12:.3f} TFLOP/s: {peaks['peak_source']}.",
    f"peak memory {mem_gib:.2f} GiB ({mem_kind}).",
    f"{args.reps} iterations after one warm-up (compilation) iteration, each followed on a "
    "CPU by the matmul / bandwidth probe; medians.",
  ]
  print(report.write(args.out, env, rows, notes, {"peaks": peaks, "iteration_times_s": times}))


if __name__ == "__main__":
  main()
