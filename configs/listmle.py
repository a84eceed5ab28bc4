r"""LiPO family (ALGORITHMS.md §3.2): ListMLE, the Plackett–Luce likelihood of the label order (LiPO's DPO_PL).

Testbed ranked lists as in configs/lipo.py, scores s = β·log(π/π_ref). Args: smoke, model, k.

  python -m align_jax.main --config=configs/listmle.py
  python -m align_jax.main --config=configs/listmle.py:k=8,smoke

Expected (default, testbed): final exact/reward and exact/ranking_accuracy above their initial values.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.listwise("listmle", "listmle", arg)
