r"""D2O (Duan et al. 2024, arXiv 2403.03419): negatives only, against the model's own samples.

Each record is a harmful response (a base sample conditioned on containing token h) and
data.num_samples responses sampled once from π_ref (the offline variant). The loss prefers the
distribution of self-samples over the negative: z = (β/N)Σρ(y_i) − αρ(y_l), softplus(−z)
(ALGORITHMS.md §4.1); π_r^+ = π_r^− = π_ref. α = β = 0.1 and N = 11 follow a third-party
reimplementation ([3P], unconfirmed against the paper). The exact metrics add exact/harm, the
policy's probability of a harmful response.

  python -m align_jax.main --config=configs/d2o.py
  python -m align_jax.main --config=configs/d2o.py:smoke --workdir=runs/d2o_smoke
  python -m align_jax.main --config=configs/d2o.py --config.data.num_samples=3
  # Self-sample count N ∈ {1, 3, 11} and the negatives-alone control (β = 0), per seed; N = 1
  # with α = β is DPO on (self-sample ≻ negative) pairs of the same records (ALGORITHMS.md §4.1):
  python -m align_jax.sweep --config=configs/d2o.py --local --seeds=0,1,2
  python experiments/d2o_aot.py                # with AOT and DPO, tabulated and plotted

Expected (default, testbed): summary.json's final exact/reward above its initial value and
exact/ranking_accuracy (held-out BT pairs) above its initial value; exact/kl_policy_ref reported.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "d2o"
  c.objective = "d2o"
  c.loss.beta = 0.1  # Weight β of the mean self-sample log-ratio [3P].
  c.loss.alpha = 0.1  # Weight α of the negative's log-ratio [3P].
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  c.data.num_samples = 11  # Self-samples per negative, N [3P].
  if arg.smoke:
    config_lib.smoke(c)
  return c


def get_sweep(arg: str | None = None, quick: bool = False) -> list[dict]:
  """N ∈ {1 (= DPO, α = β), 3, 11} self-samples, and β = 0 (the negatives alone, N = 11).

  quick: the default N = 11.
  """
  del arg
  if quick:
    return [{"data.num_samples": 11}]
  return config_lib.product(**{"data.num_samples": [1, 3, 11]}) + [{"loss.beta": 0.0}]
