r"""Offline DPO and LiPO update steps, shared-prompt rows and unshared: step time, useful
tokens/s, peak memory, MFU.

  # CPU (default): the tiny Llama, 8 prompts x (2 | 4) responses, prompt 32 + response 96:
  python -m experiments.benchmarks.offline_step
  # The shared-prompt comparison: LiPO lists of 8, prompt 256 + 8 x 128:
  python -m experiments.benchmarks.offline_step --objectives=lipo --list_size=8 \
      --prompt_len=256 --response_len=128 --batch=2 --out=offline_step_lipo8
  # Accelerator: the ~1.2B Llama-3.2-1B shape in bf16 compute (GPU / TPU):
  python -m experiments.benchmarks.offline_step --preset=llama_1b --batch=4 --prompt_len=256 \
      --response_len=768 --remat --attention_impl=auto --steps=5 --reps=5 \
      --out=offline_step_llama_1b

Each update is `step.train_step` jitted as train.py jits it (shardings, donated state), fed host
batches through `pipeline.to_global`; the loss settings and the optimizer are those of
configs/dpo.py and configs/lipo.py. The frozen reference's forward runs inside the step (no
precomputed log-probs). Each objective runs twice: its K responses scored in one shared-prompt
row (`data.share_prompt`, the default; logps.py) and each in its own row. Runs alternate
repetition by repetition (with the CPU's matmul probe between them); figures are medians.
Useful tokens/s counts each prompt once and each response once: B·(P + K·R) per step. MFU's FLOP
formula (of unshared rows) and peak are in roofline.py's docstring and in the output.
"""

import argparse
import time

import jax
import numpy as np

from experiments.benchmarks import harness, report, roofline

FORMULA = (
  "model FLOPs/step = (3 + 1)·rows·[2·N·L + 4·n_layers·H·K·L²]: policy forward+backward "
  "(3 forwards) + one frozen reference forward, N = matmul params (roofline.py)"
)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny_llama")
  p.add_argument("--batch", type=int, default=8, help="prompts per step (B)")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--response_len", type=int, default=96)
  p.add_argument("--list_size", type=int, default=4, help="LiPO responses per prompt")
  p.add_argument("--objectives", default="dpo,lipo")
  p.add_argument("--steps", type=int, default=5, help="updates per timed repetition")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--dtype", default=None, help="compute dtype override (float32, bfloat16)")
  p.add_argument("--attention_impl", default=None, help="xla | cudnn | auto (model default: xla)")
  p.add_argument("--out", default="offline_step")
  args = p.parse_args(argv)

  model_cfg = harness.model_config(
    args.preset, remat=args.remat or None, dtype=args.dtype, attention_impl=args.attention_impl
  )
  env = report.environment()
  on_cpu = jax.devices()[0].platform == "cpu"
  L = args.prompt_len + args.response_len
  rng = np.random.default_rng(0)
  runs = {}
  for name in args.objectives.split(","):
    k = 2 if name == "dpo" else args.list_size
    batch = harness.records(
      rng, args.batch, k, args.prompt_len, args.response_len, model_cfg.vocab_size
    )
    for shared in (True, False):
      cfg = harness.run_config({"dpo": "dpo", "lipo": "lipo"}[name])
      cfg.data.share_prompt = "on" if shared else "off"
      s = harness.build_step(cfg, model_cfg, shared_prompt=args.prompt_len, rows=k, length=L)
      t0 = time.perf_counter()
      jax.block_until_ready(s(batch))  # Compiles.
      compile_s = time.perf_counter() - t0
      jaxpr_flops = roofline.jaxpr_matmul_flops(harness.step_jaxpr(s, s.device_batch(batch)))
      runs[name, shared] = dict(
        step=s, batch=batch, k=k, times=[], compile_s=compile_s, jaxpr_flops=jaxpr_flops
      )

  probes = []
  for _ in range(args.reps):
    for run in runs.values():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        metrics = run["step"](run["batch"])
      jax.block_until_ready((metrics, run["step"].state))
      run["times"].append((time.perf_counter() - t0) / args.steps)
    if on_cpu:  # The denominator under the same load as the steps around it.
      probes.append(roofline.probe(model_cfg.dtype))
  mem_gib, mem_kind = report.peak_memory()  # Before the probes' buffers.
  peaks = roofline.device_peaks(model_cfg.dtype, probes)
  peak = peaks["peak_flops_per_s"]

  rows = []
  for (name, shared), run in runs.items():
    rows_per_step = args.batch * run["k"]
    step_s = float(np.median(run["times"]))
    unshared_s = float(np.median(runs[name, False]["times"]))
    flops = roofline.train_step_flops(model_cfg, rows_per_step, L)
    useful = args.batch * (args.prompt_len + run["k"] * args.response_len)
    rows.append(
      {
        "objective": name,
        "rows": "shared prompt" if shared else "unshared",
        "model": args.preset,
        "B": args.batch,
        "K": run["k"],
        "P + R": f"{args.prompt_len} + {args.response_len}",
        "dtype": model_cfg.dtype,
        "remat": model_cfg.remat,
        "step_ms (median)": 1e3 * step_s,
        "step_ms (min..max)": f"{1e3 * min(run['times']):.1f}..{1e3 * max(run['times']):.1f}",
        "useful tokens/s": useful / step_s,
        "speed-up vs unshared": unshared_s / step_s,
        "jaxpr matmul GFLOP/step": run["jaxpr_flops"] / 1e9,
        "MFU % (unshared formula)": "" if shared else 100 * flops / step_s / peak,
        "compile_s": run["compile_s"],
      }
    )
  ideal = {
    name: (args.prompt_len + args.response_len) * k / (args.prompt_len + k * args.response_len)
    for name, k in ((n, r["k"]) for (n, _), r in runs.items())
  }
  notes = [
    "Ideal speed-up of sharing (token positions K·(P + R) over P + K·R): "
    + ", ".join(f"{n} {v:.2f}×" for n, v in ideal.items())
    + "; attention's cost is not proportional to positions, so the ideal is approximate.",
    FORMULA + "; the jaxpr column counts every dot_general of the traced step exactly (it "
    "exceeds the formula only with remat, whose recomputed forward is not model FLOPs).",
    f"MFU denominator: {peak / 1e12:.3f} TFLOP/s, {peaks['peak_source']}"
    + (
      " (on a CPU: MFU relative to achieved matmul throughput, not a hardware peak)."
      if on_cpu
      else "."
    ),
    f"peak memory {mem_gib:.2f} GiB ({mem_kind}) for the whole process (all objectives).",
    f"{args.reps} repetitions of {args.steps} updates per objective, objectives alternating; "
    "warm-up (compilation) excluded; the spread (min..max) is reported.",
  ]
  print(
    report.write(
      args.out,
      env,
      rows,
      notes,
      {
        "peaks": peaks,
        "step_times_s": {f"{n} shared={sh}": r["times"] for (n, sh), r in runs.items()},
      },
    )
  )


if __name__ == "__main__":
  main()
