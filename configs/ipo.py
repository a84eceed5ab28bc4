r"""IPO (Azar et al. 2023, arXiv 2310.12036) on testbed preference pairs.

Squared loss (h − 1/(2τ))² regressing the log-ratio margin onto a finite target, ALGORITHMS.md
§5.3. The default sums log-ratios over tokens (the paper's eq. 17); `loss.per_token=True` uses
length-averaged log-ratios (the IPO authors' setting, and TRL's: set it to compare with TRL). The
testbed's responses all have the same length, so it only rescales h there.

  python -m align_jax.main --config=configs/ipo.py
  python -m align_jax.main --config=configs/ipo.py:smoke --workdir=runs/ipo_smoke

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "ipo"
  c.objective = "ipo"
  c.loss.tau = 0.5  # Regularisation τ > 0: the target margin is 1/(2τ).
  c.loss.per_token = False  # True: length-averaged log-ratios (÷ completion length), as TRL.
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
