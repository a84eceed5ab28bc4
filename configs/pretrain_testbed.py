r"""Pretrain the testbed's base LM by maximum likelihood (the `sft` objective) on ToyLang samples.

Every testbed config starts from this model (`init_checkpoint="testbed"`) and pretrains it on first
use, caching it under $XDG_CACHE_HOME/align_jax (default ~/.cache/align_jax), keyed by the testbed
and model settings. Run this file to inspect the pretraining itself:

  python -m align_jax.main --config=configs/pretrain_testbed.py --workdir=runs/pretrain
  python -m align_jax.main --config=configs/pretrain_testbed.py:smoke

Expected (default): exact/kl_target_policy = KL(chain ‖ base) over responses given prompts falls
from ≈1 nat at random init to ≈0.01–0.03 nats.
"""

from align_jax import config_lib, models
from align_jax.testbed import base


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.model = models.preset(arg.model)
  if arg.smoke:
    config_lib.smoke(c)
  return base.pretrain_config(c.testbed, c.model, seed=c.seed)
