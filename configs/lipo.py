r"""LiPO (Liu et al. 2024, arXiv 2402.01878): listwise preference optimisation on testbed lists.

Each record is k samples of the base LM for one prompt, labelled ψ_i = the response's share of
Bradley–Terry wins against the other k − 1 on the gold reward (LiPO's average-win-probability
labels). `loss` picks the listwise objective: lambda (LiPO-λ, Lambda weights with stop-gradient
ranks and a log2 discount), listmle, softmax, pair_logistic, pair_hinge (ALGORITHMS.md §3.2); each
also has its own config file. With k = 2, pair_logistic = listmle = DPO exactly.

  python -m align_jax.main --config=configs/lipo.py
  python -m align_jax.main --config=configs/lipo.py:k=8 --workdir=runs/lipo_k8
  python -m align_jax.main --config=configs/lipo.py:k=8,loss=listmle --workdir=runs/listmle_k8
  python -m align_jax.main --config=configs/lipo.py:smoke
  # The list-size ablation (get_sweep): every loss at k = 2, 4, 8, one run per seed:
  python -m align_jax.sweep --config=configs/lipo.py --local --seeds=0,1,2
  python experiments/lipo.py                   # the same runs, tabulated and plotted

Expected (default, testbed): final exact/reward and exact/ranking_accuracy above their initial
values; ABLATIONS.md §5.4: only LiPO-λ's win rate grows monotonically with k ∈ {2, 4, 8}.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  loss = "lambda"
  rest = []
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if item.startswith("loss="):
      loss = item.split("=", 1)[1]
    else:
      rest.append(item)
  if loss not in config_lib.LISTWISE:
    raise ValueError(f"config arg loss={loss!r} is unknown; known: {sorted(config_lib.LISTWISE)}")
  objective = config_lib.LISTWISE[loss]
  return config_lib.listwise(
    "lipo" if loss == "lambda" else f"lipo_{loss}", objective, ",".join(rest)
  )


def get_sweep(arg: str | None = None, quick: bool = False) -> list[str]:
  """The list-size ablation: every loss at k ∈ {2, 4, 8} (config args, one run each).

  quick: LiPO-λ and listmle at the default k = 4 (the smoke tests' programs, compiled once).
  """
  del arg
  if quick:
    return ["k=4,loss=lambda", "k=4,loss=listmle"]
  return [f"k={k},loss={loss}" for loss in config_lib.LISTWISE for k in (2, 4, 8)]
