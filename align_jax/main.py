"""python -m align_jax.main --config=configs/dpo.py [--workdir=runs/dpo] [--config.a.b=v ...]"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally `path:arg` (e.g. configs/dpo.py:smoke).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints and metrics go here (default runs/<config name>); a workdir "
    "holding a checkpoint resumes.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (launch/ scripts set this).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "With --distributed on a cluster JAX cannot detect: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator.")
flags.mark_flags_as_required(["config"])

# Errors a user can cause and fix; each is reported as one line.
_USER_ERRORS = (ValueError, FileNotFoundError, KeyError, AttributeError, TypeError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:  # Before anything touches a device.
    # Cross-process collectives for the CPU backend (no effect on accelerator backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from align_jax import train  # After distributed init: importing is cheap, devices are not.
  from align_jax.metrics import NonFiniteError
  from align_jax.preemption import Preempted

  try:
    cfg = _CONFIG.value  # Loads the file and applies the --config.* overrides.
    name = cfg.name
  except (*_USER_ERRORS, OSError) as e:
    _exit_config_error(e)
  name = name or os.path.splitext(os.path.basename(
      config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("runs", name)
  logging.info("process %d/%d, %d local devices, workdir %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), workdir)
  try:
    train.run(cfg, workdir)
  except Preempted as e:  # A clean stop: exit status 0.
    print(f"preempted: {e}; run the same command again to resume", flush=True)
  except NonFiniteError as e:
    sys.exit(f"error: {e}; stopped, last good checkpoint kept in {workdir}/checkpoints")
  except _USER_ERRORS as e:
    sys.exit(f"error: {e}")


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
  except (flags.Error, *_USER_ERRORS, OSError) as e:
    _exit_config_error(e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
