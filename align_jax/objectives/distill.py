r"""On-policy distillation to a teacher LM (GKD: Agarwal et al. 2024, arXiv 2306.13649).

The student π_θ and a frozen teacher p (one vocabulary) are compared at every position t of
sampled responses through their whole next-token distributions π_t = π_θ(·|x, y_<t) and
p_t = p(·|x, y_<t), the arrays [B, K, T, V] (`logps.next_token_logprobs` at the positions of
`logps.token_logps_BxK`). Per token, one of

.. math::
  \mathrm{KL}(p_t\|\pi_t) \text{ (forward)},\qquad \mathrm{KL}(\pi_t\|p_t) \text{ (reverse)},\qquad
  \mathrm{JSD}_\beta(p_t\|\pi_t) = \beta\,\mathrm{KL}(p_t\|m_t)
    + (1-\beta)\,\mathrm{KL}(\pi_t\|m_t),
  \ m_t = \beta p_t + (1-\beta)\pi_t

(TRL's convention: β → 0 tends to β·forward KL, β → 1 to (1 − β)·reverse KL). Samples come from
the student (on-policy), or from the teacher (the rollout's anchor, `rollout.anchor = teacher`), or
both (GKD's mixture λ = num_policy / K). Which gradient the surrogate has, with the weights of the
samples held fixed (tests/testbed/test_distillation.py proves each by enumeration):

- on teacher samples, Σ_t KL(p_t‖π_t) has the gradient of the sequence-level KL(p‖π) exactly
  (its sampling does not depend on θ);
- on student samples GKD differentiates only the per-token divergences, Σ_t E_{y<t}[∇D_t] with
  the prefixes' probabilities held fixed; with `sequence_level` the score-function term
  Σ_t sg(Σ_{s>t} D_s)·log π_θ(y_t|·) is added, and the expected gradient becomes that of
  E_{y∼π_θ}[Σ_t D_t] — for the reverse KL, of the sequence-level KL(π‖p) exactly (the chain rule).
"""

import math

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError
from align_jax.objectives import grpo

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(logp, logq):
  """Σ_v p (log p − log q) over the last axis; 0·log 0 = 0."""
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - jnp.where(p > 0, logq, 0.0)), 0.0), axis=-1)


def token_divergence(
  logp_xV: jax.Array, teacher_xV: jax.Array, divergence: str, beta: float = 0.5
) -> jax.Array:
  r"""D(p_t‖π_t) of two next-token distributions (log-probs over the last axis V).

  Args:
    logp_xV: the student's log π_t (differentiated).
    teacher_xV: the teacher's log p_t (no gradient).
    divergence: forward_kl KL(p‖π), reverse_kl KL(π‖p) or jsd JSD_β(p‖π).
    beta: JSD's β ∈ (0, 1), the teacher's weight in the mixture m.

  Returns:
    The divergence per position (the shape without V).

  Examples:
    >>> p, q = jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.9, 0.1]))
    >>> [f"{float(token_divergence(q, p, d)):.4f}" for d in DIVERGENCES]
    ['0.5108', '0.3681', '0.1017']
  """
  check(divergence, beta)
  teacher_xV = jax.lax.stop_gradient(teacher_xV)
  if divergence == "forward_kl":
    return _kl(teacher_xV, logp_xV)
  if divergence == "reverse_kl":
    return _kl(logp_xV, teacher_xV)
  mixture_xV = jnp.logaddexp(math.log(beta) + teacher_xV, math.log1p(-beta) + logp_xV)
  return beta * _kl(teacher_xV, mixture_xV) + (1.0 - beta) * _kl(logp_xV, mixture_xV)


def check(divergence: str, beta: float) -> None:
  if divergence not in DIVERGENCES:
    raise ConfigError(
      f"distillation divergence {divergence!r} is unknown; use one of {DIVERGENCES}"
    )
  if divergence == "jsd" and not 0.0 < beta < 1.0:
    raise ConfigError(f"jsd needs beta in (0, 1) (the teacher's mixture weight); got {beta}")


def gkd(
  logp_BxKxTxV: jax.Array,
  teacher_BxKxTxV: jax.Array,
  next_tokens_BxKxT: jax.Array,
  mask_BxKxT: jax.Array,
  from_policy_BxK: jax.Array,
  example_mask_B: jax.Array,
  *,
  divergence: str = "reverse_kl",
  beta: float = 0.5,
  sequence_level: bool = False,
  aggregation: str = "token-mean",
  norm_len: float = 0.0,
):
  r"""GKD's token-level distillation loss, optionally with the sequence-level gradient.

  .. math::
    \ell = \mathrm{agg}_{k,t}\Big[D(p_{k,t}\|\pi_{k,t}) + \mathbb{1}[\text{seq}]\,
      \mathbb{1}[y_k \sim \pi_\theta]\;\mathrm{sg}\Big(\sum_{s>t} D(p_{k,s}\|\pi_{k,s})\Big)
      \log\pi_\theta(y_{k,t}|x, y_{k,<t})\Big]

  with `agg` one of `grpo.AGGREGATIONS` (GKD and TRL: the mean over the batch's tokens). The
  second term's value is not a divergence; it corrects the gradient (module docstring). It acts
  on the student's own samples only (from_policy = 1). For the exact sequence-level statements
  use `seq-mean-token-sum` (the other aggregations reweight each sequence's terms).

  Args:
    logp_BxKxTxV: the student's next-token log-probs at every position (differentiated).
    teacher_BxKxTxV: the teacher's, same layout (no gradient).
    next_tokens_BxKxT: the sampled token at each position (tokens_BxKxL[..., 1:]).
    mask_BxKxT: 1 on response tokens.
    from_policy_BxK: 1 for the student's samples, 0 for the teacher's.
    example_mask_B: the step's prompt weights.
    divergence: forward_kl, reverse_kl or jsd.
    beta: JSD's β.
    sequence_level: add the score-function term.
    aggregation, norm_len: as in `grpo.aggregate`.

  Returns:
    loss_B and per-prompt metrics: the mean token divergence and the mean per-sequence sum
    Σ_t D_t (for reverse KL on student samples, and forward KL on teacher samples, an unbiased
    estimate of the sequence-level divergence).
  """
  mask_BxKxT = mask_BxKxT.astype(logp_BxKxTxV.dtype)
  div_BxKxT = token_divergence(logp_BxKxTxV, teacher_BxKxTxV, divergence, beta) * mask_BxKxT
  loss_BxKxT = div_BxKxT
  if sequence_level:
    sampled_BxKxT = jnp.take_along_axis(logp_BxKxTxV, next_tokens_BxKxT[..., None], axis=-1)[..., 0]
    later_BxKxT = jnp.cumsum(div_BxKxT[..., ::-1], axis=-1)[..., ::-1] - div_BxKxT  # Σ_{s>t} D_s.
    score_BxK = jax.lax.stop_gradient(from_policy_BxK).astype(loss_BxKxT.dtype)
    cost_BxKxT = jax.lax.stop_gradient(later_BxKxT) * score_BxK[..., None]
    loss_BxKxT = loss_BxKxT + cost_BxKxT * jnp.where(mask_BxKxT > 0, sampled_BxKxT, 0.0)
  weight_B = example_mask_B.astype(loss_BxKxT.dtype)
  loss_B = grpo.aggregate(loss_BxKxT, mask_BxKxT, weight_B, example_mask_B, aggregation, norm_len)
  div_BxKxT = jax.lax.stop_gradient(div_BxKxT)
  tokens_B = jnp.maximum(jnp.sum(mask_BxKxT, axis=(1, 2)), 1.0)
  return loss_B, {
    "token_divergence": jnp.sum(div_BxKxT, axis=(1, 2)) / tokens_B,
    "sequence_divergence": jnp.mean(jnp.sum(div_BxKxT, axis=-1), axis=-1),
  }


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxKxTxV, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# The rollout adds the teacher's teacher_logp_BxKxTxV and from_policy_BxK, the step
# token_mask_BxKxT.


def gkd_objective(logp_BxKxTxV: jax.Array, batch: dict, stats: dict, **cfg):
  """`gkd` on a rollout batch; `cfg` is its keyword arguments."""
  return (
    *gkd(
      logp_BxKxTxV,
      batch["teacher_logp_BxKxTxV"],
      batch["tokens_BxKxL"][..., 1:],
      batch["token_mask_BxKxT"],
      batch["from_policy_BxK"],
      batch["example_mask_B"],
      **cfg,
    ),
    stats,
  )
