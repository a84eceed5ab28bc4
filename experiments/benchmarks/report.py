"""What every benchmark records beside its figures, and how it writes them.

`results/<name>.json` holds everything; `results/<name>.md` a table of the same rows with the
environment (device, versions, date, commit, load) above it.

The host's load is recorded around each run: the load average at the start and at the end, and
the CPU time other processes took during the run (the host's busy time minus this process's and
its children's, in cores). A CPU run is not a result when the load average at the start was
above `MAX_LOAD_PER_CORE` × cores (1.5 on a 2-core machine) or other processes took more than
`MAX_OTHERS_PER_CORE` × cores (0.5 on 2 cores) during it: other work shared its cores, and
contention changes the frameworks' timings unequally (torch's threads suffer most). (The load
average at the end counts the run's own processes, which keep the cores busy by design, so it is
recorded, not judged.) A flagged run's files are still written, flagged on their first line and
with "valid": false, and `write` exits with status 3, so that a flagged figure is never mistaken
for one.
"""

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax

MAX_LOAD_PER_CORE = 0.75
MAX_OTHERS_PER_CORE = 0.25
_START = {}  # The host's and this process tree's CPU seconds when `environment` was called.
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


def _cpu_seconds() -> tuple[float, float, float]:
  """(wall clock, the host's busy CPU seconds, this process's and its reaped children's)."""
  with open("/proc/stat") as f:
    user, nice, system, _, _, irq, softirq = (int(x) for x in f.readline().split()[1:8])
  busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
  ours = sum(
    r.ru_utime + r.ru_stime
    for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  )
  return time.time(), busy, ours


def environment() -> dict:
  """Device, versions, date, commit, command and host load of this run."""
  import flax
  import jaxlib

  _START["cpu"] = _cpu_seconds()
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


def load_limit() -> float:
  """The highest load average at which this host's CPU timings count (1.5 on 2 cores)."""
  return MAX_LOAD_PER_CORE * (os.cpu_count() or 1)


def loaded(env: dict) -> str:
  """Why a CPU run's timings are not a result ('' when they are): the load average it saw."""
  if "(cpu)" not in env["device"]:
    return ""
  cores, others = os.cpu_count() or 1, env.get("other_processes_cores", 0.0)
  if env["load_average_at_start"] > load_limit():
    why = f"load average {env['load_average_at_start']:.2f} at the start, above {load_limit():.2f}"
  elif others > MAX_OTHERS_PER_CORE * cores:
    why = f"other processes used {others:.2f} cores during it, above {MAX_OTHERS_PER_CORE * cores}"
  else:
    return ""
  return f"NOT A RESULT: {why} on {cores} cores; rerun on an idle machine"


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
  """Writes results/<name>.json and results/<name>.md (with the load average at the end, and
  flagged when the host was loaded: module docstring); returns the markdown, or exits with
  status 3 after writing a flagged run."""
  os.makedirs(results_dir, exist_ok=True)
  env = {**env, "load_average_at_end": os.getloadavg()[0]}
  if "cpu" in _START:  # Other processes' CPU use over the run, in cores.
    (t0, busy0, ours0), (t1, busy1, ours1) = _START["cpu"], _cpu_seconds()
    env["other_processes_cores"] = max(busy1 - busy0 - (ours1 - ours0), 0.0) / (t1 - t0)
  flag = loaded(env)
  with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
    record = {"valid": not flag, "environment": env, "rows": rows, "notes": notes}
    json.dump({**record, **(extra or {})}, f, indent=1)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  lines = [
    f"# {name}" + (f" — {flag}" if flag else ""),
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
  if flag:
    print(text)
    print(f"{name}: {flag} (written to {results_dir}/{name}.md, flagged)", file=sys.stderr)
    sys.exit(3)
  return text
