"""Objective registry: config name -> how to call the pure math with a batch.

Each entry is an `Objective`: `fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats)`,
whether the step must compute frozen-reference log-probs (`batch["ref_logp_BxK"]`), the record
format it trains on (`data`: corpus, pairs, lists, binary, ternary, negatives, distribution;
prompts for on-policy objectives, whose batches the rollout makes) and the initial
running statistics it keeps in the train state. A new objective is one pure function in a family
file and one entry here.

Batch fields (see align_jax/data/): tokens_BxKxL, loss_mask_BxKxL, example_mask_B (0 for padding
prompts), score_BxK (higher = preferred), response_mask_BxK (0 for padded list entries),
desirable_B (binary), is_tie_B (ternary), label_dist_BxC (distribution).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from align_jax.objectives import (binary, bond, distributional, fdpg, likelihood, listwise,
                                  pairwise, policy_gradient, reward_model)


@dataclasses.dataclass(frozen=True)
class Objective:
  fn: Callable
  needs_ref: bool
  data: str
  # (num_contexts, loss_cfg) -> the running statistics kept in the train state ({} for most).
  init_stats: Callable[[int, dict], dict] = lambda num_contexts, loss_cfg: {}
  # Reward models: the model is a scoring model (model.num_scores outputs), `fn` gets its outputs
  # [B, K, O] at each response's last token, and `reward` maps them to scalar rewards [B, K]: the
  # reward a trained model gives to other objectives.
  scores: bool = False
  reward: Callable | None = None
  # On-policy: the rollout also decodes each prompt greedily (ReMax's baseline).
  greedy: bool = False


def num_tokens(batch) -> jax.Array:
  """Scored tokens per response, [B, K] float32."""
  return batch["loss_mask_BxKxL"][..., 1:].astype(jnp.float32).sum(-1)


def _sft(logp, batch, stats):
  return (*likelihood.sft(logp, num_tokens(batch)), stats)


def _ref_pair(fn):
  """Binds a pairwise function of (logp_Bx2, ref_logp_Bx2, **hyper)."""
  return lambda logp, batch, stats, **cfg: (*fn(logp, batch["ref_logp_BxK"], **cfg), stats)


def _ipo(logp, batch, stats, *, tau, per_token):
  lengths = num_tokens(batch) if per_token else None
  return (*pairwise.ipo(logp, batch["ref_logp_BxK"], tau=tau, num_tokens_Bx2=lengths), stats)


def _slic(logp, batch, stats, *, delta, lam):
  # The cross-entropy regulariser targets the chosen response (an SFT target per prompt).
  return (*pairwise.slic_hf(logp, logp[:, 0], delta=delta, lam=lam), stats)


def _ln_dpo(logp, batch, stats, *, beta):
  return (*pairwise.ln_dpo(logp, batch["ref_logp_BxK"], num_tokens(batch), beta=beta), stats)


def _todo(logp, batch, stats, *, beta, alpha):
  return (*pairwise.todo(logp, batch["ref_logp_BxK"], batch["is_tie_B"], beta=beta, alpha=alpha),
          stats)


def _kto(logp, batch, stats, *, beta, desirable_weight, undesirable_weight):
  # K index 1 is a mismatched completion (another example's response after this prompt).
  ref = batch["ref_logp_BxK"]
  z0 = binary.kto_reference_point(logp[:, 1], ref[:, 1], batch["example_mask_B"])
  return (*binary.kto(logp[:, 0], ref[:, 0], batch["desirable_B"], z0, beta=beta,
                      desirable_weight=desirable_weight, undesirable_weight=undesirable_weight),
          stats)


def _bco(logp, batch, stats, *, beta, delta_momentum):
  ref = batch["ref_logp_BxK"]
  reward_B = beta * (logp[:, 0] - ref[:, 0])
  delta, count = binary.bco_update_delta(
      stats["delta"], stats["count"], reward_B, batch["example_mask_B"],
      momentum=None if delta_momentum < 0 else delta_momentum)
  udm_B = batch.get("udm_weight_B")  # Present when data.udm is on (density-ratio matching).
  loss_B, metrics = binary.bco(logp[:, 0], ref[:, 0], batch["desirable_B"], delta, beta=beta,
                               udm_weight_B=udm_B)
  return loss_B, metrics, {"delta": delta, "count": count}


def _list(fn):
  """Binds a listwise function of (logp, ref_logp, score) over the real entries of each list."""
  def bound(logp, batch, stats, **cfg):
    return (*fn(logp, batch["ref_logp_BxK"], batch["score_BxK"],
                mask_BxK=batch["response_mask_BxK"], **cfg), stats)
  return bound


def _pro(logp, batch, stats, *, sft_weight, temperature):
  return (*listwise.pro(logp, batch["score_BxK"], num_tokens(batch), sft_weight=sft_weight,
                        temperature=temperature, mask_BxK=batch["response_mask_BxK"]), stats)


def _d2o(logp, batch, stats, *, beta, alpha):
  # K index 0 is the human negative, 1.. the model's own samples; one reference for both roles.
  return (*distributional.d2o(logp, batch["ref_logp_BxK"], beta=beta, alpha=alpha,
                              sample_mask_BxK=batch["response_mask_BxK"]), stats)


def _aot(fn):
  """Binds a batch-coupled AOT variant: padding prompts are removed from its sort."""
  def bound(logp, batch, stats, **cfg):
    return (*fn(logp, batch["ref_logp_BxK"], example_mask_B=batch["example_mask_B"], **cfg),
            stats)
  return bound


def _bt_reward(scores, batch, stats, *, center_weight):
  return (*reward_model.bt_reward(scores[..., 0], center_weight=center_weight), stats)


def _dprm(scores, batch, stats, *, cost):
  return (*reward_model.dprm_ot_loss(scores[:, 0], batch["label_dist_BxC"], cost=cost), stats)


def _dprm_reward(scores):
  """The expected category score, categories evenly spaced on [0, 1] (worst = 0)."""
  return reward_model.expected_reward(scores, jnp.linspace(0.0, 1.0, scores.shape[-1]))


# On-policy objectives (data "prompts"): the batch comes from `align_jax.rollout` — K = the policy's
# samples, then the anchor's — with reward_BxK, anchor_logp_BxK, sample_logp_BxK, target_logp_BxK.

def _bond(logp, batch, stats, **cfg):
  return (*bond.bond(logp, batch["anchor_logp_BxK"], batch["reward_BxK"], **cfg), stats)


def _jbond(logp, batch, stats, **cfg):
  return (*bond.jbond(logp, batch["anchor_logp_BxK"], batch["reward_BxK"], **cfg), stats)


def _reinforce(logp, batch, stats, **cfg):
  return (*policy_gradient.reinforce(logp, batch["ref_logp_BxK"], batch["reward_BxK"], **cfg),
          stats)


def _fdpg(logp, batch, stats, *, divergence, alpha, outside_support, baseline, clip_log_ratio,
          baseline_window, proposal_criterion):
  """f-DPG with a per-prompt running Ẑ and a baseline (window of past pseudo-rewards, the exact
  forward-KL one, or none), all kept in `stats`; samples come from the proposal the rollout used."""
  del baseline_window  # Its size is fixed when the statistics are created.
  lq, lP, x_B = batch["sample_logp_BxK"], batch["target_logp_BxK"], batch["prompt_index_B"]
  log_z_X, count_X = fdpg.update_log_z(stats["log_z_X"], stats["count_X"], x_B, lP - lq)
  if baseline == "window":
    b = fdpg.baseline_window_mean(stats["window"])[0]
  elif baseline == "exact":
    if divergence != "forward_kl":
      raise ValueError(f"loss.baseline=exact (B = 1) is forward KL's; divergence is {divergence}")
    b = fdpg.FORWARD_KL_BASELINE
  elif baseline == "none":
    b = 0.0
  else:
    raise ValueError(f"loss.baseline {baseline!r} is unknown; use window, exact or none")
  loss_B, metrics, used = fdpg.fdpg(
      logp, lq, lP, log_z_X[x_B], b, divergence=divergence,
      alpha=alpha if divergence == "amari" else None, outside_support=outside_support,
      clip_log_ratio=clip_log_ratio or None)
  window = fdpg.baseline_window_push(stats["window"], used["pseudo_reward_BxK"], used["used_BxK"])
  # Offline proposal (samples from q ≠ π): is π now closer to p than q? (§1.6; the step acts on it
  # every rollout.anchor_every steps when rollout.anchor = proposal.)
  q_update = fdpg.proposal_should_update(logp, lq, lP, log_z_X[x_B], criterion=proposal_criterion)
  return loss_B, metrics, {"log_z_X": log_z_X, "count_X": count_X, "window": window,
                           "q_update": q_update}


def _fdpg_stats(num_contexts, loss_cfg):
  return {"log_z_X": jnp.full((num_contexts,), -jnp.inf, jnp.float32),
          "count_X": jnp.zeros((num_contexts,), jnp.float32),
          "window": fdpg.baseline_window_init(loss_cfg["baseline_window"]),
          "q_update": jnp.zeros((), bool)}


def _rloo(logp, batch, stats, **cfg):
  return (*policy_gradient.rloo(logp, batch["ref_logp_BxK"], batch["reward_BxK"], **cfg), stats)


def _remax(logp, batch, stats, *, beta):
  return (*policy_gradient.remax(logp, batch["ref_logp_BxK"], batch["reward_BxK"],
                                 batch["greedy_reward_B"], beta=beta,
                                 greedy_log_ratio_B=batch["greedy_log_ratio_B"]), stats)


def _bco_stats(num_contexts, loss_cfg):
  del num_contexts, loss_cfg
  return {"delta": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(_sft, needs_ref=False, data="corpus"),
    "dpo": Objective(_ref_pair(pairwise.dpo), needs_ref=True, data="pairs"),
    "cdpo": Objective(_ref_pair(pairwise.cdpo), needs_ref=True, data="pairs"),
    "rdpo": Objective(_ref_pair(pairwise.rdpo), needs_ref=True, data="pairs"),
    "ipo": Objective(_ipo, needs_ref=True, data="pairs"),
    "slic": Objective(_slic, needs_ref=False, data="pairs"),
    "ln_dpo": Objective(_ln_dpo, needs_ref=True, data="pairs"),
    "todo": Objective(_todo, needs_ref=True, data="ternary"),
    "kto": Objective(_kto, needs_ref=True, data="binary"),
    "bco": Objective(_bco, needs_ref=True, data="binary", init_stats=_bco_stats),
    "lipo": Objective(_list(listwise.lipo_lambda), needs_ref=True, data="lists"),
    "listmle": Objective(_list(listwise.listmle), needs_ref=True, data="lists"),
    "list_softmax": Objective(_list(listwise.list_softmax), needs_ref=True, data="lists"),
    "list_pair_logistic": Objective(_list(listwise.list_pair_logistic), needs_ref=True,
                                    data="lists"),
    "list_pair_hinge": Objective(_list(listwise.list_pair_hinge), needs_ref=True, data="lists"),
    "pro": Objective(_pro, needs_ref=False, data="lists"),
    "d2o": Objective(_d2o, needs_ref=True, data="negatives"),
    "aot": Objective(_aot(distributional.aot), needs_ref=True, data="pairs"),
    "aot_unpaired": Objective(_aot(distributional.aot_unpaired), needs_ref=True, data="pairs"),
    "fdpg": Objective(_fdpg, needs_ref=True, data="prompts", init_stats=_fdpg_stats),
    "bond": Objective(_bond, needs_ref=True, data="prompts"),
    "jbond": Objective(_jbond, needs_ref=True, data="prompts"),
    "reinforce": Objective(_reinforce, needs_ref=True, data="prompts"),
    "rloo": Objective(_rloo, needs_ref=True, data="prompts"),
    "remax": Objective(_remax, needs_ref=True, data="prompts", greedy=True),
    "bt_reward": Objective(_bt_reward, needs_ref=False, data="pairs", scores=True,
                           reward=lambda scores: scores[..., 0]),
    "dprm": Objective(_dprm, needs_ref=False, data="distribution", scores=True,
                      reward=_dprm_reward),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"objective {name!r} is unknown; known: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
