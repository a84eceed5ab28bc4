r"""A Bradley–Terry reward model trained on testbed preference pairs.

The model is the testbed base LM's body with a scalar head (model.num_scores = 1) read at each
response's last token; the loss is −log σ(r_w − r_l), plus the optional reward-centering term
c·(r_w + r_l)² (TRL's `center_rewards_coefficient`). Pairs are two samples of the chain's
conditional per prompt with Bradley–Terry labels on the gold reward. The exact metrics are the
held-out accuracies: exact/pair_accuracy against held-out BT labels (at most the labels' own
consistency with the gold order allows) and exact/gold_pair_accuracy against the gold reward's order.

  python -m align_jax.main --config=configs/bt_reward.py
  python -m align_jax.main --config=configs/bt_reward.py:smoke --workdir=runs/bt_reward_smoke
  python -m align_jax.main --config=configs/bt_reward.py --config.loss.center_weight=0.01

Expected (default): exact/gold_pair_accuracy rises from ≈ 0.5 (an untrained head) towards 1; the
trained parameters are in runs/bt_reward/checkpoints. `objectives.get("bt_reward").reward` maps the
model's outputs to the scalar reward other objectives use.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "bt_reward"
  c.objective = "bt_reward"
  c.loss.center_weight = 0.0  # c ≥ 0: weight of the reward-centering regulariser.
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  c.model.num_scores = 1  # A scalar reward head on the base LM's body.
  return c
