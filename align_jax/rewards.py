"""The reward of on-policy runs beyond the testbed's rule: a learned reward model, and the rollout's
`score_fn` on file prompts.

`cfg.reward_model` is the workdir of a reward-model run (configs/bt_reward.py, dprm.py): its
config.json gives the architecture and objective, its `params` the trained parameters.
"""

import json
import os

import jax

from align_jax import checkpoint, logps, models, objectives, sharding
from align_jax.errors import ConfigError, MissingFileError


def learned(path: str, mesh, table: dict):
  """(reward_fn, params, shardings) of the reward-model run at `path`, or (None, None, None) for
  `path` = '' (the task's own reward). reward_fn(params, tokens_BxKxL, loss_mask_BxKxL) -> [B, K].
  """
  if not path:
    return None, None, None
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path) or not os.path.isdir(os.path.join(path, "params")):
    raise MissingFileError(
      f"reward_model {path!r}: no finished reward-model run there (config.json and params/)"
    )
  with open(config_path) as f:
    rm_cfg = json.load(f)
  objective = objectives.get(rm_cfg["objective"])
  if not objective.scores:
    raise ConfigError(
      f"reward_model {path!r} was trained with {rm_cfg['objective']!r}, which is not a reward model"
    )
  graphdef, shapes, names = models.abstract(models.ModelConfig(**rm_cfg["model"]))
  shardings = sharding.tree_shardings(names, mesh, table)
  params = checkpoint.load_params(
    os.path.join(path, "params"), checkpoint.abstract_like(shapes, shardings)
  )
  return reward_function(graphdef, objective), params, shardings


def reward_function(graphdef, objective: objectives.Objective):
  """reward_fn(params, tokens_BxKxL, loss_mask_BxKxL) -> [B, K] of a scoring model trained with
  `objective`: its reward of the scores at each response's last scored token."""

  def reward_fn(reward_params, tokens_BxKxL, loss_mask_BxKxL):
    scores = logps.sequence_scores(graphdef, reward_params, tokens_BxKxL, loss_mask_BxKxL)
    return jax.lax.stop_gradient(objective.reward(scores))

  return reward_fn


def file_scorer(cfg, reward_fn):
  """score_fn of the rollout on file prompts: the learned reward r, and the target log P =
  log π_ref + r/β for target.kind = rlhf (β = target.beta), else log π_ref."""
  if cfg.target.kind not in ("", "rlhf") or cfg.testbed.reward_transform:
    raise ConfigError(
      f"target.kind={cfg.target.kind!r} / testbed.reward_transform="
      f"{cfg.testbed.reward_transform!r} are defined on the testbed; with "
      f"data.source={cfg.data.source!r} use target rlhf (or none) and no transform"
    )
  beta = cfg.target.beta if cfg.target.kind == "rlhf" else None

  def score(tokens_BxKxL, loss_mask_BxKxL, prompt_index_B, ref_logp_BxK, reward_params):
    del prompt_index_B
    reward_BxK = reward_fn(reward_params, tokens_BxKxL, loss_mask_BxKxL)
    return {
      "reward_BxK": reward_BxK,
      "target_logp_BxK": ref_logp_BxK if beta is None else ref_logp_BxK + reward_BxK / beta,
    }

  return score
