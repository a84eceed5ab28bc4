r"""SimPO (Meng et al. 2024, arXiv 2405.14734): reference-free, length-normalised preference loss.

−log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ) on testbed preference pairs; no reference model
is loaded for training (`objectives.pairwise.simpo`). TRL: `CPOTrainer` with loss_type="simpo",
cpo_alpha=0, beta = β, simpo_gamma = γ; the authors' code: gamma_beta_ratio = γ/β. β = 2 and
γ/β = 0.5 lie in the range the authors tune over (recalled, not re-read: [M]).

  python -m align_jax.main --config=configs/simpo.py
  python -m align_jax.main --config=configs/simpo.py:smoke --workdir=runs/simpo_smoke
  python -m align_jax.main --config=configs/simpo.py --config.loss.beta=2.5 --config.loss.gamma=1.4

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "simpo"
  c.objective = "simpo"
  c.loss.beta = 2.0  # Scale β of the length-averaged log-likelihood reward [M].
  c.loss.gamma = 1.0  # Target reward margin γ (γ/β = 0.5) [M].
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
