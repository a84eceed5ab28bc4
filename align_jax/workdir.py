"""A workdir belongs to one run: a lock for the run's life, a fingerprint checked on resume.

`train.run` enters `claim(path, config)` before it writes or deletes anything in the workdir:

1. **Lock.** Each process holds an exclusive `flock` on its own file, `run.lock` (process 0) or
   `run.<i>.lock` (process i of a multi-process run), until the run ends. The kernel drops the lock
   when its process exits or dies, so a lock is never stale. A second run in the workdir finds it
   held and stops with one line naming the holder's pid and host (the file's content).
2. **Fingerprint.** The resolved config minus `FREE`, the fields that only say when the run stops,
   logs, evaluates and saves, and how it is laid out on devices. Once the workdir holds a
   checkpoint, a run whose fingerprint differs from the recorded one (`fingerprint.json`) stops
   with one line listing each field, old → new. Fields matching `SAFE` (hyperparameters that keep
   the train state's structure) may change with `allow_change` (`--allow_config_change`); the
   change is returned for metrics.jsonl. Any other change needs a new workdir.
3. **Record.** Once the run has restored its state (`Claim.record`), `config.json` and
   `fingerprint.json` are written (by process 0); a previous `config.json` that differs is kept as
   `config.<n>.json`. A run that fails before (bad data, every checkpoint damaged) leaves the
   workdir as it found it, but for its lock file and log.txt.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from absl import logging

from align_jax.errors import CheckpointError, ConfigError

# Fields a resume may change freely: they do not change what the run computes.
FREE = (
  "name",
  "total_steps",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "keep_checkpoints",
  "async_checkpointing",
  "mesh.*",  # A checkpoint restores onto another mesh.
  "rules",
  "testbed.eval_chunk",
  "testbed.exact_eval",
  "data.eval_source",  # Validation records only (data.eval_fraction changes what is trained on).
)
# Fields `--allow_config_change` lets a resume change: the restored state keeps its structure.
# (Not optim.clip_norm: clipping on or off changes the optimizer state's structure.)
SAFE = (
  "loss.*",
  "optim.lr",
  "optim.warmup_steps",
  "optim.schedule",
  "optim.b1",
  "optim.b2",
  "optim.eps",
  "optim.weight_decay",
  "sampling.temperature",
  "sampling.top_k",
  "sampling.top_p",
  "rollout.anchor_ema",
  "rollout.anchor_every",
  "target.beta",  # DPO-style configs tie it to loss.beta (the RLHF target of their evaluation).
  "data.precompute_ref",
)
CHECKPOINTS = "checkpoints"  # The workdir's Orbax directory.
_FINGERPRINT = "fingerprint.json"
_ABSENT = "(absent)"


def fingerprint(config: dict) -> dict[str, Any]:
  """{flat key ("optim.lr"): value} of a resolved config (nested dict, as in config.json), FREE
  fields left out."""
  return {k: v for k, v in _flatten(config).items() if not _matches(k, FREE)}


def changes(old: dict, new: dict, defaults: dict | None = None) -> dict[str, list]:
  """{key: [old, new]} of the fingerprint fields that differ ("(absent)" for a missing one). A
  field the old run did not have, at its default (`defaults`: a fingerprint of the base config),
  is no change: a field a newer align_jax added, at the value that keeps the old behaviour."""
  defaults = defaults or {}
  keys = sorted(old.keys() | new.keys())
  pairs = {k: [old.get(k, _ABSENT), new.get(k, _ABSENT)] for k in keys}
  added = {k for k in new.keys() - old.keys() if k in defaults and new[k] == defaults[k]}
  return {k: v for k, v in pairs.items() if v[0] != v[1] and k not in added}


@dataclasses.dataclass(frozen=True)
class Claim:
  """A locked workdir whose fingerprint allows the run (`claim`)."""

  path: str
  config: dict  # The run's resolved config.
  changes: dict[str, list]  # The fingerprint changes `allow_change` let through: {key: [old, new]}.
  process: int

  def record(self) -> None:
    """Writes config.json and fingerprint.json (process 0), once the run has restored its state:
    a run that fails before leaves the workdir as it found it."""
    if self.process == 0:
      _record(self.path, self.config)


@contextlib.contextmanager
def claim(
  path: str,
  config: dict,
  *,
  allow_change: bool = False,
  process: int = 0,
  defaults: dict | None = None,
) -> Iterator[Claim]:
  """Within: `path` is this run's, locked and its fingerprint checked (`defaults`: the base
  config, nested as `config`, whose values a field the recorded run lacked may take); nothing
  else is written."""
  make(path)
  with _lock(path, process):
    yield Claim(path, config, _check(path, config, allow_change, defaults), process)


def make(path: str) -> None:
  """Creates the workdir `path`; a CheckpointError if it is a file or cannot be created."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise CheckpointError(f"workdir {path!r} is a file, not a directory; use another --workdir")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise CheckpointError(f"workdir {path!r} cannot be created: {e.strerror}") from None


@contextlib.contextmanager
def _lock(path: str, process: int) -> Iterator[None]:
  """An exclusive flock on this process's lock file, held within; its content names the holder."""
  name = os.path.join(path, "run.lock" if process == 0 else f"run.{process}.lock")
  fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)  # Not truncated: the holder's line stays.
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 500, 0).decode(errors="replace").strip() or "another run"
      raise CheckpointError(
        f"workdir {path!r} is in use by {holder} (lock {name}); wait for that run to end, "
        "stop it, or use another --workdir"
      ) from None
    except OSError as e:  # A filesystem without flock (some network mounts): run unlocked.
      logging.warning("workdir %s cannot be locked (%s); running without a lock", path, e)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n".encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)  # Releases the lock.


def _check(path: str, config: dict, allow_change: bool, defaults: dict | None) -> dict[str, list]:
  """The allowed changes against the recorded fingerprint; a ConfigError for any other."""
  recorded = os.path.join(path, _FINGERPRINT)
  if not (_holds_checkpoints(path) and os.path.exists(recorded)):
    return {}  # Nothing to resume: the run starts at step 1 whatever it was before.
  try:
    with open(recorded) as f:
      old = json.load(f)["fields"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
      f"{recorded} cannot be read ({type(e).__name__}: {e}); restore it or use another --workdir"
    ) from None
  changed = changes(old, fingerprint(config), fingerprint(defaults or {}))
  if not changed:
    return {}
  listed = ", ".join(f"{k} {_show(a)} → {_show(b)}" for k, (a, b) in changed.items())
  head = f"workdir {path!r} holds checkpoints of a run with another config: {listed}"
  fixed = [k for k in changed if not _matches(k, SAFE)]
  if fixed:
    raise ConfigError(f"{head}; {', '.join(fixed)} cannot change on resume: use a new --workdir")
  if not allow_change:
    raise ConfigError(
      f"{head}; to resume with the change pass --allow_config_change (it is recorded in "
      "metrics.jsonl), or use a new --workdir"
    )
  print(f"resuming with a changed config (--allow_config_change): {listed}", flush=True)
  return changed


def _record(path: str, config: dict) -> None:
  """Writes config.json (keeping a different previous one as config.<n>.json) and the
  fingerprint, each atomically."""
  text = json.dumps(config, indent=1, sort_keys=True)
  current = os.path.join(path, "config.json")
  if os.path.exists(current):
    with open(current) as f:
      previous = f.read()
    if previous.rstrip("\n") != text:
      taken = [n for n in os.listdir(path) if n.startswith("config.") and n[7:-5].isdigit()]
      number = 1 + max((int(n[7:-5]) for n in taken), default=0)
      os.replace(current, os.path.join(path, f"config.{number}.json"))
  _write(current, text)
  fields = fingerprint(config)
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
  _write(
    os.path.join(path, _FINGERPRINT), json.dumps({"sha256": digest, "fields": fields}, indent=1)
  )


def _holds_checkpoints(path: str) -> bool:
  directory = os.path.join(path, CHECKPOINTS)
  return os.path.isdir(directory) and bool(os.listdir(directory))


def _write(path: str, text: str) -> None:
  staged = f"{path}.tmp{os.getpid()}"
  with open(staged, "w") as f:
    f.write(text + "\n")
  os.replace(staged, path)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      flat |= _flatten(v, f"{prefix}{k}.")
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
  return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def _show(value) -> str:
  return value if value is _ABSENT else json.dumps(value)
