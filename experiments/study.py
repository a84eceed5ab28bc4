"""What every study script in experiments/ shares: run grids through align_jax.sweep, collect, write.

A study is a list of `Grid`s (a config file, its config arg, overrides for every run) and an
`analyze` function from the finished runs to a markdown body, a JSON-able dict and a matplotlib
figure. `main` runs each grid's `get_sweep` points × seeds in-process (a finished run is skipped, an
interrupted one resumes) and writes `<out>/<study>.md`, `.json` and `.png`, stamped with the command,
seeds, wall time, date, commit and device.

  python experiments/lipo.py                  # the full study, 3 seeds, results in experiments/results
  python experiments/lipo.py --quick          # a reduced grid, one seed, for tests
  python experiments/lipo.py --analyze_only   # rewrite the table and plot from finished runs
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # Scripts run as `python experiments/<study>.py` from anywhere.
  sys.path.insert(0, ROOT)

from align_jax import sweep  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Grid:
  """The runs of one config's `get_sweep(arg)` (or of `points`), each with `sets` applied;
  `group` labels them."""

  group: str
  config: str  # Relative to the project root, e.g. configs/lipo.py.
  arg: str = ""
  sets: dict = dataclasses.field(default_factory=dict)
  points: list | None = None  # Instead of get_sweep's: e.g. [{}], the config as it is.


@dataclasses.dataclass
class Record:
  """A finished run: its grid, sweep point, summary.json and exact-evaluation curve."""

  group: str
  run: sweep.Run
  summary: dict
  curve: list[dict]  # metrics.jsonl records holding exact/* values, by step.

  @property
  def final(self) -> dict:
    return self.summary["final"]

  @property
  def initial(self) -> dict:
    return self.summary["initial"]

  @property
  def trajectory(self) -> list[tuple[int, dict]]:
    """(step, exact metrics) from the initial evaluation through the curve to the final one."""
    by_step = {0: self.initial} | {c["step"]: c for c in self.curve}  # A resume's rerun wins.
    by_step[self.summary["steps"]] = self.final
    return sorted(by_step.items())

  @functools.cached_property
  def config(self) -> dict:
    """The run's config.json (read once)."""
    with open(os.path.join(self.run.workdir, "config.json")) as f:
      return json.load(f)

  def cfg(self, key: str) -> Any:
    """The run's config value at a dotted key."""
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node


def parse_args(study: str, argv=None, default_seeds: int = 3) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=f"The {study} study (experiments/{study}.py).")
  p.add_argument("--quick", action="store_true", help="Reduced grid and budget, one seed.")
  p.add_argument("--seeds", type=int, default=default_seeds, help="Seeds per point (full mode).")
  p.add_argument(
    "--root", default=None, help="Runs go here (default runs/experiments/<study>[_quick])."
  )
  p.add_argument(
    "--out",
    default=os.path.join(ROOT, "experiments", "results"),
    help="Where <study>.md/.json/.png are written.",
  )
  p.add_argument("--analyze_only", action="store_true", help="Only re-analyse finished runs.")
  args = p.parse_args(argv)
  args.study = study
  if args.quick:
    args.seeds = 1
  args.root = args.root or os.path.join(
    ROOT, "runs", "experiments", study + ("_quick" if args.quick else "")
  )
  return args


def execute(args: argparse.Namespace, grids: list[Grid]) -> list[Record]:
  """Runs (or, with --analyze_only, only reads) every grid's runs; returns them in grid order."""
  records = []
  for grid in grids:
    config = os.path.join(ROOT, grid.config)
    runs = sweep.runs(
      config,
      grid.arg,
      seeds=range(args.seeds),
      quick=args.quick,
      root=os.path.join(args.root, grid.group),
      sets=grid.sets,
      points=grid.points,
    )
    sweep.write_index(os.path.join(args.root, grid.group), config, runs)
    if args.analyze_only:
      missing = [
        r.workdir for r in runs if not os.path.exists(os.path.join(r.workdir, "summary.json"))
      ]
      if missing:
        raise FileNotFoundError(
          f"--analyze_only: {len(missing)} runs are not finished, e.g. {missing[0]}"
        )
    else:
      sweep.run_local(config, runs, log=lambda m, g=grid.group: print(f"{g}: {m}", flush=True))
    for r in runs:
      with open(os.path.join(r.workdir, "summary.json")) as f:
        summary = json.load(f)
      with open(os.path.join(r.workdir, "metrics.jsonl")) as f:
        curve = [
          rec
          for rec in map(json.loads, filter(str.strip, f))
          if any(k.startswith("exact/") for k in rec)
        ]
      records.append(Record(grid.group, r, summary, curve))
  return records


def main(
  study: str,
  grids: Callable[[bool], list[Grid]],
  analyze: Callable[[list[Record], argparse.Namespace], tuple[str, dict, Any]],
  argv=None,
  default_seeds: int = 3,
) -> dict:
  """Runs the study and writes its table, numbers and plot; returns the JSON it wrote."""
  args = parse_args(study, argv, default_seeds)
  t0 = time.time()
  records = execute(args, grids(args.quick))
  wall = time.time() - t0
  body, data, fig = analyze(records, args)
  meta = _meta(args, wall, records)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, study)
  fig.savefig(stem + ".png", dpi=120, bbox_inches="tight")
  out = {
    "meta": meta,
    **data,
    "runs": [
      {
        "group": r.group,
        "point": r.run.name,
        "seed": r.run.seed,
        "initial": r.initial,
        "final": r.final,
        "curve": r.curve,
      }
      for r in records
    ],
  }
  with open(stem + ".json", "w") as f:
    json.dump(out, f, indent=1, default=float)
  with open(stem + ".md", "w") as f:
    f.write(f"# {study}\n\n{body.strip()}\n\n{_meta_lines(meta)}\n")
  print(f"wrote {stem}.md, .json, .png ({len(records)} runs, {wall:.0f} s)")
  return out


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value) over seeds."""
  v = np.asarray(list(values), np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt(values, digits: int = 3) -> str:
  """`mean ± std` over seeds (just the value for one seed)."""
  m, s = mean_std(values)
  return f"{m:.{digits}f}" if len(list(values)) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def group_by(records: list[Record], key: Callable[[Record], Any]) -> dict:
  """Records grouped (in first-seen order) by `key(record)`: seeds of one point together."""
  out = {}
  for r in records:
    out.setdefault(key(r), []).append(r)
  return out


def kl_path(record: Record, key: str) -> tuple[np.ndarray, np.ndarray]:
  """A run's exact (KL(π‖π_ref), metric) along training: the start, each evaluation, the end."""
  points = [record.initial, *record.curve, record.final]
  return (np.array([p["exact/kl_policy_ref"] for p in points]), np.array([p[key] for p in points]))


def at_kl(records: list[Record], key: str, kl: float) -> list[float]:
  """Each run's metric at KL(π‖π_ref) = kl, linear between its evaluations (matched-KL
  comparisons; past its last evaluation, the final value)."""
  out = []
  for r in records:
    kls, values = kl_path(r, key)
    order = np.argsort(kls)
    out.append(float(np.interp(kl, kls[order], values[order])))
  return out


def reference(record: Record):
  """(testbed, log π_ref(y|x) [X, Y] float32 numpy) of a finished testbed run's cached base LM.

  For exact quantities of the reference itself that no run reports (the Best-of-N curve, the
  KL-regularised optima): the same enumeration pass as the run's exact evaluation.
  """
  import jax
  import ml_collections as mlc
  from align_jax import checkpoint, models
  from align_jax.testbed import base as tb_base, task

  with open(os.path.join(record.run.workdir, "config.json")) as f:
    cfg = json.load(f)
  tb_cfg, model_cfg = mlc.ConfigDict(cfg["testbed"]), mlc.ConfigDict(cfg["model"])
  tb = task.make(tb_cfg)
  graphdef, shapes, _ = models.abstract(models.ModelConfig(**model_cfg))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = checkpoint.load_params(
    os.path.join(tb_base.base_dir(tb_cfg, model_cfg), "params"),
    checkpoint.abstract_like(shapes, jax.tree.map(lambda _: one, shapes)),
  )
  logp_fn = jax.jit(task.exact_logp_fn(graphdef, tb, tb_cfg.eval_chunk))
  return tb, np.asarray(logp_fn(params))


def _meta(args, wall: float, records: list[Record]) -> dict:
  import jax

  try:
    commit = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, capture_output=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown"
  flags = ["--quick"] if args.quick else [f"--seeds={args.seeds}"]
  return {
    "command": shlex.join(["python", f"experiments/{args.study}.py", *flags]),
    "seeds": list(range(args.seeds)),
    "runs": len(records),
    "wall_time_s": round(wall, 1),
    "analyze_only": args.analyze_only,
    # Each run's own time (summary.json), also for runs finished by an earlier invocation.
    "runs_wall_time_s": round(sum(r.summary.get("wall_time_s", 0.0) for r in records), 1),
    "date": datetime.date.today().isoformat(),
    "commit": commit,
    "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores",
  }


def _meta_lines(meta: dict) -> str:
  wall = (
    "(re-analysed; see the JSON of the original run for its wall time)"
    if meta["analyze_only"]
    else f"{meta['wall_time_s']:.0f} s"
  )
  runs = (
    f" (the runs' own wall times sum to {meta['runs_wall_time_s']:.0f} s)"
    if "runs_wall_time_s" in meta
    else ""
  )
  return (
    f"Regenerate: `{meta['command']}`. Seeds {meta['seeds']}, {meta['runs']} runs, wall "
    f"time {wall}{runs}, {meta['date']}, commit {meta['commit']}, {meta['device']}."
  )
