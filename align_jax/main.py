"""python -m align_jax.main --config=configs/dpo.py [--workdir=runs/dpo] [--config.a.b=v ...]

The console shows a banner, progress lines, warnings, the final table and where the results are;
absl INFO records (parameter shardings, checkpoint manager messages) go to <workdir>/log.txt
(`--verbosity=1` shows them on the console too). A user error (`align_jax.errors.Error`: config,
data, files, a diverged run; a config file that does not parse; a full disk) is one line
`error: ...` and exit status 1; any other exception keeps its traceback. A finished (or preempted
and checkpointed) run exits 0, also when a SIGTERM arrives while the process shuts down.
"""

import errno
import logging as std_logging
import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, optionally `path:arg` (e.g. configs/dpo.py:smoke).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Checkpoints and metrics go here (default runs/<config name>); a workdir "
  "holding a checkpoint resumes.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume although hyperparameters that keep the train state's structure (align_jax/workdir.py "
  "SAFE: loss.*, optim.lr, ...) differ from the workdir's run; the change goes to metrics.jsonl.",
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() first (launch/ scripts set this)."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator", None, "With --distributed on a cluster JAX cannot detect: host:port of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator.")
flags.mark_flags_as_required(["config"])

# What a config file and its overrides can raise while loading; each is reported as one line.
_CONFIG_ERRORS = (
  ValueError,
  FileNotFoundError,
  KeyError,
  AttributeError,
  TypeError,
  OSError,
  SyntaxError,
)
# A write that failed for lack of room (or a read-only disk): one line, not a traceback.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_MAKE_ROOM = "make room, then run the same command to resume from its newest checkpoint"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:  # Before anything touches a device.
    # Cross-process collectives for the CPU backend (no effect on accelerator backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  from align_jax import errors, preemption, train  # After distributed init: cheap, devices not.
  from align_jax import workdir as workdir_lib

  preemption.listen()  # A SIGTERM from here on stops the run cleanly (or, after it, nothing).

  try:
    cfg = _CONFIG.value  # Loads the file and applies the --config.* overrides.
    name = cfg.name
  except _CONFIG_ERRORS as e:
    _exit_config_error(e)
  name = (
    name
    or os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[
      0
    ]
  )
  workdir = _WORKDIR.value or os.path.join("runs", name)
  try:
    workdir_lib.make(workdir)
  except errors.Error as e:
    sys.exit(f"error: {e}")
  _log_to_file(workdir)
  logging.info(
    "process %d/%d, %d local devices, workdir %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    workdir,
  )
  try:
    train.run(cfg, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except preemption.Preempted as e:  # A clean stop: exit status 0.
    print(f"preempted: {e}; run the same command again to resume", flush=True)
  except errors.Error as e:
    sys.exit(f"error: {e}")
  except OSError as e:
    if e.errno not in _DISK_FULL:
      raise
    where = f" ({e.filename})" if e.filename else ""
    sys.exit(f"error: {e.strerror}{where} while writing the run in {workdir}; {_MAKE_ROOM}")
  # The run is over. Python's shutdown resets a Python SIGTERM handler to the default, which would
  # kill the finished process (status 143) if a notice came now; an ignored signal stays ignored.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Brief(logging.PythonFormatter):
  """The console's log records without their tracebacks (a library's failing background thread
  logs several); log.txt keeps them in full."""

  def format(self, record):
    saved = record.exc_info, record.exc_text, record.stack_info
    record.exc_info = record.exc_text = record.stack_info = None
    try:
      return super().format(record) + (" (traceback in the workdir's log.txt)" if saved[0] else "")
    finally:
      record.exc_info, record.exc_text, record.stack_info = saved


def _unraisable_to_log(unraisable) -> None:
  """Exceptions Python ignored (TensorStore's callbacks into a closed event loop after a failed
  checkpoint write, dozens of them) go to log.txt instead of the console."""
  logging.info(
    "exception ignored in %r",
    unraisable.object,
    exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
  )


class _LogFile(std_logging.FileHandler):
  """<workdir>/log.txt; a record that cannot be written (a full disk) is dropped without a
  traceback: the run's own writes report the disk."""

  def handleError(self, record):
    del record


def _log_to_file(workdir: str) -> None:
  """absl / Python INFO records go to <workdir>/log.txt (log.<process>.txt on other processes);
  the console keeps warnings and errors unless --verbosity >= 1."""
  if flags.FLAGS.verbosity < 1:
    logging.get_absl_handler().setLevel(std_logging.WARNING)
    logging.get_absl_handler().setFormatter(_Brief())
    sys.unraisablehook = _unraisable_to_log
  index = jax.process_index()
  handler = _LogFile(os.path.join(workdir, "log.txt" if index == 0 else f"log.{index}.txt"))
  handler.setFormatter(logging.PythonFormatter())
  std_logging.getLogger().addHandler(handler)


def _exit_config_error(e: Exception):
  if isinstance(e, SyntaxError):
    sys.exit(f"error: {e.filename}:{e.lineno}: {e.msg} (the config file does not parse)")
  if isinstance(e, (AttributeError, KeyError)):
    # ml_collections raises AttributeError(KeyError(message)): str() of either is a repr with
    # literal escapes. The message is the field's repr and "\nDid you mean ...".
    text = e
    while isinstance(text, BaseException) and text.args:
      text = text.args[0]
    text = str(text)
    field, _, hint = text.partition("\n")
    hint = f"; {hint[:1].lower()}{hint[1:]}" if hint else ""
    sys.exit(
      f"error: the config has no field {' '.join(field.split())}{' '.join(hint.split())}; "
      "check the --config.* overrides"
    )
  text = str(e)
  if "Traceback (most recent call last)" in text:  # ml_collections embeds the config's traceback.
    text = text.split("Traceback (most recent call last)")[0] + text.strip().splitlines()[-1]
  sys.exit(f"error: {' '.join(text.split())}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with each failure (unknown file, bad value) as one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *_CONFIG_ERRORS) as e:
    _exit_config_error(e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
