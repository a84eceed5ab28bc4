r"""The GRPO family on token log-probs [B, K, T]: GRPO, Dr. GRPO, DAPO and GSPO.

Row b of a batch is one prompt and its group of K samples y_k ∼ π_old (the policy that sampled
them: the sampler's per-token log-probs `sample_token_logp_BxKxT`, fixed for every update made on
one rollout). Position t of [B, K, T] is log π(tokens[t + 1] | tokens[≤t]) (`logps.token_logps_BxK`)
and `mask` marks a response's tokens. Every objective here is one clipped policy-gradient
surrogate, assembled from four choices:

- the advantage: group-normalised, A_k = (r̃_k − mean_K r̃)/(std_K r̃ + ε_std) (GRPO, DAPO, GSPO;
  the sample standard deviation, ddof 1, as TRL and verl), or only centred, A_k = r̃_k − mean_K r̃
  (Dr. GRPO). Both need K ≥ 2;
- the ratio: per token ρ_t = π_θ(y_t|·)/π_old(y_t|·), or per sequence (GSPO) the length-normalised
  s = exp((1/|y|) Σ_t log ρ_t), clipped to [1 − ε_low, 1 + ε_high] in ℓ = −min(ρ·A, clip(ρ)·A);
- the aggregation of the per-token losses ℓ_{k,t} into a prompt's loss, named as verl names them
  (`loss_agg_mode`): `token-mean` (every token of the batch weighs the same: DAPO, TRL's "dapo"
  loss), `seq-mean-token-mean` (each sequence's token mean, then the mean over sequences: the
  original GRPO, TRL's "grpo"), `seq-mean-token-sum` (each sequence's sum) and
  `seq-mean-token-sum-norm` (the sum divided by a fixed length `norm_len`, usually the generation
  budget: Dr. GRPO, TRL's "dr_grpo");
- the KL penalty to the reference (`beta` > 0), with Schulman's estimators of log(π/π_ref) on a
  sample, d = log π_ref − log π: k1 = −d, k2 = d²/2, k3 = e^d − 1 − d, applied in the reward
  (r̃ = r − β·Σ_t k_t, no gradient through it) or in the loss (β·k added to each token's loss,
  optionally times the token ratio π/π_old as in DeepSeek-V3.2, or, with kl_level = "sequence", to
  each sequence's loss on the sequence's log-ratio). Which of these configurations give the
  gradient of KL(π‖π_ref) is proven by enumeration in tests/testbed/test_kl_estimators.py and
  tabulated in the README: on-policy, only k1 in the reward, and at the sequence level k2 in the
  loss and k1 or k3 times the sequence ratio in the loss, do; every per-token in-loss choice
  misses the term that flows through the prefix's probability.

Losses are surrogates: their gradient, not their value, is the point. A masked (padding) token
contributes nothing, and its log-probs may be anything finite.
"""

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError

AGGREGATIONS = (
  "token-mean",
  "seq-mean-token-mean",
  "seq-mean-token-sum",
  "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")
KL_LEVELS = ("token", "sequence")


# -------------------------------------------------------------------------------------------------
# Pieces: advantages, KL estimators, clipped surrogates, aggregation.


def group_advantage(reward_BxK: jax.Array, *, scale: bool, eps: float = 1e-4) -> jax.Array:
  r"""Group-relative advantage of each of the K samples of a prompt.

  .. math::
    A_k = \frac{r_k - \bar r}{\mathrm{std}(r) + \epsilon} \ \text{(scale)}, \qquad
    A_k = r_k - \bar r \ \text{(no scale)}, \qquad
    \bar r = \frac{1}{K}\sum_i r_i,\ \mathrm{std}(r) = \sqrt{\tfrac{1}{K-1}\sum_i (r_i - \bar r)^2}

  Args:
    reward_BxK: rewards (no gradient flows into them).
    scale: divide by the group's sample standard deviation (GRPO) or not (Dr. GRPO).
    eps: added to the standard deviation (TRL: 1e-4).

  Returns:
    A [B, K]; all zeros for a group whose rewards are all equal.

  Examples:
    >>> print(group_advantage(jnp.array([[1., 0., 0., 1.]]), scale=False))
    [[ 0.5 -0.5 -0.5  0.5]]
  """
  num = reward_BxK.shape[-1]
  if num < 2:
    raise ConfigError(
      "group-normalised advantages need at least 2 samples per prompt (rollout.num_policy); "
      f"got {num}"
    )
  reward_BxK = jax.lax.stop_gradient(reward_BxK)
  centred_BxK = reward_BxK - jnp.mean(reward_BxK, axis=-1, keepdims=True)
  if not scale:
    return centred_BxK
  std_Bx1 = jnp.sqrt(jnp.sum(centred_BxK**2, axis=-1, keepdims=True) / (num - 1))
  return centred_BxK / (std_Bx1 + eps)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  r"""Schulman's single-sample estimators of KL(π‖π_ref) from a sample's log π and log π_ref.

  .. math::
    d = \log\pi_{\rm ref} - \log\pi,\qquad k_1 = -d,\qquad k_2 = \tfrac12 d^2,\qquad
    k_3 = e^{d} - 1 - d

  All three have expectation KL(π‖π_ref) under π up to k2's bias (k1 and k3 are unbiased; k3 ≥ 0);
  what their *gradients* estimate depends on where they are used (module docstring). Elementwise:
  per token or per sequence.

  Examples:
    >>> [f"{float(kl_estimate(jnp.array(-1.), jnp.array(-2.), k)):.4f}" for k in KL_ESTIMATORS]
    ['1.0000', '0.5000', '0.3679']
  """
  if estimator not in KL_ESTIMATORS:
    raise ConfigError(f"kl_estimator {estimator!r} is unknown; use one of {KL_ESTIMATORS}")
  d = ref_logp - logp
  if estimator == "k1":
    return -d
  if estimator == "k2":
    return 0.5 * d**2
  return jnp.expm1(d) - d


def clipped_surrogate(
  log_ratio: jax.Array, advantage: jax.Array, *, epsilon_low: float, epsilon_high: float
) -> tuple[jax.Array, jax.Array]:
  r"""PPO's pessimistic clipped surrogate per token (or per sequence), and where it is clipped.

  .. math::
    \ell = -\min\big(\rho A,\ \mathrm{clip}(\rho, 1 - \epsilon_{\rm low}, 1 + \epsilon_{\rm high})
    A\big), \qquad \rho = e^{\log\rho}

  The gradient is −A·∇ρ where the unclipped term is the minimum and 0 where the clip is active
  (ρ > 1 + ε_high with A > 0, or ρ < 1 − ε_low with A < 0). At ρ = 1 it is −A·∇log π.

  Args:
    log_ratio: log π_θ − log π_old (differentiated through π_θ).
    advantage: A, broadcastable to `log_ratio` (no gradient).
    epsilon_low: lower clip ε_low ∈ [0, 1).
    epsilon_high: upper clip ε_high ≥ 0 (DAPO's clip-higher: ε_high > ε_low).

  Returns:
    (ℓ, clipped): the loss and a float mask of where the clip is active.

  Examples:
    >>> loss, clipped = clipped_surrogate(jnp.log(jnp.array([0.5, 1.5])), jnp.array([-1., 1.]),
    ...                                   epsilon_low=0.2, epsilon_high=0.28)
    >>> print(loss, clipped)   # −min(−0.5, −0.8) = 0.8; −min(1.5, 1.28) = −1.28
    [ 0.8  -1.28] [1. 1.]
  """
  check_clip(epsilon_low, epsilon_high)
  advantage = jax.lax.stop_gradient(advantage)
  ratio = jnp.exp(log_ratio)
  bounded = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = -jnp.minimum(ratio * advantage, bounded * advantage)
  clipped = jnp.where(advantage > 0, ratio > 1.0 + epsilon_high, ratio < 1.0 - epsilon_low)
  clipped = clipped & (advantage != 0)
  return loss, jax.lax.stop_gradient(clipped.astype(loss.dtype))


def check_clip(epsilon_low: float, epsilon_high: float) -> None:
  if not 0.0 <= epsilon_low < 1.0:
    raise ConfigError(
      f"clip epsilon_low={epsilon_low} must be in [0, 1): the ratio's lower bound "
      "1 − epsilon_low must stay positive"
    )
  if epsilon_high < 0.0:
    raise ConfigError(f"clip epsilon_high={epsilon_high} must be >= 0")


def aggregate(
  loss_BxKxT: jax.Array,
  mask_BxKxT: jax.Array,
  weight_B: jax.Array,
  example_mask_B: jax.Array,
  mode: str,
  norm_len: float = 0.0,
) -> jax.Array:
  r"""Per-token losses -> per-prompt losses whose example-weighted mean (the step's) is the mode's.

  With m the token mask, w the prompt weights the objective chooses (0 drops a prompt) and e the
  step's example mask (it averages loss_B with weights e):

  .. math::
    \text{token-mean: } \frac{\sum_{b,k,t} w_b m\,\ell}{\sum_{b,k,t} w_b m},\quad
    \text{seq-mean-token-mean: } \frac{\sum_b w_b \frac1K\sum_k
      \frac{\sum_t m\ell}{\sum_t m}}{\sum_b w_b},\quad
    \text{seq-mean-token-sum(-norm): } \frac{\sum_b w_b \frac1K\sum_k \sum_t m\ell\,
      (/n)}{\sum_b w_b}

  loss_B is scaled by Σ e / Σ w (token-mean: Σ e / Σ w·m) so that Σ_b e_b·loss_B / Σ_b e_b is
  exactly the expression above: the batch-wide normaliser of `token-mean` and the dropping of
  prompts with w = 0 cannot be expressed per prompt. (A mini-batch is the batch here: peers
  normalise per mini-batch too.)

  Args:
    loss_BxKxT: per-token losses.
    mask_BxKxT: 1 on a response's tokens.
    weight_B: the objective's prompt weights (example_mask_B, times 0 for dropped groups).
    example_mask_B: the step's weights (0 for padding prompts).
    mode: one of `AGGREGATIONS`.
    norm_len: n of seq-mean-token-sum-norm (> 0): the fixed length every sum is divided by.

  Returns:
    loss_B.
  """
  if mode not in AGGREGATIONS:
    raise ConfigError(f"loss aggregation {mode!r} is unknown; use one of {AGGREGATIONS}")
  if mode == "seq-mean-token-sum-norm" and norm_len <= 0:
    raise ConfigError(
      "aggregation seq-mean-token-sum-norm needs norm_len > 0 (the generation budget); "
      f"got {norm_len}"
    )
  weight_B = jax.lax.stop_gradient(weight_B).astype(loss_BxKxT.dtype)
  total_e = jnp.sum(example_mask_B.astype(loss_BxKxT.dtype))
  sum_BxK = jnp.sum(loss_BxKxT * mask_BxKxT, axis=-1)
  if mode == "token-mean":
    tokens = jnp.sum(weight_B * jnp.sum(mask_BxKxT, axis=(1, 2)))
    return weight_B * jnp.sum(sum_BxK, axis=-1) * total_e / jnp.maximum(tokens, 1.0)
  if mode == "seq-mean-token-mean":
    seq_BxK = sum_BxK / jnp.maximum(jnp.sum(mask_BxKxT, axis=-1), 1.0)
  elif mode == "seq-mean-token-sum":
    seq_BxK = sum_BxK
  else:
    seq_BxK = sum_BxK / norm_len
  return weight_B * jnp.mean(seq_BxK, axis=-1) * total_e / jnp.maximum(jnp.sum(weight_B), 1e-30)


def overlong_penalty(length_BxK: jax.Array, *, max_len: int, buffer: int) -> jax.Array:
  r"""DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), added to r.

  .. math::
    R_{\rm len}(y) = \begin{cases} 0 & |y| \le L_{\max} - L_{\rm cache} \\
      \frac{(L_{\max} - L_{\rm cache}) - |y|}{L_{\rm cache}} & L_{\max} - L_{\rm cache} < |y| \le
      L_{\max} \\ -1 & L_{\max} < |y| \end{cases}

  Args:
    length_BxK: response lengths |y| (tokens).
    max_len: L_max (0: no shaping).
    buffer: L_cache ≥ 1, the punishment interval's length.

  Examples:
    >>> print(overlong_penalty(jnp.array([10., 14., 16., 17.]), max_len=16, buffer=4))
    [ 0.  -0.5 -1.  -1. ]
  """
  if not max_len:
    return jnp.zeros_like(length_BxK)
  if buffer < 1 or buffer > max_len:
    raise ConfigError(f"overlong_buffer={buffer} must be in [1, overlong_max_len={max_len}]")
  soft = ((max_len - buffer) - length_BxK) / buffer
  return jnp.where(
    length_BxK <= max_len - buffer, 0.0, jnp.where(length_BxK <= max_len, soft, -1.0)
  )


# -------------------------------------------------------------------------------------------------
# The shared surrogate and the four objectives.


def _check_kl(beta: float, kl_estimator: str, kl_in: str, kl_level: str) -> None:
  if beta < 0:
    raise ConfigError(f"KL coefficient beta={beta} must be >= 0")
  if kl_estimator not in KL_ESTIMATORS:
    raise ConfigError(f"kl_estimator {kl_estimator!r} is unknown; use one of {KL_ESTIMATORS}")
  if kl_in not in KL_PLACEMENTS:
    raise ConfigError(f"kl_in {kl_in!r} is unknown; use one of {KL_PLACEMENTS}")
  if kl_level not in KL_LEVELS:
    raise ConfigError(f"kl_level {kl_level!r} is unknown; use one of {KL_LEVELS}")


def _surrogate(
  logp_BxKxT,
  old_BxKxT,
  ref_BxKxT,
  mask_BxKxT,
  reward_BxK,
  example_mask_B,
  *,
  scale: bool,
  epsilon_low: float,
  epsilon_high: float,
  aggregation: str,
  norm_len: float,
  beta: float,
  kl_estimator: str,
  kl_in: str,
  kl_ratio: bool,
  kl_level: str,
  sequence_ratio: bool = False,
  drop_equal: bool = False,
  reward_shaping_BxK=None,
  std_eps: float = 1e-4,
):
  """The family's loss_B and per-prompt metrics (see the module docstring for each choice)."""
  _check_kl(beta, kl_estimator, kl_in, kl_level)
  mask_BxKxT = mask_BxKxT.astype(logp_BxKxT.dtype)
  # Masked positions: log-ratios 0 (they carry no gradient and cannot overflow exp).
  on = mask_BxKxT > 0
  log_ratio_BxKxT = jnp.where(on, logp_BxKxT - jax.lax.stop_gradient(old_BxKxT), 0.0)
  ref_diff_BxKxT = jnp.where(on, logp_BxKxT - jax.lax.stop_gradient(ref_BxKxT), 0.0)
  length_BxK = jnp.sum(mask_BxKxT, axis=-1)
  reward_BxK = jax.lax.stop_gradient(reward_BxK).astype(logp_BxKxT.dtype)
  shaped_BxK = reward_BxK if reward_shaping_BxK is None else reward_BxK + reward_shaping_BxK
  kl_seq_BxK = jnp.sum(ref_diff_BxKxT, axis=-1)  # log π/π_ref of each sample (k1 of a sequence).
  if kl_level == "token":  # The estimator per token, summed; or on the sequence's log-ratio.
    kl_BxK = jnp.sum(kl_estimate(ref_diff_BxKxT, 0.0, kl_estimator) * mask_BxKxT, axis=-1)
  else:
    kl_BxK = kl_estimate(kl_seq_BxK, 0.0, kl_estimator)
  if beta and kl_in == "reward":
    shaped_BxK = shaped_BxK - beta * jax.lax.stop_gradient(kl_BxK)
  advantage_BxK = group_advantage(shaped_BxK, scale=scale, eps=std_eps)
  informative_B = jnp.any(reward_BxK != reward_BxK[:, :1], axis=-1).astype(logp_BxKxT.dtype)
  weight_B = example_mask_B.astype(logp_BxKxT.dtype)
  if drop_equal:  # DAPO's dynamic sampling: groups without a reward signal are not trained on.
    weight_B = weight_B * informative_B

  if sequence_ratio:  # GSPO: one length-normalised ratio per sequence.
    if beta and kl_in == "loss" and kl_level == "token":
      raise ConfigError("gspo's loss is per sequence: a KL penalty in it needs kl_level=sequence")
    seq_log_ratio_BxK = jnp.sum(log_ratio_BxKxT, axis=-1) / jnp.maximum(length_BxK, 1.0)
    loss_BxK, clipped_BxK = clipped_surrogate(
      seq_log_ratio_BxK, advantage_BxK, epsilon_low=epsilon_low, epsilon_high=epsilon_high
    )
    total_e = jnp.sum(example_mask_B.astype(loss_BxK.dtype))
    scale_B = weight_B * total_e / jnp.maximum(jnp.sum(weight_B), 1e-30)
    loss_B = scale_B * jnp.mean(loss_BxK, axis=-1)
    clip_frac_B = jnp.mean(clipped_BxK, axis=-1)
  else:
    loss_BxKxT, clipped_BxKxT = clipped_surrogate(
      log_ratio_BxKxT, advantage_BxK[..., None], epsilon_low=epsilon_low, epsilon_high=epsilon_high
    )
    if beta and kl_in == "loss" and kl_level == "token":
      kl_BxKxT = kl_estimate(ref_diff_BxKxT, 0.0, kl_estimator)
      if kl_ratio:  # π/π_old: 1 in value on-policy, its gradient adds the score-function term.
        kl_BxKxT = jnp.exp(log_ratio_BxKxT) * kl_BxKxT
      loss_BxKxT = loss_BxKxT + beta * kl_BxKxT
    loss_B = aggregate(loss_BxKxT, mask_BxKxT, weight_B, example_mask_B, aggregation, norm_len)
    clip_frac_B = jnp.sum(clipped_BxKxT * mask_BxKxT, axis=(1, 2)) / jnp.maximum(
      jnp.sum(mask_BxKxT, axis=(1, 2)), 1.0
    )
  if beta and kl_in == "loss" and kl_level == "sequence":  # β·k(log π/π_ref) per sequence.
    seq_kl_BxK = kl_BxK
    if kl_ratio:
      seq_kl_BxK = jnp.exp(jnp.sum(log_ratio_BxKxT, axis=-1)) * seq_kl_BxK
    total_e = jnp.sum(example_mask_B.astype(seq_kl_BxK.dtype))
    loss_B = loss_B + beta * weight_B * jnp.mean(seq_kl_BxK, axis=-1) * total_e / jnp.maximum(
      jnp.sum(weight_B), 1e-30
    )
  ratio_BxKxT = jax.lax.stop_gradient(jnp.exp(log_ratio_BxKxT))
  tokens_B = jnp.maximum(jnp.sum(mask_BxKxT, axis=(1, 2)), 1.0)
  kl_seq_BxK = jax.lax.stop_gradient(kl_seq_BxK)
  metrics = {
    "reward": jnp.mean(reward_BxK, axis=-1),
    "advantage_abs": jnp.mean(jnp.abs(advantage_BxK), axis=-1),
    "kl": jnp.mean(kl_seq_BxK, axis=-1),
    "kl_estimate": jnp.mean(jax.lax.stop_gradient(kl_BxK), axis=-1),
    "clip_fraction": clip_frac_B,
    "ratio": jnp.sum(ratio_BxKxT * mask_BxKxT, axis=(1, 2)) / tokens_B,
    "response_length": jnp.mean(length_BxK, axis=-1),
    "informative": informative_B,
  }
  return loss_B, metrics


def _kl_kwargs(beta, kl_estimator, kl_in, kl_ratio, kl_level):
  names = ("beta", "kl_estimator", "kl_in", "kl_ratio", "kl_level")
  return dict(zip(names, (beta, kl_estimator, kl_in, kl_ratio, kl_level)))


def grpo(
  logp_BxKxT: jax.Array,
  old_BxKxT: jax.Array,
  ref_BxKxT: jax.Array,
  mask_BxKxT: jax.Array,
  reward_BxK: jax.Array,
  example_mask_B: jax.Array,
  *,
  epsilon: float = 0.2,
  beta: float = 0.04,
  aggregation: str = "seq-mean-token-mean",
  norm_len: float = 0.0,
  kl_estimator: str = "k3",
  kl_in: str = "loss",
  kl_ratio: bool = False,
  kl_level: str = "token",
):
  r"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, eq. 3 and 21).

  .. math::
    A_k = \frac{r_k - \mathrm{mean}(r)}{\mathrm{std}(r) + \epsilon_{\rm std}},\quad
    \rho_{k,t} = \frac{\pi_\theta(y_{k,t}|x, y_{k,<t})}{\pi_{\rm old}(y_{k,t}|x, y_{k,<t})},\quad
    \ell = \frac{1}{K}\sum_k \frac{1}{|y_k|}\sum_t \Big[-\min\big(\rho_{k,t}A_k,
      \mathrm{clip}(\rho_{k,t}, 1 \pm \epsilon)A_k\big) + \beta\,k_3(k, t)\Big]

  with the paper's defaults: ε = 0.2, β = 0.04, the k3 estimator per token in the loss and the
  sequence-mean of token-means. Every other aggregation and KL configuration of the module
  docstring can be chosen.

  Args:
    logp_BxKxT: the policy's token log-probs of K samples per prompt (differentiated).
    old_BxKxT: the behaviour policy's (the sampler's) token log-probs of the same tokens.
    ref_BxKxT: the reference's token log-probs (no gradient).
    mask_BxKxT: 1 on response tokens.
    reward_BxK: each sample's reward (no gradient).
    example_mask_B: the step's prompt weights (0 for padding prompts).
    epsilon: symmetric clip ε.
    beta: KL coefficient β ≥ 0 (0: no penalty).
    aggregation: one of `AGGREGATIONS`.
    norm_len: the fixed length of seq-mean-token-sum-norm.
    kl_estimator: k1, k2 or k3.
    kl_in: "loss" or "reward".
    kl_ratio: in the loss, multiply the estimator by the ratio π/π_old (DeepSeek-V3.2).
    kl_level: in the loss, per "token" or on each "sequence"'s log-ratio.

  Returns:
    loss_B and per-prompt metrics: reward, mean |A|, kl (log π/π_ref of the samples), the
    estimator's value, clip fraction, mean ratio, response length, informative (rewards differ).
  """
  return _surrogate(
    logp_BxKxT,
    old_BxKxT,
    ref_BxKxT,
    mask_BxKxT,
    reward_BxK,
    example_mask_B,
    scale=True,
    epsilon_low=epsilon,
    epsilon_high=epsilon,
    aggregation=aggregation,
    norm_len=norm_len,
    **_kl_kwargs(beta, kl_estimator, kl_in, kl_ratio, kl_level),
  )


def dr_grpo(
  logp_BxKxT: jax.Array,
  old_BxKxT: jax.Array,
  ref_BxKxT: jax.Array,
  mask_BxKxT: jax.Array,
  reward_BxK: jax.Array,
  example_mask_B: jax.Array,
  *,
  norm_len: float,
  epsilon: float = 0.2,
  beta: float = 0.0,
  aggregation: str = "seq-mean-token-sum-norm",
  kl_estimator: str = "k1",
  kl_in: str = "reward",
  kl_ratio: bool = False,
  kl_level: str = "token",
):
  r"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783).

  GRPO without its two biases: no division by the group's std, no division by the response length
  (the sum over tokens is divided by a constant n, the generation budget):

  .. math::
    A_k = r_k - \mathrm{mean}(r),\qquad
    \ell = \frac{1}{K}\sum_k \frac{1}{n}\sum_t -\min\big(\rho_{k,t}A_k,
      \mathrm{clip}(\rho_{k,t}, 1 \pm \epsilon)A_k\big)

  On-policy (ρ = 1) its expected gradient is (K − 1)/K · n⁻¹ · −∇E_π[r] (the mean baseline includes
  the sample itself); with β > 0 and k1 in the reward, of E_π[r] − β·KL(π‖π_ref).

  Args: as `grpo`; norm_len = n > 0 is required.
  """
  return _surrogate(
    logp_BxKxT,
    old_BxKxT,
    ref_BxKxT,
    mask_BxKxT,
    reward_BxK,
    example_mask_B,
    scale=False,
    epsilon_low=epsilon,
    epsilon_high=epsilon,
    aggregation=aggregation,
    norm_len=norm_len,
    **_kl_kwargs(beta, kl_estimator, kl_in, kl_ratio, kl_level),
  )


def dapo(
  logp_BxKxT: jax.Array,
  old_BxKxT: jax.Array,
  ref_BxKxT: jax.Array,
  mask_BxKxT: jax.Array,
  reward_BxK: jax.Array,
  example_mask_B: jax.Array,
  *,
  epsilon_low: float = 0.2,
  epsilon_high: float = 0.28,
  overlong_max_len: int = 0,
  overlong_buffer: int = 0,
  beta: float = 0.0,
  aggregation: str = "token-mean",
  norm_len: float = 0.0,
  kl_estimator: str = "k1",
  kl_in: str = "reward",
  kl_ratio: bool = False,
  kl_level: str = "token",
):
  r"""DAPO (Yu et al. 2025, arXiv 2503.14476, eq. 8): clip-higher, token-level loss, dynamic
  sampling and overlong reward shaping.

  .. math::
    \ell = \frac{1}{\sum_{b,k} w_b |y_{b,k}|}\sum_{b,k,t} w_b\,
      \Big[-\min\big(\rho A, \mathrm{clip}(\rho, 1 - \epsilon_{\rm low},
      1 + \epsilon_{\rm high})A\big)\Big],\qquad
    A_k = \frac{\tilde r_k - \mathrm{mean}(\tilde r)}{\mathrm{std}(\tilde r) + \epsilon_{\rm std}},
    \quad \tilde r = r + R_{\rm len}(|y|)

  Dynamic sampling: a group whose rewards r are all equal (no signal: its advantages are 0) gets
  weight w_b = 0, so it adds neither to the loss nor to the token count; the paper then samples more
  prompts until the batch is full of informative groups — here the rollout does that with fixed
  shapes (`rollout.informative_prompts`: of data.batch_size prompts drawn, the first that many
  informative ones are trained on; if too few are informative the rest are uninformative groups,
  which the weight drops). R_len is `overlong_penalty` (off with overlong_max_len = 0). The paper
  uses no KL penalty (β = 0).

  Args: as `grpo`, with the asymmetric clip (ε_low ∈ [0, 1), ε_high) and the overlong shaping's
  L_max (overlong_max_len) and L_cache (overlong_buffer).
  """
  shaping_BxK = overlong_penalty(
    jnp.sum(mask_BxKxT, axis=-1).astype(logp_BxKxT.dtype),
    max_len=overlong_max_len,
    buffer=overlong_buffer,
  )
  return _surrogate(
    logp_BxKxT,
    old_BxKxT,
    ref_BxKxT,
    mask_BxKxT,
    reward_BxK,
    example_mask_B,
    scale=True,
    epsilon_low=epsilon_low,
    epsilon_high=epsilon_high,
    aggregation=aggregation,
    norm_len=norm_len,
    drop_equal=True,
    reward_shaping_BxK=shaping_BxK,
    **_kl_kwargs(beta, kl_estimator, kl_in, kl_ratio, kl_level),
  )


def gspo(
  logp_BxKxT: jax.Array,
  old_BxKxT: jax.Array,
  ref_BxKxT: jax.Array,
  mask_BxKxT: jax.Array,
  reward_BxK: jax.Array,
  example_mask_B: jax.Array,
  *,
  epsilon_low: float = 3e-4,
  epsilon_high: float = 4e-4,
  beta: float = 0.0,
  kl_estimator: str = "k1",
  kl_in: str = "reward",
  kl_ratio: bool = False,
  kl_level: str = "sequence",
):
  r"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071, eq. 5–7).

  The importance ratio and its clip are per sequence, length-normalised:

  .. math::
    s_k = \Big(\frac{\pi_\theta(y_k|x)}{\pi_{\rm old}(y_k|x)}\Big)^{1/|y_k|}
        = \exp\Big(\frac{1}{|y_k|}\sum_t \log\rho_{k,t}\Big),\qquad
    \ell = \frac{1}{K}\sum_k -\min\big(s_k A_k,
      \mathrm{clip}(s_k, 1 - \epsilon_{\rm low}, 1 + \epsilon_{\rm high})A_k\big)

  with GRPO's group-normalised A and the paper's clip range (3e-4, 4e-4). On-policy (s = 1) the
  gradient is −(1/K)Σ_k A_k·(1/|y_k|)·∇log π_θ(y_k|x). A KL penalty (β > 0) is per sequence by
  default.

  Args: as `grpo`, with the asymmetric clip on s.
  """
  return _surrogate(
    logp_BxKxT,
    old_BxKxT,
    ref_BxKxT,
    mask_BxKxT,
    reward_BxK,
    example_mask_B,
    scale=True,
    epsilon_low=epsilon_low,
    epsilon_high=epsilon_high,
    aggregation="seq-mean-token-sum",  # Unused: the loss is per sequence.
    norm_len=0.0,
    sequence_ratio=True,
    **_kl_kwargs(beta, kl_estimator, kl_in, kl_ratio, kl_level),
  )


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxKxT, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# The batch comes from `align_jax.rollout` (reward_BxK, the sampler's sample_token_logp_BxKxT) and
# the step (token_mask_BxKxT, ref_token_logp_BxKxT).


def _fields(batch):
  return (
    batch["sample_token_logp_BxKxT"],
    batch["ref_token_logp_BxKxT"],
    batch["token_mask_BxKxT"],
    batch["reward_BxK"],
    batch["example_mask_B"],
  )


def grpo_objective(logp_BxKxT: jax.Array, batch: dict, stats: dict, **cfg):
  """`grpo` on a rollout batch; `cfg` is its keyword arguments."""
  return (*grpo(logp_BxKxT, *_fields(batch), **cfg), stats)


def dr_grpo_objective(logp_BxKxT: jax.Array, batch: dict, stats: dict, **cfg):
  """`dr_grpo` on a rollout batch; `cfg` is its keyword arguments."""
  return (*dr_grpo(logp_BxKxT, *_fields(batch), **cfg), stats)


def dapo_objective(logp_BxKxT: jax.Array, batch: dict, stats: dict, **cfg):
  """`dapo` on a rollout batch; `cfg` is its keyword arguments."""
  return (*dapo(logp_BxKxT, *_fields(batch), **cfg), stats)


def gspo_objective(logp_BxKxT: jax.Array, batch: dict, stats: dict, **cfg):
  """`gspo` on a rollout batch; `cfg` is its keyword arguments."""
  return (*gspo(logp_BxKxT, *_fields(batch), **cfg), stats)
