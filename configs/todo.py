r"""TODO, tie-rank oriented DPO (Guo et al., ICLR 2025, arXiv 2411.02442) on ternary data.

Pairs labelled win / lose / tie by the Rao–Kupper model with tie parameter testbed.tie_alpha on
the gold reward; the loss is the negative log-likelihood of the same model on the implicit reward
margin βh (ALGORITHMS.md §5.8). The official configs use α = 0.5 and β = 0.01 at 7–8B scale.

  python -m align_jax.main --config=configs/todo.py
  python -m align_jax.main --config=configs/todo.py:smoke --workdir=runs/todo_smoke
  python -m align_jax.main --config=configs/todo.py --config.testbed.tie_alpha=1.0

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "todo"
  c.objective = "todo"
  c.loss.beta = 0.1  # Inverse temperature of the implicit reward.
  c.loss.alpha = 0.5  # Tie parameter α > 0 (official: 0.5).
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
