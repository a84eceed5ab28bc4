r"""LiPO family (ALGORITHMS.md §3.2): the pair-hinge list loss (SLiC with reference-normalised scores; RSO's hinge at list size 2).

Testbed ranked lists as in configs/lipo.py, scores s = β·log(π/π_ref). Args: smoke, model, k.

  python -m align_jax.main --config=configs/list_pair_hinge.py
  python -m align_jax.main --config=configs/list_pair_hinge.py:k=8,smoke

Expected (default, testbed): final exact/reward and exact/ranking_accuracy above their initial values.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.listwise("list_pair_hinge", "list_pair_hinge", arg)
