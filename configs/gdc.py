r"""GDC / DPG (Khalifa et al. 2021, arXiv 2012.11635): f-DPG with forward KL on a pointwise constraint.

A preset of configs/fdpg.py (divergence=forward_kl, task=pointwise): the target is the base LM
conditioned on its response containing token g, p = a(·|b = 1), and the policy distils it with
the DPG estimator (pseudo-reward p/π, here with the exact baseline B = 1 of forward KL).

  python -m align_jax.main --config=configs/gdc.py
  python -m align_jax.main --config=configs/gdc.py:smoke

Expected (default): exact/kl_target_policy = KL(p‖π) falls by more than half from the base, and
exact/constraint_rate rises from the base's rate towards 1.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "gdc"
  c.objective = "fdpg"
  config_lib.set_model(c, arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 4
  c.loss.divergence = "forward_kl"
  c.loss.alpha = 0.5
  c.loss.outside_support = "limit"  # Pseudo-reward 0 where b = 0, so the baseline pushes away.
  c.loss.baseline = "exact"  # B = E_π[p/π] = 1 (DPG with baseline, Korbak et al. 2022).
  c.loss.baseline_window = 1024
  c.loss.proposal_criterion = "kl"  # Offline proposal: q ← π when D(p‖π) < D(p‖q) by kl | tv.
  c.loss.clip_log_ratio = 0.0
  c.target.kind = "pointwise"
  if arg.smoke:
    config_lib.smoke(c)
  return c
