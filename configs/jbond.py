r"""J-BOND (Sessa et al. 2024, arXiv 2407.14622, §2.6 of ALGORITHMS.md): BOND with 1 + 2 samples and an EMA anchor.

Per prompt: one policy sample and two anchor samples. Forward term: NLL of the better anchor
sample (a BoN_2 sample of the anchor); backward term: policy gradient with the crude 2-sample
quantile reward r_J = −log 16 when the policy sample is worse than both anchor samples, else 0;
plus γ times the policy-gradient estimate of KL(π‖π_anchor). After every update the anchor moves,
θ_a ← (1 − η)·θ_a + η·θ (rollout.anchor_ema = η). β = 0.5 [3P/M], η = 0.02 [3P], γ unconfirmed
(here 0.5, ABLATIONS.md §4.2 grid {0, 0.5, 1, 2}). The paper's backward return also carries
−log π/π_anchor (ABLATIONS.md §1.2): loss.kl_in_backward, off by default so that γ alone weighs the
anchor KL. Its gradient equals the γ term's with weight β, so the paper's form (kl_in_backward=True,
γ = 0) trains exactly as the default γ = β = 0.5 (`objectives.bond.jbond`).

  python -m align_jax.main --config=configs/jbond.py
  python -m align_jax.main --config=configs/jbond.py:smoke
  python -m align_jax.main --config=configs/jbond.py --config.rollout.anchor_ema=0.05 --config.loss.gamma=1.0
  # γ ∈ {0, 0.5} (get_sweep); experiments/jbond_vs_reinforce.py sets them against RLOO:
  python -m align_jax.sweep --config=configs/jbond.py --local --seeds=0,1,2

Expected (default): exact/reward rises over the run while exact/kl_policy_ref stays finite and is
reported; the anchor (an EMA of the policy) is part of the checkpoint.
"""

import math

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "jbond"
  c.objective = "jbond"
  config_lib.set_model(c, arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 1
  c.rollout.num_anchor = 2
  c.rollout.anchor = "ema"
  c.rollout.anchor_ema = 0.02  # η [3P].
  c.loss.beta = 0.5  # Jeffreys mix [3P/M].
  c.loss.gamma = 0.5  # Weight of the KL-to-anchor term (unconfirmed).
  c.loss.log_penalty = -math.log(16.0)  # r_J of a sample worse than both anchor samples [3P].
  c.loss.kl_in_backward = False
  c.target.kind = "bon"  # Exact divergences to BoN_2 of the reference, a first waypoint.
  c.testbed.target_n = 2
  if arg.smoke:
    config_lib.smoke(c)
  return c


def get_sweep(arg: str | None = None, quick: bool = False) -> list[dict]:
  """The anchor-KL weight γ ∈ {0 (the paper's Figure 5 setting), 0.5 (this config's)}.

  quick: 0.5.
  """
  del arg
  return config_lib.product(**{"loss.gamma": [0.5] if quick else [0.0, 0.5]})
