r"""Length-normalised DPO (Ahrabian et al. 2024, arXiv 2407.15229) on testbed pairs.

DPO on per-token log-ratios (TRL's "sigmoid_norm", ALGORITHMS.md §5.5). Margins shrink by about
1/length, so β is larger than DPO's (here β·4 tokens ≈ DPO's 0.1 × 4). The paper's recommended β is
not confirmed ([M]).

  python -m align_jax.main --config=configs/ln_dpo.py
  python -m align_jax.main --config=configs/ln_dpo.py:smoke --workdir=runs/ln_dpo_smoke

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "ln_dpo"
  c.objective = "ln_dpo"
  c.loss.beta = 0.4  # Inverse temperature of the per-token implicit reward [M].
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
