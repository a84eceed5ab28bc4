r"""ORPO (Hong et al. 2024, arXiv 2403.07691): SFT on the chosen response plus an odds-ratio term.

−ℓ_w − λ·log σ(odds(ℓ_w) − odds(ℓ_l)), odds(ℓ) = ℓ − log(1 − e^ℓ), on the length-averaged
log-likelihoods ℓ of testbed preference pairs; reference-free (`objectives.pairwise.orpo`). λ is
TRL ORPOConfig's `beta` (default 0.1, the value used here).

  python -m align_jax.main --config=configs/orpo.py
  python -m align_jax.main --config=configs/orpo.py:smoke --workdir=runs/orpo_smoke
  python -m align_jax.main --config=configs/orpo.py --config.loss.lam=0.5

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "orpo"
  c.objective = "orpo"
  c.loss.lam = 0.1  # Weight λ of the odds-ratio term (TRL's beta).
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
