"""Objective registry: config name -> how to call the pure math with a batch.

Each entry is an `Objective`: `fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats)`
and whether the step must compute frozen-reference log-probs (`batch["ref_logp_BxK"]`). A new
objective is one pure function in a family file and one line here.
"""

import dataclasses
from collections.abc import Callable

from align_jax.objectives import likelihood, pairwise


@dataclasses.dataclass(frozen=True)
class Objective:
  fn: Callable
  needs_ref: bool


def _sft(logp, batch, stats):
  n_BxK = batch["loss_mask_BxKxL"][..., 1:].sum(-1)
  return (*likelihood.sft(logp, n_BxK), stats)


def _dpo(logp, batch, stats, *, beta):
  return (*pairwise.dpo(logp, batch["ref_logp_BxK"], beta=beta), stats)


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(_sft, needs_ref=False),
    "dpo": Objective(_dpo, needs_ref=True),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"objective {name!r} is unknown; known: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
