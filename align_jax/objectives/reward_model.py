"""Reward-model objectives: Bradley–Terry pairs and DPRM, the distributional reward model (§4.3).

Inputs are reward-head outputs, not policy log-probs: scalar rewards for a [chosen, rejected] pair,
or logits over C ordered preference categories (worst first) for one (prompt, response). Section
numbers refer to ALGORITHMS.md.
"""

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.errors import ConfigError


def bt_reward(
  reward_Bx2: jax.Array, *, margin: float | jax.Array = 0.0, center_weight: float = 0.0
):
  r"""Bradley–Terry reward-model loss on a [chosen, rejected] pair (Ouyang et al. 2022, eq. 1).

  .. math:: \ell = \mathrm{softplus}\big(-(r_w - r_l - m)\big) + c\,(r_w + r_l)^2

  The negative log-likelihood of the observed preference under P(y_w ≻ y_l) = σ(r_w − r_l − m).
  The optional margin m (per pair or shared) is Llama 2's preference-strength margin, TRL
  RewardTrainer's dataset column "margin". The centering term c·(r_w + r_l)² is our option, as
  TRL's `center_rewards_coefficient` (Eisenstein et al. 2023): it pins the otherwise free offset of
  the rewards near 0. With c = 0 the loss depends on r_w − r_l only, so adding a constant to both
  rewards changes nothing.

  Args:
    reward_Bx2: scalar rewards of [chosen, rejected].
    margin: m, a scalar or [B] per-pair margin (no gradient flows into it).
    center_weight: c ≥ 0, the weight of the reward-centering regulariser.

  Returns:
    loss_B and per-pair metrics: margin r_w − r_l (without m), accuracy 1[r_w > r_l], and the
    chosen / rejected rewards.

  Examples:
    >>> loss, _ = bt_reward(jnp.array([[1.5, 0.5]]))
    >>> print(f"{loss[0]:.6f}")   # softplus(−1)
    0.313262
    >>> loss, _ = bt_reward(jnp.array([[1.5, 0.5]]), center_weight=0.01)
    >>> print(f"{loss[0]:.6f}")   # softplus(−1) + 0.01·2²
    0.353262
  """
  diff_B = reward_Bx2[:, 0] - reward_Bx2[:, 1]
  loss_B = jax.nn.softplus(-(diff_B - jax.lax.stop_gradient(margin)))
  if center_weight:
    loss_B = loss_B + center_weight * jnp.square(reward_Bx2[:, 0] + reward_Bx2[:, 1])
  metrics = {
    "margin": diff_B,
    "accuracy": (diff_B > 0).astype(jnp.float32),
    "reward_chosen": reward_Bx2[:, 0],
    "reward_rejected": reward_Bx2[:, 1],
  }
  return loss_B, metrics


COST_REQUIREMENT = (
  "'abs', 'squared' or a square matrix with the Monge property c[j, k] + c[j+1, k+1] <= "
  "c[j, k+1] + c[j+1, k] (the monotone coupling's transport cost is the optimum only then)"
)


def is_cost(cost) -> bool:
  """A DPRM ground cost: "abs", "squared", or a finite square matrix with the Monge property
  (checked on adjacent rows and columns, which implies it for all j < j', k < k')."""
  if isinstance(cost, str):
    return cost in ("abs", "squared")
  c_CxC = np.asarray(cost, dtype=np.float64)
  if c_CxC.ndim != 2 or c_CxC.shape[0] != c_CxC.shape[1] or not np.all(np.isfinite(c_CxC)):
    return False
  excess = c_CxC[:-1, :-1] + c_CxC[1:, 1:] - c_CxC[:-1, 1:] - c_CxC[1:, :-1]
  return bool(np.all(excess <= 1e-9 * max(1.0, np.abs(c_CxC).max())))


def _cost_matrix(cost, num_categories: int) -> jax.Array:
  """The [C, C] ground cost for "abs" |j − k|, "squared" |j − k|² or a given Monge matrix."""
  if isinstance(cost, str) and not is_cost(cost):
    raise ConfigError(f"dprm cost {cost!r} is unknown; use {COST_REQUIREMENT}")
  if not isinstance(cost, (str, jax.core.Tracer)) and not is_cost(cost):  # A traced one: unchecked.
    raise ConfigError(f"dprm cost {np.asarray(cost).tolist()} must be {COST_REQUIREMENT}")
  if isinstance(cost, str):
    j_C = jnp.arange(num_categories, dtype=jnp.float32)
    d_CxC = jnp.abs(j_C[:, None] - j_C[None, :])
    return d_CxC if cost == "abs" else jnp.square(d_CxC)
  cost_CxC = jnp.asarray(cost)
  if cost_CxC.shape != (num_categories, num_categories):
    raise ConfigError(
      f"dprm cost matrix must be [{num_categories}, {num_categories}]; got {cost_CxC.shape}"
    )
  return cost_CxC


def _monotone_ot(p_BxC: jax.Array, q_BxC: jax.Array, cost_CxC: jax.Array) -> jax.Array:
  """Σ over the pieces of [0, 1] where both quantile functions are constant: length·c[Q_p, Q_q]."""
  num_categories = p_BxC.shape[-1]
  cdf_p_BxC, cdf_q_BxC = jnp.cumsum(p_BxC, -1), jnp.cumsum(q_BxC, -1)
  knots_BxT = jnp.sort(jnp.concatenate([cdf_p_BxC, cdf_q_BxC], -1), -1)
  knots_BxT = jnp.concatenate([jnp.zeros_like(knots_BxT[:, :1]), knots_BxT], -1)
  length_BxT = knots_BxT[:, 1:] - knots_BxT[:, :-1]
  # Which category each quantile function takes on a piece; constant there, so no gradient is lost.
  mid_BxT = jax.lax.stop_gradient(0.5 * (knots_BxT[:, 1:] + knots_BxT[:, :-1]))
  j_BxT, k_BxT = (
    jnp.minimum(
      jnp.sum(jax.lax.stop_gradient(cdf_BxC)[:, None, :] < mid_BxT[..., None], -1),
      num_categories - 1,
    )
    for cdf_BxC in (cdf_p_BxC, cdf_q_BxC)
  )
  return jnp.sum(length_BxT * cost_CxC.astype(length_BxT.dtype)[j_BxT, k_BxT], -1)


def dprm_ot_loss(
  logits_BxC: jax.Array,
  target_BxC: jax.Array,
  *,
  cost="abs",
  category_scores_C: jax.Array | None = None,
):
  r"""DPRM's optimal-transport loss (Li et al. 2024, arXiv 2402.09764; ALGORITHMS.md §4.3).

  The reward head predicts q = softmax(logits) over C ordered categories; the label p is a
  population's share of each category (e.g. `dprm_posterior`). The loss is the OT cost between them,

  .. math:: \mathrm{OT}_c(p, q) = \min_{\gamma \in \Pi(p, q)} \sum_{jk} \gamma_{jk}\, c_{jk}
            \overset{c = |j-k|}{=} \sum_{k=1}^{C-1} \big|F_p(k) - F_q(k)\big|

  which, unlike cross-entropy, charges more for predicting a far category than a near one. For
  "abs" the CDF closed form is used. For "squared" |j − k|² and for a given [C, C] matrix c[j, k]
  (j a category of p, k of q) the monotone (quantile) coupling is computed exactly by integrating
  c[Q_p(t), Q_q(t)] over t ∈ [0, 1]; it is the optimum whenever c has the Monge property
  c[j, k] + c[j', k'] ≤ c[j, k'] + c[j', k] for j < j', k < k' (true for h(s_j − s_k) with convex h
  and increasing s), and not in general otherwise. No solver, and the loss is differentiable
  almost everywhere. The loss is our specification (§4.3): the paper's exact cost is unconfirmed.

  Args:
    logits_BxC: reward-head logits, category 0 the worst.
    target_BxC: target distributions p (rows sum to 1).
    cost: "abs", "squared" or a Monge [C, C] cost matrix (any other is a ConfigError: the
      monotone coupling's cost would not be the optimal transport cost).
    category_scores_C: scores s_k for the expected-reward metrics (None: evenly spaced on [0, 1]).

  Returns:
    loss_B = OT(p, q) and per-example metrics: ot, expected_reward Σ q_k s_k, target_expected_reward
    Σ p_k s_k, and accuracy 1[argmax q = argmax p] (first index on ties).

  Examples:
    >>> logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.2, 0.1, 0.1]]))
    >>> target = jnp.array([[0.0, 0.0, 0.1, 0.3, 0.4, 0.2]])
    >>> loss, m = dprm_ot_loss(logits, target)
    >>> print(f"{loss[0]:.4f} {dprm_ot_loss(logits, target, cost='squared')[0][0]:.4f}")   # §7.6
    1.4000 2.4000
    >>> print(f"{m['expected_reward'][0]:.4f} {m['target_expected_reward'][0]:.4f}")
    0.4600 0.7400
  """
  num_categories = logits_BxC.shape[-1]
  q_BxC = jax.nn.softmax(logits_BxC, axis=-1)
  p_BxC = jnp.asarray(target_BxC, q_BxC.dtype)
  if isinstance(cost, str) and cost == "abs":
    cdf_gap_BxC = jnp.cumsum(p_BxC, -1) - jnp.cumsum(q_BxC, -1)
    ot_B = jnp.sum(jnp.abs(cdf_gap_BxC[:, :-1]), -1)
  else:
    ot_B = _monotone_ot(p_BxC, q_BxC, _cost_matrix(cost, num_categories))
  if category_scores_C is None:
    category_scores_C = jnp.linspace(0.0, 1.0, num_categories)
  scores_C = jnp.asarray(category_scores_C, q_BxC.dtype)
  metrics = {
    "ot": ot_B,
    "expected_reward": q_BxC @ scores_C,
    "target_expected_reward": p_BxC @ scores_C,
    "accuracy": (jnp.argmax(q_BxC, -1) == jnp.argmax(p_BxC, -1)).astype(jnp.float32),
  }
  return ot_B, metrics


def dprm_posterior(votes_BxC: jax.Array, prior_BxC: jax.Array) -> jax.Array:
  r"""DPRM's Bayesian label: the Dirichlet posterior mean after persona votes (ALGORITHMS.md §4.3).

  .. math:: \hat p_k = \frac{\alpha_k + n_k}{\sum_m (\alpha_m + n_m)}

  α are prior pseudo-counts (e.g. an LLM's direct estimate of the population distribution times a
  prior strength), n the vote counts per category. The optional smoothing towards neighbouring
  categories of §4.3 is left to the caller.

  Args:
    votes_BxC: vote counts n ≥ 0 per category.
    prior_BxC: prior pseudo-counts α ≥ 0 (broadcastable), with α + n summing to > 0.

  Returns:
    the posterior mean [B, C]; a target for `dprm_ot_loss`.

  Examples:
    >>> post = dprm_posterior(jnp.array([[0., 1., 2., 5., 8., 4.]]), jnp.ones((1, 6)))
    >>> print(" ".join(f"{x:.6f}" for x in post[0]))   # [1, 2, 3, 6, 9, 5]/26, ALGORITHMS.md §7.6
    0.038462 0.076923 0.115385 0.230769 0.346154 0.192308
  """
  counts_BxC = jnp.asarray(votes_BxC) + jnp.asarray(prior_BxC)
  return counts_BxC / jnp.sum(counts_BxC, -1, keepdims=True)


def expected_reward(logits_BxC: jax.Array, category_scores_C: jax.Array) -> jax.Array:
  r"""DPRM's scalar reward for policy optimisation: the expected category score under q.

  .. math:: r(x, y) = \sum_k q_\theta(k|x, y)\, s_k, \qquad
            q_\theta = \mathrm{softmax}(\text{logits})

  Args:
    logits_BxC: reward-head logits over the C ordered categories.
    category_scores_C: score s_k of each category (e.g. evenly spaced on [0, 1]).

  Returns:
    reward_B.

  Examples:
    >>> logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.2, 0.1, 0.1]]))
    >>> print(f"{expected_reward(logits, jnp.linspace(0., 1., 6))[0]:.4f}")   # ALGORITHMS.md §7.6
    0.4600
  """
  return jax.nn.softmax(logits_BxC, axis=-1) @ jnp.asarray(category_scores_C, logits_BxC.dtype)


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(scores_BxKxO, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# A reward model's outputs at each response's last token, O = model.num_scores; `*_reward` maps
# them to the scalar reward [B, K] the trained model gives other objectives.


def bt_reward_objective(scores_BxKxO: jax.Array, batch: dict, stats: dict, *, center_weight: float):
  """`bt_reward` on a pairs batch, the scalar head's output (O = 1) as the reward."""
  del batch
  return (*bt_reward(scores_BxKxO[..., 0], center_weight=center_weight), stats)


def bt_model_reward(scores_BxKxO: jax.Array) -> jax.Array:
  """A Bradley–Terry reward model's reward: its scalar output."""
  return scores_BxKxO[..., 0]


def dprm_objective(scores_BxKxO: jax.Array, batch: dict, stats: dict, *, cost):
  """`dprm_ot_loss` on a distribution batch: logits over O = C categories of the one response
  against its label distribution `label_dist_BxC`."""
  return (*dprm_ot_loss(scores_BxKxO[:, 0], batch["label_dist_BxC"], cost=cost), stats)


def dprm_model_reward(scores_BxKxO: jax.Array) -> jax.Array:
  """A DPRM's reward: the expected category score, categories evenly spaced on [0, 1] (worst 0)."""
  return expected_reward(scores_BxKxO, jnp.linspace(0.0, 1.0, scores_BxKxO.shape[-1]))
