r"""RLOO (Ahmadian et al. 2024, arXiv 2402.14740): REINFORCE with a leave-one-out baseline.

K = rollout.num_policy samples per prompt; each sample's advantage is its KL-penalised reward
r − β·log(π/π_ref) minus the mean of the other K − 1 samples' — unbiased, no value network. The
exact metrics compare the policy with the optimum π_ref·exp(r/β) of E_π[r] − β·KL(π‖π_ref).

  python -m align_jax.main --config=configs/rloo.py
  python -m align_jax.main --config=configs/rloo.py:smoke
  python -m align_jax.main --config=configs/rloo.py --config.loss.beta=0.3 --config.rollout.num_policy=8
  # BOND's comparator (get_sweep): 2 samples per prompt at several β
  # (experiments/jbond_vs_reinforce.py):
  python -m align_jax.sweep --config=configs/rloo.py --local --seeds=0,1,2

Expected (default): exact/reward rises and exact/kl_policy_target falls.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "rloo"
  c.objective = "rloo"
  config_lib.set_model(c, arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 4  # K ≥ 2 samples per prompt for the leave-one-out baseline.
  c.loss.beta = 1.0  # KL coefficient of the penalised reward.
  c.target.kind = "rlhf"
  c.target.beta = c.loss.get_ref("beta")
  if arg.smoke:
    config_lib.smoke(c)
  return c


def get_sweep(arg: str | None = None, quick: bool = False) -> list[dict]:
  """REINFORCE-LOO with 2 samples per prompt (BOND's Figure 7 baseline) at β_RL ∈ {0.1, 0.3, 1, 3}:
  the paper's {0.001, …, 1} rescaled to the testbed's reward, so that the optima's KL(π_β‖π_ref)
  (≈ 4.7, 2.9, 0.8, 0.1 nats) bracket BOND's BoN_N curve (ABLATIONS.md §4.2). quick: the config
  itself (4 samples, β_RL = 1: the smoke tests' program, so a test session compiles it once).
  """
  del arg
  if quick:
    return [{"loss.beta": 1.0}]
  return config_lib.product(**{"rollout.num_policy": [2], "loss.beta": [0.1, 0.3, 1.0, 3.0]})
