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
flags.mark_flags_as_required(["config"])

# Errors a user can cause and fix; each is reported as one line.
_USER_ERRORS = (ValueError, FileNotFoundError, KeyError, AttributeError, TypeError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()  # Before anything touches a device.
  from align_jax import train  # After distributed init: importing is cheap, devices are not.
  from align_jax.metrics import NonFiniteError

  cfg = _CONFIG.value
  name = cfg.name or os.path.splitext(os.path.basename(
      config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("runs", name)
  logging.info("process %d/%d, %d local devices, workdir %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), workdir)
  try:
    train.run(cfg, workdir)
  except NonFiniteError as e:
    sys.exit(f"error: {e}; stopped, last good checkpoint kept in {workdir}/checkpoints")
  except _USER_ERRORS as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
