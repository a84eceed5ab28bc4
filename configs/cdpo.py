r"""cDPO: DPO with label smoothing (Mitchell 2023) on testbed preference pairs.

Cross-entropy against soft labels (1 − ε, ε): the loss is minimised at the finite margin
h = logit(1 − ε)/β instead of h → ∞. ε = 0 is DPO. ALGORITHMS.md §5.2.

  python -m align_jax.main --config=configs/cdpo.py
  python -m align_jax.main --config=configs/cdpo.py:smoke --workdir=runs/cdpo_smoke
  python -m align_jax.main --config=configs/cdpo.py --config.loss.label_smoothing=0.2

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "cdpo"
  c.objective = "cdpo"
  c.loss.beta = 0.1  # Inverse temperature of the implicit reward.
  c.loss.label_smoothing = 0.1  # ε ∈ [0, 0.5]: assumed label-flip probability.
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
