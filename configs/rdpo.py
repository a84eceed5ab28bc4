r"""Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409) on testbed preference pairs.

Unbiased for the clean-label DPO loss under symmetric label noise of rate ε (TRL's "robust"
loss, ALGORITHMS.md §5.2). The testbed's BT labels are noisy by construction.

  python -m align_jax.main --config=configs/rdpo.py
  python -m align_jax.main --config=configs/rdpo.py:smoke --workdir=runs/rdpo_smoke

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "rdpo"
  c.objective = "rdpo"
  c.loss.beta = 0.1  # Inverse temperature of the implicit reward.
  c.loss.label_smoothing = 0.1  # ε ∈ [0, 0.5): the assumed symmetric flip rate.
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c, rlhf_target=True)
  if arg.smoke:
    config_lib.smoke(c)
  return c
