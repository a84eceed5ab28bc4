"""python -m align_jax.main --config=configs/dpo.py [--workdir=runs/dpo] [--config.a.b=v ...]

The console shows a banner, progress lines, warnings, the final table and where the results are;
absl INFO records (parameter shardings, checkpoint manager messages) go to <workdir>/log.txt
(`--verbosity=1` shows them on the console too). A user error (`align_jax.errors.Error`: config,
data, files) is one line `error: ...` and exit status 1; any other exception keeps its traceback.
"""

import logging as std_logging
import os
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
_CONFIG_ERRORS = (ValueError, FileNotFoundError, KeyError, AttributeError, TypeError, OSError)


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
  from align_jax import errors, train  # After distributed init: importing is cheap, devices not.
  from align_jax.metrics import NonFiniteError
  from align_jax.preemption import Preempted

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
  _log_to_file(workdir)
  logging.info(
    "process %d/%d, %d local devices, workdir %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    workdir,
  )
  try:
    train.run(cfg, workdir)
  except Preempted as e:  # A clean stop: exit status 0.
    print(f"preempted: {e}; run the same command again to resume", flush=True)
  except NonFiniteError as e:
    sys.exit(f"error: {e}; stopped, last good checkpoint kept in {workdir}/checkpoints")
  except errors.Error as e:
    sys.exit(f"error: {e}")


def _log_to_file(workdir: str) -> None:
  """absl / Python INFO records go to <workdir>/log.txt (log.<process>.txt on other processes);
  the console keeps warnings and errors unless --verbosity >= 1."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    sys.exit(f"error: --workdir {workdir!r}: {e.strerror}")
  if flags.FLAGS.verbosity < 1:
    logging.get_absl_handler().setLevel(std_logging.WARNING)
  index = jax.process_index()
  handler = std_logging.FileHandler(
    os.path.join(workdir, "log.txt" if index == 0 else f"log.{index}.txt")
  )
  handler.setFormatter(logging.PythonFormatter())
  std_logging.getLogger().addHandler(handler)


def _exit_config_error(e: Exception):
  if isinstance(e, (AttributeError, KeyError)):
    sys.exit(f"error: the config has no field {e}; check the --config.* overrides")
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
