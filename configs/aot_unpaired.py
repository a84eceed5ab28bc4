r"""AOT, unpaired (Melnyk et al. 2024; TRL "aot_unpaired") on testbed pairs.

Chosen and rejected implicit rewards log π/π_ref are sorted over the global batch separately,
so the loss asks the distribution of positives to dominate that of negatives without using
which ones were paired (ALGORITHMS.md §4.2). β as in configs/aot.py.

  python -m align_jax.main --config=configs/aot_unpaired.py
  python -m align_jax.main --config=configs/aot_unpaired.py:smoke --workdir=runs/aot_unpaired_smoke
  # β ∈ {0.05, 0.1, 0.3} (configs/dpo.py's sweep), one run per seed:
  python -m align_jax.sweep --config=configs/aot_unpaired.py --local --seeds=0,1,2
  python experiments/d2o_aot.py                # with D2O and DPO, tabulated and plotted

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "aot_unpaired"
  c.objective = "aot_unpaired"
  c.loss.beta = 0.5  # Scale of the margin in the surrogate h.
  c.loss.label_smoothing = 0.0  # ε of the logistic h (TRL).
  c.loss.h = "logistic"  # logistic | squared_hinge | least_squares.
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c


def get_sweep(arg: str | None = None, quick: bool = False) -> list[dict]:
  """β ∈ {0.05, 0.1, 0.3}, the β's of configs/dpo.py's sweep (quick: 0.1)."""
  del arg
  return config_lib.product(**{"loss.beta": [0.1] if quick else [0.05, 0.1, 0.3]})
