r"""SLiC-HF (Zhao et al. 2023, arXiv 2305.10425), the original reference-free form.

max(0, δ − log π(y_w) + log π(y_l)) − λ·log π(y_w): rank calibration on the policy's own
log-likelihoods plus a cross-entropy regulariser towards the chosen response (ALGORITHMS.md §5.4).
δ = 1 and λ = 0.5 are recalled values, not confirmed against the paper ([M]); the
reference-normalised hinge max(0, 1 − βh) is `list_pair_hinge` with list size 2.

  python -m align_jax.main --config=configs/slic.py
  python -m align_jax.main --config=configs/slic.py:smoke --workdir=runs/slic_smoke

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "slic"
  c.objective = "slic"
  c.loss.delta = 1.0  # Calibration margin δ on the log-likelihood gap [M].
  c.loss.lam = 0.5  # Weight λ of the cross-entropy regulariser [M].
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
