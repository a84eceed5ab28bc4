r"""PRO (Song et al. 2023, arXiv 2306.17492): preference ranking optimisation on testbed lists.

Reference-free: length-averaged log-likelihoods are ranked against the reward order with
reward-gap temperatures, plus w·(n − 1)²·NLL of the best response (ALGORITHMS.md §5.9). The list
labels are the testbed's BT win shares (task.lists). Official defaults: w_sft = 0.05.

  python -m align_jax.main --config=configs/pro.py
  python -m align_jax.main --config=configs/pro.py:k=8,smoke

Expected (default, testbed): final exact/reward and exact/ranking_accuracy above their initial values.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed", k=4)
  c = config_lib.base()
  c.name = "pro"
  c.objective = "pro"
  c.loss.sft_weight = 0.05  # w_sft of the best response's NLL (official: 0.05).
  c.loss.temperature = True  # Reward-gap temperatures T (False: T ≡ 1).
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  c.data.list_size = arg.k
  if arg.smoke:
    config_lib.smoke(c)
  return c
