r"""A run's trained parameters as a Hugging Face directory.

  python -m align_jax.export --workdir=runs/dpo --out=/path/to/hf_out [--dtype=bfloat16] [--step=N]

The run's config.json gives the architecture (`model.family` picks the transformers class); the
parameters are those of its newest checkpoint (or `--step`). A run that started from a Hugging Face
directory (`init_checkpoint`) passes on its special token ids and tokenizer / generation files.
The result loads with `transformers.AutoModelForCausalLM.from_pretrained(out)`. One process.
"""

import json
import os
import sys
from collections.abc import Callable, Sequence

import jax
from absl import app, flags

from align_jax import checkpoint, models
from align_jax.models import hf

# A transformation of the trained parameters before they are saved: (params, the run's config as
# a dict) -> params. E.g. merging LoRA adapters into the base weights.
Transform = Callable[[dict, dict], dict]

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (config.json, checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "The Hugging Face directory to write.")
_DTYPE = flags.DEFINE_string("dtype", "", "Stored dtype (e.g. bfloat16); default: the params'.")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step to export; 0: the newest.")


def export(workdir: str, out: str, *, step: int = 0, dtype: str = "",
           transforms: Sequence[Transform] = ()) -> int:
  """Writes the params of `workdir`'s checkpoint at `step` (0: newest) to `out`; returns the step.

  `transforms` are applied in order to the restored params before saving.
  """
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"--workdir {workdir!r}: no config.json (not a run directory)")
  with open(config_path) as f:
    run_cfg = json.load(f)
  model_cfg = models.ModelConfig(**run_cfg["model"])
  _, shapes, _ = models.abstract(model_cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step, params = checkpoint.load_state_params(
      os.path.join(workdir, "checkpoints"),
      checkpoint.abstract_like(shapes, jax.tree.map(lambda _: device, shapes)), step or None)
  for transform in transforms:
    params = transform(params, run_cfg)
  source = run_cfg.get("init_checkpoint", "")
  hf.save(out, params, model_cfg, source_dir=source if hf.is_hf_dir(source) else None,
          dtype=dtype or None)
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    step = export(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value)
  except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
    sys.exit(f"error: {e}")
  print(f"exported step {step} of {_WORKDIR.value} to {_OUT.value}", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
