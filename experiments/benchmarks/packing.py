r"""DPO on pairs of unequal lengths: padded rows, padded rows sharing their prompt, and packed rows
(`data.pack_len`, align_jax/data/packing.py): useful tokens/s and padding.

  # CPU (default): the tiny Llama; prompts of 16-192 tokens, responses of 8-128:
  python -m experiments.benchmarks.packing
  # Accelerator: the ~1.2B Llama-3.2-1B shape in bf16 compute (GPU / TPU):
  python -m experiments.benchmarks.packing --preset=llama_1b --dtype=bfloat16 \
      --prompt_max=1024 --response_max=512 --batch=8 --pack_len=2048 --out=packing_llama_1b

Each update is `step.train_step` jitted as train.py jits it, fed host batches through
`pipeline.to_global`, with configs/dpo.py's loss and optimizer. Padded: `--batch` records a step,
each row padded to the longest record's length (prompt_max + response_max); packed: `--batch`
rows of `--pack_len` slots a step, records packed by Grain's best-fit packer (their number varies
from step to step). Useful tokens count each prompt once and each response once; tokens/s is the
total over the timed steps divided by their time. The layouts alternate repetition by repetition
over the same pre-built batches; figures are medians over repetitions.
"""

import argparse
import time

import jax
import numpy as np

from align_jax.data import packing, pipeline
from experiments.benchmarks import harness, report


def ragged_pairs(rng, n, prompt_range, response_range, vocab) -> tuple[dict, np.ndarray]:
  """n pairs with uniform prompt and response lengths, padded to the longest possible record;
  and each record's useful tokens (prompt + both responses)."""
  L = prompt_range[1] + response_range[1]
  prompt_N = rng.integers(prompt_range[0], prompt_range[1] + 1, n)
  length_NxK = rng.integers(response_range[0], response_range[1] + 1, (n, 2))
  tokens = rng.integers(1, vocab, (n, 2, L), dtype=np.int32)
  tokens[:, 1] = np.where(np.arange(L) < prompt_N[:, None], tokens[:, 0], tokens[:, 1])
  position_L = np.arange(L)
  end_NxK = prompt_N[:, None] + length_NxK
  mask = (position_L >= prompt_N[:, None, None]) & (position_L < end_NxK[..., None])
  tokens = np.where(position_L < end_NxK[..., None], tokens, 0).astype(np.int32)
  arrays = {"tokens_KxL": tokens, "loss_mask_KxL": mask.astype(np.float32)}
  arrays["useful"] = (prompt_N + length_NxK.sum(-1)).astype(np.int32)
  return arrays, prompt_N


def _slots(batch: dict, shared: int) -> int:
  """Token positions the step computes: the packed rows', or the padded rows' (a shared-prompt row
  of K responses: L + (K − 1)·(L − shared), logps.shared_rows)."""
  if "pack_tokens_S" in batch:
    return int(batch["pack_tokens_S"].size)
  B, K, L = batch["tokens_KxL"].shape
  return B * (L + (K - 1) * (L - shared)) if shared else B * K * L


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny_llama")
  p.add_argument("--dtype", default=None)
  p.add_argument("--batch", type=int, default=4, help="records (padded) or rows (packed) a step")
  p.add_argument("--prompt_min", type=int, default=16)
  p.add_argument("--prompt_max", type=int, default=192)
  p.add_argument("--response_min", type=int, default=8)
  p.add_argument("--response_max", type=int, default=128)
  p.add_argument("--pack_len", type=int, default=640)
  p.add_argument("--pack_records", type=int, default=8)
  p.add_argument("--batches", type=int, default=4, help="distinct batches per layout")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default="packing")
  args = p.parse_args(argv)

  model_cfg = harness.model_config(args.preset, dtype=args.dtype)
  env = report.environment()
  rng = np.random.default_rng(0)
  n = args.batch * args.pack_records * (args.batches + 2)
  arrays, prompt_N = ragged_pairs(
    rng,
    n,
    (args.prompt_min, args.prompt_max),
    (args.response_min, args.response_max),
    model_cfg.vocab_size,
  )
  useful_N = arrays.pop("useful")
  arrays["id"] = np.arange(n, dtype=np.int32)
  fields = ("tokens_KxL", "loss_mask_KxL")
  padded = [
    {k: arrays[k][b * args.batch : (b + 1) * args.batch] for k in (*fields, "id")}
    for b in range(args.batches)
  ]
  it = packing.batches(
    pipeline.ArraySource(arrays),
    shared=True,
    pack_len=args.pack_len,
    pack_records=args.pack_records,
    global_rows=args.batch,
    total_steps=args.batches,
    seed=0,
    shuffle=False,
    process_index=0,
    process_count=1,
  )
  packed = [next(it) for _ in range(args.batches)]
  for batch in packed:
    batch["id"] = np.where(batch.pop("example_mask") > 0, batch["id"], -1)
  runs = {}
  for name, batches, shared in (
    ("padded", padded, 0),
    ("padded, shared prompt", padded, int(prompt_N.min())),
    ("packed (shared prompt)", packed, 0),
  ):
    cfg = harness.run_config("dpo")
    cfg.data.share_prompt = "on" if shared else "off"
    L = arrays["tokens_KxL"].shape[-1]
    s = harness.build_step(cfg, model_cfg, shared_prompt=shared, rows=2, length=L)
    if name.startswith("packed"):
      s.fields = tuple(k for k in packed[0] if k != "id")
    ids = [b["id"][b["id"] >= 0] for b in batches]
    t0 = time.perf_counter()
    jax.block_until_ready(s(batches[0]))  # Compiles.
    runs[name] = dict(
      step=s,
      batches=batches,
      useful=sum(int(useful_N[i].sum()) for i in ids),
      records=sum(len(i) for i in ids),
      slots=sum(_slots(b, shared) for b in batches),
      times=[],
      compile_s=time.perf_counter() - t0,
    )
  for _ in range(args.reps):
    for run in runs.values():
      t0 = time.perf_counter()
      for batch in run["batches"]:
        metrics = run["step"](batch)
      jax.block_until_ready((metrics, run["step"].state))
      run["times"].append(time.perf_counter() - t0)

  base = runs["padded"]
  base_rate = base["useful"] / float(np.median(base["times"]))
  rows = []
  for name, run in runs.items():
    total_s = float(np.median(run["times"]))
    rate = run["useful"] / total_s
    rows.append(
      {
        "layout": name,
        "model": args.preset,
        "dtype": model_cfg.dtype,
        "records/step (mean)": run["records"] / args.batches,
        "token slots/step": run["slots"] / args.batches,
        "padding %": 100 * (1 - run["useful"] / run["slots"]),
        "step_ms (median)": 1e3 * total_s / args.batches,
        "useful tokens/s": rate,
        "speed-up vs padded": rate / base_rate,
        "compile_s": run["compile_s"],
      }
    )
  notes = [
    f"Pairs: prompts of {args.prompt_min}-{args.prompt_max} tokens, responses of "
    f"{args.response_min}-{args.response_max}, uniform; padded rows are "
    f"{args.prompt_max + args.response_max} tokens; packed rows {args.pack_len} slots, at most "
    f"{args.pack_records} records each.",
    "Useful tokens: each prompt once and each response once. Padding %: the share of the token "
    "slots the step computes that are not useful (a repeated prompt counts as not useful).",
    f"{args.reps} repetitions of {args.batches} updates per layout, layouts alternating; "
    "warm-up (compilation) excluded; medians.",
  ]
  print(
    report.write(
      args.out, env, rows, notes, {"step_times_s": {k: r["times"] for k, r in runs.items()}}
    )
  )


if __name__ == "__main__":
  main()
