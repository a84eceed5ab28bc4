r"""Sampler prefill and decode throughput against the memory-bandwidth roofline.

  python -m experiments.benchmarks.sampler                             # tiny Llama on CPU
  python -m experiments.benchmarks.sampler --preset=llama_1b --param_dtype=bfloat16 \
      --attention_impl=auto --batch=64,128,256 --prompt_len=512 --new_tokens=256 \
      --out=sampler_llama_1b                                            # accelerator

Times the jitted `sampling.sample` itself (prefill, then a `lax.while_loop` of one-token decode
steps over a KV cache; no EOS, so every row decodes all N tokens) at N = 1 and N = new_tokens:
decode step = (t_N − t_1)/(N − 1), prefill = t_1 − one decode step. A decode step must read every
parameter and the whole KV cache (the sampler attends over all S = P + N slots, masked): its
memory roofline is bytes/step ÷ bandwidth, its compute roofline FLOPs/step ÷ peak FLOP/s, and
bandwidth utilisation = achieved bytes/s ÷ the peak bandwidth (roofline.py). The two programs
alternate repetition by repetition; medians.
"""

import argparse
import time

import jax
import numpy as np

from align_jax import models, sampling, sharding
from experiments.benchmarks import harness, report, roofline


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny_llama")
  p.add_argument(
    "--param_dtype",
    default=None,
    help="storage dtype override (bfloat16 halves the bytes a decode step reads)",
  )
  p.add_argument("--attention_impl", default=None, help="xla | cudnn | auto (model default: xla)")
  p.add_argument("--batch", default="8,64", help="rows sampled at once, comma-separated")
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default="sampler")
  args = p.parse_args(argv)

  model_cfg = harness.model_config(
    args.preset, param_dtype=args.param_dtype, attention_impl=args.attention_impl
  )
  cfg = harness.run_config("bond")  # Mesh and rules of every config.
  env = report.environment()
  on_cpu = jax.devices()[0].platform == "cpu"
  mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
  table = sharding.check_rules(
    cfg.rules, mesh, set(models.transformer.PARAM_AXES) | set(models.transformer.ACT_AXES)
  )
  P, N = args.prompt_len, args.new_tokens
  measured, probes = [], []
  with jax.set_mesh(mesh), sharding.use_rules(table):
    graphdef, _, names = models.abstract(model_cfg)
    params = jax.jit(
      lambda k: models.init_params(model_cfg, k),
      out_shardings=sharding.tree_shardings(names, mesh, table),
    )(jax.random.key(0))
    param_bytes = roofline.tree_bytes(params)
    for R in (int(b) for b in args.batch.split(",")):
      prompts = sharding.global_array(
        np.random.default_rng(0).integers(0, model_cfg.vocab_size, (R, P), np.int32),
        sharding.batch_sharding(mesh, 2),
      )
      key = jax.random.key(1)
      calls = {
        n: (
          lambda n=n: sampling.sample(
            graphdef, params, prompts, key, sampling.SamplingConfig(max_new_tokens=n)
          )
        )
        for n in (1, N)
      }
      for call in calls.values():
        jax.block_until_ready(call())  # Compiles.
      times = {n: [] for n in calls}
      for _ in range(args.reps):
        for n, call in calls.items():
          t0 = time.perf_counter()
          jax.block_until_ready(call())
          times[n].append(time.perf_counter() - t0)
        if on_cpu:  # The denominators under the same load.
          probes.append(roofline.probe(model_cfg.dtype))
      measured.append((R, *(float(np.median(times[n])) for n in (1, N))))
  peaks = roofline.device_peaks(model_cfg.dtype, probes)
  rows = []
  for R, t1, tN in measured:
    decode_s = (tN - t1) / (N - 1)
    prefill_s = max(t1 - decode_s, 1e-9)
    step_bytes = roofline.decode_step_bytes(param_bytes, model_cfg, R, P + N)
    memory_s = step_bytes / peaks["peak_bandwidth_bytes_per_s"]
    compute_s = roofline.forward_flops(model_cfg, R, 1, P + N) / peaks["peak_flops_per_s"]
    prefill_flops = roofline.forward_flops(model_cfg, R, P, P + 1)
    rows.append(
      {
        "rows": R,
        "P": P,
        "N": N,
        "prefill ms": 1e3 * prefill_s,
        "prefill tokens/s": R * P / prefill_s,
        "prefill MFU %": 100 * prefill_flops / prefill_s / peaks["peak_flops_per_s"],
        "decode ms/step": 1e3 * decode_s,
        "decode tokens/s": R / decode_s,
        "MB read/step": step_bytes / 1e6,
        "roofline tokens/s": R / max(memory_s, compute_s),
        "bound": "memory" if memory_s >= compute_s else "compute",
        "bandwidth util %": 100 * memory_s / decode_s,
      }
    )
  notes = [
    f"model {args.preset}: {param_bytes / 1e6:.1f} MB of parameters ({model_cfg.param_dtype}), "
    f"compute {model_cfg.dtype}; KV cache {model_cfg.dtype}; attention "
    f"{model_cfg.attention_impl}.",
    "bytes/step = parameter bytes + 2·n_layers·rows·(P+N)·G·K·itemsize (roofline.py); the "
    "roofline step time is max(bytes / bandwidth, model FLOPs of one token per row over P+N "
    "keys / peak FLOP/s), and `bound` says which term is larger; "
    f"peak bandwidth {peaks['peak_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, peak FLOP/s "
    f"{peaks['peak_flops_per_s'] / 1e12:.3f} T: {peaks['peak_source']}.",
    "prefill is measured in the N = 1 program (cache of P + 1 slots); its FLOPs count P "
    "queries over P + 1 keys.",
    "On a CPU a tiny model's parameters and cache sit largely in cache memory, so the DRAM "
    "roofline is loose there; the figure that matters is the accelerator run (README).",
    f"{args.reps} repetitions after compilation, medians.",
  ]
  print(report.write(args.out, env, rows, notes, {"peaks": peaks, "param_bytes": param_bytes}))


if __name__ == "__main__":
  main()
