"""What every benchmark records beside its figures, and how it writes them.

`results/<name>.json` holds everything; `results/<name>.md` a table of the same rows with the
environment (device, versions, date, commit, load) above it.
"""

import datetime
import json
import os
import platform
import resource
import subprocess
import sys

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _commit() -> str:
  def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

  commit = git("rev-parse", "HEAD") or "unknown"
  changed = git(
    "status",
    "--porcelain",
    "--untracked-files=no",
    "--",
    "align_jax",
    "configs",
    "experiments/benchmarks",
  )
  return commit + (" (+ uncommitted changes)" if changed else "")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(
        (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
        platform.processor(),
      )
  except OSError:
    return platform.processor()


def environment() -> dict:
  """Device, versions, date, commit, command and host load of this run."""
  import flax
  import jaxlib

  device = jax.devices()[0]
  return {
    "device": f"{device.device_kind} ({device.platform}) x{jax.device_count()}",
    "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
    "load_average_at_start": os.getloadavg()[0],
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "python": platform.python_version(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "commit": _commit(),
    "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
  }


def peak_memory() -> tuple[float, str]:
  """(GiB, what it is): the device's peak bytes in use where the backend reports them, else the
  process's peak resident set (CPU backends report no device memory statistics)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**30, "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (CPU)"


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
  return str(v)


def write(
  name: str,
  env: dict,
  rows: list[dict],
  notes: list[str],
  extra: dict | None = None,
  results_dir: str = RESULTS,
) -> str:
  """Writes results/<name>.json and results/<name>.md; returns the markdown."""
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
    json.dump({"environment": env, "rows": rows, "notes": notes, **(extra or {})}, f, indent=1)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  lines = [
    f"# {name}",
    "",
    *(f"- {k}: {v}" for k, v in env.items()),
    "",
    "| " + " | ".join(columns) + " |",
    "|" + "---|" * len(columns),
  ]
  lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
  lines += ["", *(f"- {n}" for n in notes), ""]
  text = "\n".join(lines)
  with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
    f.write(text)
  return text
