r"""A run's trained parameters as a Hugging Face directory.

  python -m align_jax.export --workdir=runs/dpo --out=/path/to/hf_out [--dtype=bfloat16] [--step=N]

The run's config.json gives the architecture (`model.family` picks the transformers class); the
parameters are those of its newest checkpoint (or `--step`). A LoRA run's checkpoint holds only
adapters: they are merged into its frozen base (`init_checkpoint`) and the merged model is written.
A run that started from a Hugging Face directory (`init_checkpoint`) passes on its special token
ids and tokenizer / generation files.
The result loads with `transformers.AutoModelForCausalLM.from_pretrained(out)`. One process.
"""

import functools
import json
import os
import sys

import jax
import ml_collections as mlc
from absl import app, flags

from align_jax import checkpoint, errors, models
from align_jax.models import hf, loading, lora
from align_jax.testbed import base as testbed_base
from align_jax.errors import CheckpointError, MissingFileError

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (config.json, checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "The Hugging Face directory to write.")
_DTYPE = flags.DEFINE_string("dtype", "", "Stored dtype (e.g. bfloat16); default: the params'.")
_STEP = flags.DEFINE_integer("step", 0, "Checkpoint step to export; 0: the newest.")


def export(workdir: str, out: str, *, step: int = 0, dtype: str = "") -> int:
  """Writes the params of `workdir`'s checkpoint at `step` (0: newest) to `out`; returns the step.

  A LoRA run's adapters are merged into its base first (`lora.merge`).
  """
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise MissingFileError(f"--workdir {workdir!r}: no config.json (not a run directory)")
  try:
    with open(config_path) as f:
      run_cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"--workdir {workdir!r}: its config.json is not JSON ({e})") from None
  if not isinstance(run_cfg, dict) or not isinstance(run_cfg.get("model"), dict):
    kind = "a Hugging Face model directory" if hf.is_hf_dir(workdir) else "not a run directory"
    raise CheckpointError(f"--workdir {workdir!r}: its config.json has no model section ({kind})")
  model_cfg = models.ModelConfig(**run_cfg["model"])
  _, shapes, names = models.abstract(model_cfg)
  lora_cfg = mlc.ConfigDict(run_cfg.get("lora", {"rank": 0}))
  trained = lora.abstract(shapes, names, lora_cfg) if lora.enabled(lora_cfg) else shapes
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step, params = checkpoint.load_state_params(
    os.path.join(workdir, "checkpoints"),
    checkpoint.abstract_like(trained, jax.tree.map(lambda _: device, trained)),
    step or None,
  )
  if lora.enabled(lora_cfg):
    base = _lora_base(mlc.ConfigDict(run_cfg), model_cfg, jax.tree.map(lambda _: device, shapes))
    params = lora.merge(base, params, lora_cfg)
  source = run_cfg.get("init_checkpoint", "")
  hf.save(
    out, params, model_cfg, source_dir=source if hf.is_hf_dir(source) else None, dtype=dtype or None
  )
  return step


def _lora_base(cfg, model_cfg, shardings) -> dict:
  """A LoRA run's frozen base: its init_checkpoint, or the fresh init of its seed."""
  if not cfg.init_checkpoint:  # As the run draws it.
    return jax.jit(functools.partial(models.init_params, model_cfg), out_shardings=shardings)(
      jax.random.key(cfg.seed)
    )
  path = cfg.init_checkpoint
  if path == "testbed":  # The cached testbed base LM the run started from.
    path = os.path.join(
      testbed_base.base_dir(cfg.testbed, testbed_base.language_model(cfg.model)), "params"
    )
  return loading.read_lm(path, model_cfg, shardings)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    step = export(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value)
  except errors.Error as e:
    sys.exit(f"error: {e}")
  print(f"exported step {step} of {_WORKDIR.value} to {_OUT.value}", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
