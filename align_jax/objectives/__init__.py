"""Objective registry: a config's `objective` name -> the function that scores a batch, and flags.

Each family file (pairwise, binary, listwise, distributional, bond, fdpg, policy_gradient, grpo,
distill, reward_model, likelihood) holds the pure math and, in its "Objectives on a batch"
section, one function per objective, `fn(logp, batch, stats, **loss_cfg) -> (loss_B, metrics_B,
stats)`, that binds it to the batch fields; `loss_cfg` is the config's `loss` block. This file
only names them.
A new objective is that function, one line here and one config file (README "Adding an objective").

Batch fields (see align_jax/data/): tokens_BxKxL, loss_mask_BxKxL, example_mask_B (0 for padding
prompts), score_BxK (higher = preferred), response_mask_BxK (0 for padded list entries),
desirable_B (binary), is_tie_B (ternary), label_dist_BxC (distribution); ref_logp_BxK when the
objective needs the reference. On-policy batches come from `align_jax.rollout`.
"""

import dataclasses
from collections.abc import Callable

from align_jax import config_lib
from align_jax.errors import ConfigError
from align_jax.objectives import (
  binary,
  bond,
  distill,
  distributional,
  fdpg,
  grpo,
  likelihood,
  listwise,
  pairwise,
  policy_gradient,
  reward_model,
)

GRANULARITIES = ("sequence", "token", "distribution")


@dataclasses.dataclass(frozen=True)
class Objective:
  """How the step calls an objective.

  Attributes:
    fn: (logp, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
    needs_ref: the step must provide the frozen reference's log-probs (`batch["ref_logp_BxK"]`).
    data: the record format it trains on: corpus, pairs, lists, binary, ternary, negatives,
      distribution; prompts for on-policy objectives, whose batches the rollout makes.
    init_stats: (num_contexts, loss_cfg) -> the running statistics kept in the train state ({}
      for most).
    scores: a reward model: the model is a scoring model (model.num_scores outputs) and `fn` gets
      its outputs [B, K, O] at each response's last token.
    reward: for a reward model, maps those outputs to scalar rewards [B, K]: the reward a trained
      model gives to other objectives.
    greedy: on-policy: the rollout also decodes each prompt greedily (ReMax's baseline).
    granularity: what `fn` gets as `logp`: "sequence", each response's summed log-prob [B, K];
      "token", per-token log-probs [B, K, T] with their mask; "distribution", the whole
      next-token distributions [B, K, T, V] at those positions (distillation), with the mask.
    checks: start-up rows (key, holds, requirement) for its `loss.*` fields, checked with
      `config_lib.CHECKS` before the run touches its workdir.
  """

  fn: Callable
  needs_ref: bool
  data: str
  init_stats: Callable[[int, dict], dict] = lambda num_contexts, loss_cfg: {}
  scores: bool = False
  reward: Callable | None = None
  greedy: bool = False
  granularity: str = "sequence"
  checks: tuple = ()

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(
        f"Objective granularity {self.granularity!r} is unknown; use one of {GRANULARITIES}"
      )


# Start-up checks of loss.* fields. β of the implicit reward β·log π/π_ref must be > 0: at 0 the
# loss has no gradient (or divides by β), below 0 it prefers the rejected responses.
_BETA = (("loss.beta", config_lib.POSITIVE[0], "finite and > 0 (it scales β·log π/π_ref)"),)
_KL_WEIGHT = (("loss.beta", *config_lib.NON_NEGATIVE),)  # β of r − β·log π/π_ref; 0: no KL.
_JEFFREYS = (("loss.beta", *config_lib.PROBABILITY),)  # BOND's mix (1 − β)·forward + β·backward.

OBJECTIVES: dict[str, Objective] = {
  "sft": Objective(likelihood.sft_objective, needs_ref=False, data="corpus"),
  "dpo": Objective(pairwise.dpo_objective, needs_ref=True, data="pairs", checks=_BETA),
  "cdpo": Objective(
    pairwise.cdpo_objective,
    needs_ref=True,
    data="pairs",
    checks=_BETA + (("loss.label_smoothing", *config_lib.interval(0, 0.5)),),
  ),
  "rdpo": Objective(
    pairwise.rdpo_objective,
    needs_ref=True,
    data="pairs",
    checks=_BETA + (("loss.label_smoothing", *config_lib.interval(0, 0.5, open_high=True)),),
  ),
  "ipo": Objective(
    pairwise.ipo_objective,
    needs_ref=True,
    data="pairs",
    checks=(("loss.tau", *config_lib.POSITIVE),),
  ),
  "slic": Objective(pairwise.slic_objective, needs_ref=False, data="pairs"),
  "ln_dpo": Objective(pairwise.ln_dpo_objective, needs_ref=True, data="pairs", checks=_BETA),
  "simpo": Objective(pairwise.simpo_objective, needs_ref=False, data="pairs", checks=_BETA),
  "orpo": Objective(pairwise.orpo_objective, needs_ref=False, data="pairs"),
  "todo": Objective(
    pairwise.todo_objective,
    needs_ref=True,
    data="ternary",
    checks=_BETA + (("loss.alpha", *config_lib.POSITIVE),),
  ),
  "kto": Objective(binary.kto_objective, needs_ref=True, data="binary", checks=_BETA),
  "bco": Objective(
    binary.bco_objective,
    needs_ref=True,
    data="binary",
    init_stats=binary.bco_init_stats,
    checks=_BETA,
  ),
  "lipo": Objective(listwise.lipo_objective, needs_ref=True, data="lists", checks=_BETA),
  "listmle": Objective(listwise.listmle_objective, needs_ref=True, data="lists", checks=_BETA),
  "list_softmax": Objective(
    listwise.list_softmax_objective, needs_ref=True, data="lists", checks=_BETA
  ),
  "list_pair_logistic": Objective(
    listwise.list_pair_logistic_objective, needs_ref=True, data="lists", checks=_BETA
  ),
  "list_pair_hinge": Objective(
    listwise.list_pair_hinge_objective, needs_ref=True, data="lists", checks=_BETA
  ),
  "pro": Objective(listwise.pro_objective, needs_ref=False, data="lists"),
  "d2o": Objective(  # β = 0 is its negatives-only control.
    distributional.d2o_objective,
    needs_ref=True,
    data="negatives",
    checks=(("loss.beta", *config_lib.NON_NEGATIVE), ("loss.alpha", *config_lib.NON_NEGATIVE)),
  ),
  "aot": Objective(distributional.aot_objective, needs_ref=True, data="pairs", checks=_BETA),
  "aot_unpaired": Objective(
    distributional.aot_unpaired_objective, needs_ref=True, data="pairs", checks=_BETA
  ),
  "fdpg": Objective(
    fdpg.fdpg_objective, needs_ref=True, data="prompts", init_stats=fdpg.fdpg_init_stats
  ),
  "bond": Objective(
    bond.bond_objective,
    needs_ref=True,
    data="prompts",
    checks=_JEFFREYS + (("loss.n", *config_lib.whole(1)),),
  ),
  "jbond": Objective(
    bond.jbond_objective,
    needs_ref=True,
    data="prompts",
    checks=_JEFFREYS + (("loss.gamma", *config_lib.NON_NEGATIVE),),
  ),
  "reinforce": Objective(
    policy_gradient.reinforce_objective, needs_ref=True, data="prompts", checks=_KL_WEIGHT
  ),
  "rloo": Objective(
    policy_gradient.rloo_objective, needs_ref=True, data="prompts", checks=_KL_WEIGHT
  ),
  "remax": Objective(
    policy_gradient.remax_objective, needs_ref=True, data="prompts", greedy=True, checks=_KL_WEIGHT
  ),
  # The GRPO family: token log-probs, ratios to the sampler's token log-probs (objectives/grpo.py).
  **{
    name: Objective(fn, needs_ref=True, data="prompts", granularity="token")
    for name, fn in (
      ("grpo", grpo.grpo_objective),
      ("dr_grpo", grpo.dr_grpo_objective),
      ("dapo", grpo.dapo_objective),
      ("gspo", grpo.gspo_objective),
    )
  },
  # On-policy distillation to a teacher LM (objectives/distill.py): the rollout adds its logits.
  "gkd": Objective(
    distill.gkd_objective, needs_ref=True, data="prompts", granularity="distribution"
  ),
  "bt_reward": Objective(
    reward_model.bt_reward_objective,
    needs_ref=False,
    data="pairs",
    scores=True,
    reward=reward_model.bt_model_reward,
  ),
  "dprm": Objective(
    reward_model.dprm_objective,
    needs_ref=False,
    data="distribution",
    scores=True,
    reward=reward_model.dprm_model_reward,
    checks=(("loss.cost", reward_model.is_cost, reward_model.COST_REQUIREMENT),),
  ),
}


def get(name: str) -> Objective:
  """The registry entry of `name`; a ConfigError naming the known ones if there is none."""
  if name not in OBJECTIVES:
    raise ConfigError(f"objective {name!r} is unknown; known: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
