r"""BCO (Jung et al. 2024, arXiv 2404.04656) on testbed thumbs-up/down data.

The implicit reward β·log(π/π_ref) as the logit of a desirable-vs-undesirable classifier, shifted
by δ, the running mean of every reward seen (updated with the batch before the loss; kept in the
train state and checkpointed). ALGORITHMS.md §5.7; TRL's default β = 0.1.

  python -m align_jax.main --config=configs/bco.py
  python -m align_jax.main --config=configs/bco.py:smoke --workdir=runs/bco_smoke
  # Underlying-distribution matching: undesirable examples weighted by clip(p̂/(1−p̂), 0.5, 10)
  # of a class-balanced logistic classifier on prompt embeddings (TRL's defaults):
  python -m align_jax.main --config=configs/bco.py --config.data.udm=True

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "bco"
  c.objective = "bco"
  c.loss.beta = 0.1  # Inverse temperature of the implicit reward.
  c.loss.delta_momentum = -1.0  # < 0: δ = mean of everything seen (TRL); in [0, 1): EMA.
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
