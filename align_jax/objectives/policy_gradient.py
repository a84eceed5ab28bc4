"""RLHF policy-gradient baselines on on-policy samples [B, K]: REINFORCE / RLOO and ReMax.

Column k of every [B, K] array is the k-th of K i.i.d. samples y_k ∼ π_θ(·|x) of a prompt. The
reward is KL-penalised per sequence, r̃ = r − β·(log π_θ − log π_ref) with the log-ratio detached,
so that the expected gradient of the surrogate −sg(A)·log π_θ is −∇(E_π[r] − β·KL(π‖π_ref)) exactly
(∇KL(π‖π_ref) = E_π[(log π − log π_ref)·∇log π], since E_π[∇log π] = 0). Losses are surrogates:
their value is not the objective, their gradient is.
"""

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError

_BASELINES = ("loo", "none")


def leave_one_out_mean(x_BxK: jax.Array) -> jax.Array:
  """b_k = mean of the other K − 1 entries of a row, (Σ_i x_i − x_k)/(K − 1); needs K ≥ 2."""
  num = x_BxK.shape[-1]
  if num < 2:
    raise ConfigError(f"a leave-one-out baseline needs at least 2 samples per prompt; got {num}")
  return (jnp.sum(x_BxK, axis=-1, keepdims=True) - x_BxK) / (num - 1)


def penalised_reward(
  logp_BxK: jax.Array, ref_logp_BxK: jax.Array, reward_BxK: jax.Array, *, beta: float
) -> tuple[jax.Array, jax.Array]:
  """(r − β·ρ, ρ) with ρ = log π − log π_ref, everything detached."""
  log_ratio_BxK = jax.lax.stop_gradient(logp_BxK - ref_logp_BxK)
  reward_BxK = jax.lax.stop_gradient(reward_BxK).astype(log_ratio_BxK.dtype)
  return reward_BxK - beta * log_ratio_BxK, log_ratio_BxK


def _surrogate(logp_BxK, advantage_BxK):
  """Per-prompt −mean_k sg(A_k)·log π_θ(y_k)."""
  return -jnp.mean(jax.lax.stop_gradient(advantage_BxK) * logp_BxK, axis=-1)


def _metrics(reward_BxK, log_ratio_BxK, advantage_BxK, beta):
  return {
    "reward": jnp.mean(reward_BxK, axis=-1),
    "kl": jnp.mean(log_ratio_BxK, axis=-1),
    "kl_penalty": beta * jnp.mean(log_ratio_BxK, axis=-1),
    "advantage": jnp.mean(advantage_BxK, axis=-1),
  }


def reinforce(
  logp_BxK: jax.Array,
  ref_logp_BxK: jax.Array,
  reward_BxK: jax.Array,
  *,
  beta: float,
  baseline: str = "loo",
):
  r"""REINFORCE on the KL-penalised reward; with the leave-one-out baseline this is RLOO.

  .. math::
    \tilde r_k = r(y_k) - \beta\,\mathrm{sg}[\log\pi_\theta(y_k) - \log\pi_{\rm ref}(y_k)], \quad
    A_k = \tilde r_k - \frac{1}{K-1}\sum_{i\ne k}\tilde r_i, \quad
    \ell = -\frac{1}{K}\sum_k \mathrm{sg}[A_k]\,\log\pi_\theta(y_k)

  Williams 1992; the leave-one-out baseline over the K samples of a prompt is RLOO (Kool et al.
  2019; Ahmadian et al. 2024, arXiv 2402.14740). The baseline of sample k uses only the other,
  independent samples, so E[∇ℓ] = −∇(E_π[r] − β·KL(π‖π_ref)) with or without it (ALGORITHMS.md §1.7,
  ABLATIONS.md §4.2). `baseline="none"` uses A = r̃.

  Args:
    logp_BxK: sequence log-probs of K on-policy samples per prompt under the policy.
    ref_logp_BxK: the same under the frozen reference (no gradient flows into it).
    reward_BxK: reward of every sample (no gradient flows into it).
    beta: KL coefficient β ≥ 0 of the penalised reward.
    baseline: "loo" (leave-one-out mean of r̃; K ≥ 2) or "none".

  Returns:
    loss_B and per-prompt metrics: mean reward, mean log-ratio (`kl`, a single-sample estimate of
    KL(π‖π_ref)), mean β·log-ratio (`kl_penalty`) and mean advantage.

  Examples:
    >>> loss, m = reinforce(jnp.array([[-1., -2.]]), jnp.zeros((1, 2)), jnp.array([[1., 0.]]),
    ...                     beta=0.0)
    >>> print(f"{loss[0]:.6f}")   # A = [1, −1]: −(1·(−1) + (−1)·(−2))/2
    -0.500000
  """
  if baseline not in _BASELINES:
    raise ConfigError(f"reinforce baseline must be one of {_BASELINES}; got {baseline!r}")
  shaped_BxK, log_ratio_BxK = penalised_reward(logp_BxK, ref_logp_BxK, reward_BxK, beta=beta)
  advantage_BxK = shaped_BxK
  if baseline == "loo":
    advantage_BxK = shaped_BxK - leave_one_out_mean(shaped_BxK)
  metrics = _metrics(jax.lax.stop_gradient(reward_BxK), log_ratio_BxK, advantage_BxK, beta)
  return _surrogate(logp_BxK, advantage_BxK), metrics


def rloo(logp_BxK: jax.Array, ref_logp_BxK: jax.Array, reward_BxK: jax.Array, *, beta: float):
  """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): `reinforce` with `baseline="loo"`."""
  return reinforce(logp_BxK, ref_logp_BxK, reward_BxK, beta=beta, baseline="loo")


def remax(
  logp_BxK: jax.Array,
  ref_logp_BxK: jax.Array,
  reward_BxK: jax.Array,
  greedy_reward_B: jax.Array,
  *,
  beta: float,
  greedy_log_ratio_B: jax.Array | None = None,
):
  r"""ReMax: REINFORCE with the greedy decode's reward as baseline (Li et al. 2023, 2310.10505).

  .. math::
    A_k = \tilde r(y_k) - \tilde r(\bar y), \quad
    \ell = -\frac{1}{K}\sum_k \mathrm{sg}[A_k]\,\log\pi_\theta(y_k)

  with ȳ the greedy (temperature-0) decode of the current policy and r̃ the KL-penalised reward
  of `reinforce`. The baseline depends on the prompt only, not on the samples, so the estimator
  is unbiased (ALGORITHMS.md §5.10). Choice for β > 0: the baseline is r(ȳ) − β·ρ(ȳ), the
  penalised return of the greedy response, when its log-ratio ρ(ȳ) = log π_θ(ȳ) − log π_ref(ȳ) is
  given, and r(ȳ) otherwise (as in the TRL pull request, where the KL penalty lives in the sample's
  reward only). Both are unbiased; the first centres A better.

  Args:
    logp_BxK: sequence log-probs of K sampled responses per prompt under the policy.
    ref_logp_BxK: the same under the frozen reference (no gradient flows into it).
    reward_BxK: reward of every sample (no gradient flows into it).
    greedy_reward_B: reward r(ȳ) of each prompt's greedy decode (no gradient flows into it).
    beta: KL coefficient β ≥ 0 of the penalised reward.
    greedy_log_ratio_B: optional ρ(ȳ); adds −β·ρ(ȳ) to the baseline (no gradient flows into it).

  Returns:
    loss_B and per-prompt metrics: mean reward, mean log-ratio (`kl`), mean β·log-ratio
    (`kl_penalty`), mean advantage and the baseline.

  Examples:
    >>> loss, m = remax(jnp.array([[-1.7]]), jnp.array([[-1.7]]), jnp.array([[0.7]]),
    ...                 jnp.array([0.4]), beta=0.0)
    >>> print(f"{loss[0]:.2f} {m['advantage'][0]:.2f}")   # −0.3·(−0.5 − 1 − 0.2), §7.7
    0.51 0.30
  """
  shaped_BxK, log_ratio_BxK = penalised_reward(logp_BxK, ref_logp_BxK, reward_BxK, beta=beta)
  baseline_B = jax.lax.stop_gradient(greedy_reward_B).astype(shaped_BxK.dtype)
  if greedy_log_ratio_B is not None:
    baseline_B = baseline_B - beta * jax.lax.stop_gradient(greedy_log_ratio_B)
  advantage_BxK = shaped_BxK - baseline_B[:, None]
  metrics = _metrics(jax.lax.stop_gradient(reward_BxK), log_ratio_BxK, advantage_BxK, beta)
  metrics["baseline"] = baseline_B
  return _surrogate(logp_BxK, advantage_BxK), metrics


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# The batch comes from `align_jax.rollout`: K on-policy samples per prompt with reward_BxK and the
# reference's ref_logp_BxK (ReMax: also the greedy decode's greedy_reward_B, greedy_log_ratio_B).


def reinforce_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`reinforce` on a rollout batch; `cfg` is its keyword arguments (beta, baseline)."""
  return (*reinforce(logp_BxK, batch["ref_logp_BxK"], batch["reward_BxK"], **cfg), stats)


def rloo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`rloo` on a rollout batch; `cfg` is its keyword arguments (beta)."""
  return (*rloo(logp_BxK, batch["ref_logp_BxK"], batch["reward_BxK"], **cfg), stats)


def remax_objective(logp_BxK: jax.Array, batch: dict, stats: dict, *, beta: float):
  """`remax` on a rollout batch with the greedy decode's reward and log-ratio as baseline."""
  return (
    *remax(
      logp_BxK,
      batch["ref_logp_BxK"],
      batch["reward_BxK"],
      batch["greedy_reward_B"],
      beta=beta,
      greedy_log_ratio_B=batch["greedy_log_ratio_B"],
    ),
    stats,
  )
