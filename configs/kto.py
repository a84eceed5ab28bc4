r"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on testbed thumbs-up/down data.

One base sample per record, desirable with probability σ((r − E_base[r|x])/T). The reference
point z0 is the clamped batch mean of log-ratios of mismatched (prompt, completion) pairs, built
once per dataset by pairing each prompt with the previous record's completion (TRL pairs them
within each batch; ALGORITHMS.md §5.6). TRL's defaults: β = 0.1, λ_D = λ_U = 1.

  python -m align_jax.main --config=configs/kto.py
  python -m align_jax.main --config=configs/kto.py:smoke --workdir=runs/kto_smoke

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "kto"
  c.objective = "kto"
  c.loss.beta = 0.1  # Inverse temperature of the implicit reward.
  c.loss.desirable_weight = 1.0  # λ_D.
  c.loss.undesirable_weight = 1.0  # λ_U.
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  return c
