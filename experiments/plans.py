r"""The README's plan table: `python -m align_jax.plan` over real model sizes, two workloads and TPU
slices, compiled ahead of time on this CPU host (libtpu: `pip install -e ".[tpu]"`).

  python experiments/plans.py                  # plans the entries not yet planned, one by one
  python experiments/plans.py --only=llama3_8b # the entries whose name contains this
  python experiments/plans.py --table          # the table from the plan files alone

Each entry writes experiments/results/plans/<name>/plan.json and plan.md (the command is in
them); the table goes to experiments/results/plans/README.md. Workloads: a DPO step of
`batch` pairs of 4096 tokens (the reference's forward inside the step), and one BOND iteration
(configs/bond.py, n = 8: per prompt 2 policy and 16 anchor samples of 1024 + 256 tokens, then the
update). Both with remat (policy `nothing`), the presets' scanned layers and 512-position
log-prob chunks; the mesh is the config's default, every chip on fsdp (`--search` explores others).
Slices by Cloud TPU's names: v5p-N has N/2 chips (v5p-8 = v5p:2x2x1), v6e-N has N chips.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "experiments", "results", "plans")

SLICES = {
  "v5p-8": "v5p:2x2x1",
  "v5p-32": "v5p:2x2x4",
  "v5p-64": "v5p:4x4x2",
  "v5p-128": "v5p:4x4x4",
  "v6e-8": "v6e:2x4",
}
MODELS = ("llama3_1b", "llama3_8b", "gemma2_9b", "qwen3_1.7b")


def _dpo(model: str, pairs: int) -> list[str]:
  return [
    f"--config=configs/dpo.py:model={model}",
    f"--config.data.batch_size={pairs}",
    "--config.data.max_len=4096",
    "--config.model.remat=True",
  ]


def _bond(model: str, prompts: int) -> list[str]:
  return [
    f"--config=configs/bond.py:model={model},n=8",
    f"--config.data.batch_size={prompts}",
    "--config.data.prompt_len=1024",
    "--config.sampling.max_new_tokens=256",
    "--config.model.remat=True",
  ]


def grid() -> dict[str, tuple[str, list[str]]]:
  """{name: (slice, plan arguments)}, in the order they are planned (the issue's goals first)."""
  out = {
    "llama3_8b_dpo_v5p-8": ("v5p-8", _dpo("llama3_8b", 32)),
    "llama3_70b_dpo_v5p-128": ("v5p-128", _dpo("llama3_70b", 64)),
    "llama3_8b_bond_v5p-32": ("v5p-32", _bond("llama3_8b", 16)),
  }
  # The vocabulary chunks' effect: DPO steps with logits_chunk=0 (all logits at once).
  for model in ("llama3_8b", "gemma2_9b"):
    out[f"{model}_dpo_v5p-32"] = ("v5p-32", _dpo(model, 32))
    args = _dpo(model, 32) + ["--config.model.logits_chunk=0"]
    out[f"{model}_dpo_v5p-32_unchunked"] = ("v5p-32", args)
  for model in MODELS:
    for slice_name in ("v5p-8", "v5p-32", "v6e-8"):
      out.setdefault(f"{model}_dpo_{slice_name}", (slice_name, _dpo(model, 32)))
      out.setdefault(f"{model}_bond_{slice_name}", (slice_name, _bond(model, 16)))
  out["llama3_70b_bond_v5p-128"] = ("v5p-128", _bond("llama3_70b", 64))
  # The reference step (llama3_8b DPO, 32 pairs × 4096 on v5p:4x4x2: 38.6 GiB of
  # temporaries unrolled, unchunked): as planned now, then without each saving.
  plain = ["--config.model.logits_chunk=0", "--config.model.attention_chunk=0"]
  out["llama3_8b_dpo_v5p-64"] = ("v5p-64", _dpo("llama3_8b", 32))
  args = _dpo("llama3_8b", 32) + ["--config.model.attention_chunk=0"]
  out["llama3_8b_dpo_v5p-64_attention_unchunked"] = ("v5p-64", args)
  out["llama3_8b_dpo_v5p-64_unchunked"] = ("v5p-64", _dpo("llama3_8b", 32) + plain)
  args = _dpo("llama3_8b", 32) + plain + ["--config.model.scan_layers=False"]
  out["llama3_8b_dpo_v5p-64_unrolled_unchunked"] = ("v5p-64", args)
  return out


def plan(name: str, slice_name: str, args: list[str]) -> int:
  command = [
    sys.executable,
    "-m",
    "align_jax.plan",
    *args,
    f"--topology={SLICES[slice_name]}",
    f"--out={os.path.relpath(os.path.join(OUT, name), ROOT)}",
  ]
  print(" ".join(command[1:]), flush=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(command, cwd=ROOT, env=env).returncode


def table() -> str:
  """The markdown table of every plan.json under experiments/results/plans/."""
  rows = [
    "| model | workload | slice (chips) | fits | peak GiB / chip | temporaries GiB (update) "
    "| est. step s | est. MFU | compile s (CPU s) | load |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  names = grid()
  for name, (slice_name, _) in names.items():
    path = os.path.join(OUT, name, "plan.json")
    if not os.path.isfile(path):
      continue
    r = json.load(open(path))
    c, gib = r["config"], 2**30
    update = next(f for f in r["functions"] if f["name"] == "update")
    workload = (
      f"DPO {c['batch_size']} pairs × {c['max_len']}"
      if "max_len" in c
      else f"BOND {c['batch_size']} prompts × {c['samples_per_prompt']}, "
      f"{c['prompt_len']} + {c['max_new_tokens']}"
    )
    if not c["scan_layers"]:
      workload += ", layers unrolled"
    if c["logits_chunk"] == 0:
      workload += ", logits unchunked"
    if c.get("attention_chunk", 512) == 0:  # Plans made before the field was reported: 512.
      workload += ", attention unchunked"
    fits = "yes" if r["fits"] else f"**no** (short {r['short_by_bytes'] / gib:.1f} GiB)"
    rows.append(
      f"| {c['model']} | {workload} | {slice_name} ({r['chips']}) | {fits} | "
      f"{r['peak_bytes_per_chip'] / gib:.1f} of {r['chip']['hbm_bytes'] / gib:.1f} | "
      f"{update['memory_per_chip']['temporaries'] / gib:.1f} | {r['estimated_step_s']:.3g} | "
      f"{100 * (r['estimated_mfu'] or 0):.0f} % | {r['compile_s']:.0f} "
      f"({r.get('compile_cpu_s', 0):.0f}) | "
      f"{r['host_load_average'][0]:.1f} |"
    )
  missing = [n for n in names if not os.path.isfile(os.path.join(OUT, n, "plan.json"))]
  if missing:
    rows += ["", f"Not planned yet: {', '.join(missing)}."]
  return "\n".join(rows) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--table", action="store_true", help="only print the table")
  p.add_argument("--only", default="", help="plan only entries whose name contains this")
  args = p.parse_args(argv)
  if not args.table:
    for name, (slice_name, plan_args) in grid().items():
      done = os.path.isfile(os.path.join(OUT, name, "plan.json"))
      if args.only in name and not done:
        plan(name, slice_name, plan_args)
  text = table()
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "README.md"), "w") as f:
    f.write("# Ahead-of-time plans (`python experiments/plans.py`)\n\n" + text)
  print(text, end="")


if __name__ == "__main__":
  main()
