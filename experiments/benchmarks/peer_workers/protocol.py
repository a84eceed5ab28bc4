"""What every peer worker shares: the spec, the data, and the timing protocol (stdlib + numpy).

A worker is started by peers.py with a JSON spec as its one argument, in its framework's venv.
It builds the model and trainer, then calls `Clock.step_done()` after every optimizer update. The
clock reports `ready` after the warm-up updates, then waits for a `go` line on stdin before each
timed chunk of `steps` updates and reports the chunk's wall time and the process's CPU time
(all threads). Lines for peers.py start with
MARK; everything else a framework prints is ignored.
"""

import json
import sys
import time

import numpy as np

MARK = "@@bench "


def spec() -> dict:
  return json.loads(sys.argv[1])


def pairs(s: dict) -> dict[str, np.ndarray]:
  """The same B preference pairs for every framework: prompt [B, P], chosen and rejected [B, N].

  Ids are drawn from [2, V) (0 = pad, 1 = EOS for TRL's tokenizer) and every response ends with
  EOS, so TRL's added EOS changes no length: each sequence has P + N tokens, N of them scored.
  """
  rng = np.random.default_rng(s["seed"])
  B, P, N, V = s["batch"], s["prompt_len"], s["response_len"], s["model"]["vocab_size"]
  out = {
    "prompt": rng.integers(2, V, (B, P)),
    "chosen": rng.integers(2, V, (B, N)),
    "rejected": rng.integers(2, V, (B, N)),
  }
  out["chosen"][:, -1] = out["rejected"][:, -1] = 1
  return {k: v.astype(np.int32) for k, v in out.items()}


def send(**msg) -> None:
  print(MARK + json.dumps(msg), flush=True)


class Clock:
  """Counts updates; times chunks of s["steps"] after s["warmup"] untimed ones."""

  def __init__(self, s: dict):
    self.warmup, self.steps, self.reps = s["warmup"], s["steps"], s["reps"]
    self.total = self.warmup + self.steps * self.reps
    self.count, self.t0, self.cpu0 = 0, None, None

  def step_done(self, sync=lambda: None, **info) -> None:
    """Call after each update; `sync` waits for it to finish (async frameworks)."""
    self.count += 1
    done = self.count - self.warmup
    if done < 0 or done % self.steps:
      return
    sync()
    if done:
      send(
        seconds=time.perf_counter() - self.t0, cpu_seconds=time.process_time() - self.cpu0, **info
      )
    else:
      send(ready=True, **info)
    if self.count < self.total:
      if sys.stdin.readline().strip() != "go":
        sys.exit(0)
      self.t0, self.cpu0 = time.perf_counter(), time.process_time()
