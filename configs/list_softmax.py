r"""LiPO family (ALGORITHMS.md §3.2): ListNet softmax cross-entropy with targets ψ/Σψ.

Testbed ranked lists as in configs/lipo.py, scores s = β·log(π/π_ref). Args: smoke, model, k.

  python -m align_jax.main --config=configs/list_softmax.py
  python -m align_jax.main --config=configs/list_softmax.py:k=8,smoke

Expected (default, testbed): final exact/reward and exact/ranking_accuracy above their initial values.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.listwise("list_softmax", "list_softmax", arg)
