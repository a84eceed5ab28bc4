"""Pairwise preference objectives on [B, 2] log-probs: index 0 = chosen, 1 = rejected."""

import math

import jax
import jax.numpy as jnp

from align_jax.errors import ConfigError
from align_jax.objectives.likelihood import num_tokens


def log_ratio_margin(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array) -> jax.Array:
  """h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]."""
  ratio_Bx2 = logp_Bx2 - ref_logp_Bx2
  return ratio_Bx2[:, 0] - ratio_Bx2[:, 1]


def dpo(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array, *, beta: float):
  r"""DPO, sigmoid loss (Rafailov et al. 2023, eq. 7).

  .. math:: \ell = -\log\sigma(\beta h) = \mathrm{softplus}(-\beta h)

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    beta: inverse temperature of the implicit reward β·log(π/π_ref).

  Returns:
    loss_B and per-prompt metrics: margin β·h, accuracy 1[h > 0], and the implicit rewards.

  Examples:
    >>> loss, _ = dpo(jnp.array([[-10., -12.]]), jnp.array([[-10.5, -11.5]]), beta=0.1)
    >>> print(f"{loss[0]:.6f}")   # softplus(-0.1), ALGORITHMS.md §7.7
    0.644397
  """
  h_B = log_ratio_margin(logp_Bx2, jax.lax.stop_gradient(ref_logp_Bx2))
  margin_B = beta * h_B
  reward_Bx2 = beta * (logp_Bx2 - ref_logp_Bx2)
  metrics = {
    "margin": margin_B,
    "accuracy": (h_B > 0).astype(jnp.float32),
    "reward_chosen": reward_Bx2[:, 0],
    "reward_rejected": reward_Bx2[:, 1],
  }
  return jax.nn.softplus(-margin_B), metrics


def _log_ratios(
  logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array, num_tokens_Bx2: jax.Array | None = None
) -> jax.Array:
  """ρ = log π − sg(log π_ref) per response; per token (÷ length, clamped ≥ 1) when lengths are given."""
  ratio_Bx2 = logp_Bx2 - jax.lax.stop_gradient(ref_logp_Bx2)
  if num_tokens_Bx2 is None:
    return ratio_Bx2
  return ratio_Bx2 / jnp.maximum(jax.lax.stop_gradient(num_tokens_Bx2), 1.0)


def _pair_metrics(margin_B: jax.Array, reward_Bx2: jax.Array) -> dict:
  """Per-prompt margin, accuracy 1[margin > 0] and the chosen / rejected implicit rewards."""
  return {
    "margin": margin_B,
    "accuracy": (margin_B > 0).astype(jnp.float32),
    "reward_chosen": reward_Bx2[:, 0],
    "reward_rejected": reward_Bx2[:, 1],
  }


def _check_flip_rate(name: str, value: float, *, upper: float, closed: bool):
  ok = 0.0 <= value <= upper if closed else 0.0 <= value < upper
  if not ok:
    interval = f"[0, {upper}]" if closed else f"[0, {upper})"
    raise ConfigError(f"{name} must lie in {interval}; got {value}")


def cdpo(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array, *, beta: float, label_smoothing: float):
  r"""Conservative DPO: DPO with label smoothing (Mitchell 2023, "A note on DPO with noisy preferences").

  .. math:: \ell = (1-\varepsilon)\,\mathrm{softplus}(-\beta h) + \varepsilon\,\mathrm{softplus}(\beta h)

  The cross-entropy against soft labels (1 − ε, ε); ε = 0 is DPO. The loss is minimised at the finite
  margin h = logit(1 − ε)/β instead of h → ∞. Same as TRL's pre-refactor "sigmoid" loss with
  `label_smoothing` and tunix's `label_smoothing` (ALGORITHMS.md §5.2).

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    beta: inverse temperature of the implicit reward β·log(π/π_ref).
    label_smoothing: ε ∈ [0, 0.5], the assumed probability that a label is flipped.

  Returns:
    loss_B and per-prompt metrics: margin β·h, accuracy 1[h > 0], and the implicit rewards.

  Examples:
    >>> loss, _ = cdpo(jnp.array([[-10., -12.]]), jnp.array([[-10.5, -11.5]]), beta=0.1,
    ...                label_smoothing=0.1)
    >>> print(f"{loss[0]:.6f}")   # 0.9·softplus(-0.1) + 0.1·softplus(0.1), ALGORITHMS.md §7.7
    0.654397
  """
  _check_flip_rate("cdpo label_smoothing", label_smoothing, upper=0.5, closed=True)
  ratio_Bx2 = _log_ratios(logp_Bx2, ref_logp_Bx2)
  margin_B = beta * (ratio_Bx2[:, 0] - ratio_Bx2[:, 1])
  loss_B = (1.0 - label_smoothing) * jax.nn.softplus(-margin_B) + label_smoothing * jax.nn.softplus(
    margin_B
  )
  return loss_B, _pair_metrics(margin_B, beta * ratio_Bx2)


def rdpo(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array, *, beta: float, label_smoothing: float):
  r"""Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): unbiased under symmetric label noise.

  .. math::
    \ell = \frac{(1-\varepsilon)\,\mathrm{softplus}(-\beta h) - \varepsilon\,\mathrm{softplus}(\beta h)}
                {1 - 2\varepsilon}

  If each observed label is the clean one flipped with probability ε, the expectation of ℓ over the flip
  equals the clean DPO loss softplus(−βh). Unlike cDPO the loss is unbounded below (−∞ as h → ∞ for
  ε > 0). TRL's "robust" loss (ALGORITHMS.md §5.2).

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    beta: inverse temperature of the implicit reward β·log(π/π_ref).
    label_smoothing: the flip rate ε ∈ [0, 0.5).

  Returns:
    loss_B and per-prompt metrics: margin β·h, accuracy 1[h > 0], and the implicit rewards.

  Examples:
    >>> loss, _ = rdpo(jnp.array([[-10., -12.]]), jnp.array([[-10.5, -11.5]]), beta=0.1,
    ...                label_smoothing=0.1)
    >>> print(f"{loss[0]:.6f}")   # (0.9·softplus(-0.1) − 0.1·softplus(0.1)) / 0.8, ALGORITHMS.md §7.7
    0.631897
  """
  _check_flip_rate("rdpo label_smoothing", label_smoothing, upper=0.5, closed=False)
  ratio_Bx2 = _log_ratios(logp_Bx2, ref_logp_Bx2)
  margin_B = beta * (ratio_Bx2[:, 0] - ratio_Bx2[:, 1])
  loss_B = (
    (1.0 - label_smoothing) * jax.nn.softplus(-margin_B)
    - label_smoothing * jax.nn.softplus(margin_B)
  ) / (1.0 - 2.0 * label_smoothing)
  return loss_B, _pair_metrics(margin_B, beta * ratio_Bx2)


def ipo(
  logp_Bx2: jax.Array,
  ref_logp_Bx2: jax.Array,
  *,
  tau: float,
  num_tokens_Bx2: jax.Array | None = None,
):
  r"""IPO, the identity-preference squared loss (Azar et al. 2023, arXiv 2310.12036, eq. 17).

  .. math:: \ell = \left(h - \tfrac{1}{2\tau}\right)^2

  Convention (differs from TRL by default): without `num_tokens_Bx2`, h is built from the sequence
  sums of the log-ratios ρ = log π − log π_ref, as eq. 17 writes it. TRL's IPO (`loss_type="ipo"`)
  averages per token, h = ρ_w/|y_w| − ρ_l/|y_l| — pass `num_tokens_Bx2` (`loss.per_token=True`) to
  match TRL; the IPO authors' reported results also use length-averaged log-probs. The two differ
  by the completion lengths, so the same τ sets a different target for each. TRL passes τ as `beta`
  (ALGORITHMS.md §5.3). The gradient vanishes at h = 1/(2τ), so the margin is regressed onto a
  finite target instead of pushed to ∞.

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    tau: regularisation strength τ > 0; the target margin is 1/(2τ).
    num_tokens_Bx2: completion lengths (clamped to ≥ 1); None for sequence-sum log-ratios.

  Returns:
    loss_B and per-prompt metrics: margin h (the regressed quantity), accuracy 1[h > 0], and the
    log-ratios ρ of chosen and rejected (per token when lengths are given) as rewards.

  Examples:
    >>> logp, ref = jnp.array([[-10., -12.]]), jnp.array([[-10.5, -11.5]])
    >>> print(f"{ipo(logp, ref, tau=0.1)[0][0]:.6f}")   # (1 − 5)², ALGORITHMS.md §7.7
    16.000000
    >>> loss, _ = ipo(logp, ref, tau=0.1, num_tokens_Bx2=jnp.array([[20., 10.]]))
    >>> print(f"{loss[0]:.4f}")   # (0.075 − 5)² = 24.255625 (float32 here; exact in float64)
    24.2556
  """
  if not tau > 0:
    raise ConfigError(f"ipo tau must be > 0; got {tau}")
  ratio_Bx2 = _log_ratios(logp_Bx2, ref_logp_Bx2, num_tokens_Bx2)
  h_B = ratio_Bx2[:, 0] - ratio_Bx2[:, 1]
  loss_B = jnp.square(h_B - 1.0 / (2.0 * tau))
  return loss_B, _pair_metrics(h_B, ratio_Bx2)


def slic_hinge(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array, *, beta: float, delta: float = 1.0):
  r"""Reference-normalised SLiC hinge (RSO; LiPO "pair-hinge" at K = 2; TRL "hinge").

  .. math:: \ell = \max(0,\ \delta - \beta h)

  The calibration hinge of SLiC-HF with the policy log-likelihood replaced by the log-ratio to the
  reference. δ = 1 is the form TRL and LiPO use (ALGORITHMS.md §5.4, §3.2); for the original
  reference-free SLiC-HF loss see `slic_hf`. Zero loss and zero gradient once βh ≥ δ.

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    beta: scale of the log-ratio margin.
    delta: the hinge margin δ (1 in TRL / LiPO / RSO).

  Returns:
    loss_B and per-prompt metrics: margin β·h, accuracy 1[h > 0], and the implicit rewards.

  Examples:
    >>> loss, _ = slic_hinge(jnp.array([[-10., -12.]]), jnp.array([[-10.5, -11.5]]), beta=0.1)
    >>> print(f"{loss[0]:.6f}")   # max(0, 1 − 0.1), ALGORITHMS.md §7.7
    0.900000
  """
  ratio_Bx2 = _log_ratios(logp_Bx2, ref_logp_Bx2)
  margin_B = beta * (ratio_Bx2[:, 0] - ratio_Bx2[:, 1])
  return jax.nn.relu(delta - margin_B), _pair_metrics(margin_B, beta * ratio_Bx2)


def slic_hf(logp_Bx2: jax.Array, target_logp_B: jax.Array, *, delta: float, lam: float):
  r"""Original SLiC-HF: rank calibration plus a cross-entropy regulariser (Zhao et al. 2023, arXiv 2305.10425).

  .. math:: \ell = \max(0,\ \delta - \log\pi_\theta(y_w|x) + \log\pi_\theta(y_l|x)) - \lambda\,\log\pi_\theta(y_{\rm ref}|x)

  No reference model: the calibration term uses the policy's own sequence log-likelihoods, and the
  regulariser is the sequence NLL of a target response y_ref (an SFT target; pass the chosen response's
  log-prob to regularise towards y_w). The form is [M] in ALGORITHMS.md §5.4 (recalled, not re-read), and
  so are the paper's δ and λ: both are required here, with no defaults. Calibration loss and its gradient
  are zero once log π(y_w) − log π(y_l) ≥ δ; the regulariser always contributes −λ to ∂ℓ/∂ log π(y_ref).

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    target_logp_B: policy sequence log-prob of the regularisation target y_ref (differentiated).
    delta: calibration margin δ on the log-likelihood difference.
    lam: weight λ of the cross-entropy regulariser.

  Returns:
    loss_B and per-prompt metrics: margin log π(y_w) − log π(y_l), accuracy 1[margin > 0], the
    calibration (hinge) part, and the target's NLL.

  Examples:
    >>> loss, m = slic_hf(jnp.array([[-10., -12.]]), jnp.array([-9.]), delta=1.0, lam=0.5)
    >>> print(f"{loss[0]:.6f} {m['calibration'][0]:.6f}")   # 0 + 0.5·9, ALGORITHMS.md §7.7
    4.500000 0.000000
  """
  margin_B = logp_Bx2[:, 0] - logp_Bx2[:, 1]
  calibration_B = jax.nn.relu(delta - margin_B)
  metrics = {
    "margin": margin_B,
    "accuracy": (margin_B > 0).astype(jnp.float32),
    "calibration": calibration_B,
    "target_nll": -target_logp_B,
  }
  return calibration_B - lam * target_logp_B, metrics


def ln_dpo(logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array, num_tokens_Bx2: jax.Array, *, beta: float):
  r"""Length-normalised DPO (Ahrabian et al. 2024, arXiv 2407.15229).

  .. math:: \ell = \mathrm{softplus}\!\left(-\beta\left[\frac{\rho_w}{|y_w|} - \frac{\rho_l}{|y_l|}\right]\right)

  DPO on per-token log-ratios (policy and reference both averaged over the completion's tokens); TRL's
  "sigmoid_norm" (ALGORITHMS.md §5.5). Margins shrink by about 1/length, so β must be far larger than for
  DPO; the paper's recommended β is unconfirmed, so there is no default.

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    num_tokens_Bx2: completion lengths |y_w|, |y_l| (clamped to ≥ 1).
    beta: inverse temperature of the per-token implicit reward.

  Returns:
    loss_B and per-prompt metrics: margin β·h_LN, accuracy 1[h_LN > 0], and the per-token rewards.

  Examples:
    >>> loss, _ = ln_dpo(jnp.array([[-10., -12.]]), jnp.array([[-10.5, -11.5]]),
    ...                  jnp.array([[20., 10.]]), beta=1.0)
    >>> print(f"{loss[0]:.6f}")   # softplus(−0.075), ALGORITHMS.md §7.7
    0.656350
  """
  ratio_Bx2 = _log_ratios(logp_Bx2, ref_logp_Bx2, num_tokens_Bx2)
  margin_B = beta * (ratio_Bx2[:, 0] - ratio_Bx2[:, 1])
  return jax.nn.softplus(-margin_B), _pair_metrics(margin_B, beta * ratio_Bx2)


def todo(
  logp_Bx2: jax.Array, ref_logp_Bx2: jax.Array, is_tie_B: jax.Array, *, beta: float, alpha: float
):
  r"""Tie-rank oriented DPO, registry `todo` (Guo et al., ICLR 2025, arXiv 2411.02442).

  A Rao–Kupper Bradley–Terry model with tie parameter α > 0 on ℓ = βh:

  .. math::
    P(y_w \succ y_l) = \sigma(\ell - \alpha), \quad P(y_l \succ y_w) = \sigma(-\ell - \alpha), \quad
    P(\mathrm{tie}) = (e^{2\alpha} - 1)\,\sigma(\ell - \alpha)\,\sigma(-\ell - \alpha)

  and the loss is the negative log-likelihood of the observed ternary label:

  .. math::
    \ell_{\rm pref} = \mathrm{softplus}(\alpha - \ell), \qquad
    \ell_{\rm tie} = -\log(e^{2\alpha} - 1) + \mathrm{softplus}(\ell + \alpha) + \mathrm{softplus}(\alpha - \ell)

  Without ties this is DPO with margin α, softplus(−(βh − α)), and DPO as α → 0. The tie loss is
  symmetric in the order of the pair and minimal at ℓ = 0. The official configs use α = 0.5 and
  β = 0.01 (stored in the code as θ = −α); the optional label smoothing of the preference term is not
  implemented here (ALGORITHMS.md §5.8).

  Args:
    logp_Bx2: sequence log-probs of [y_1, y_2] under the policy ([chosen, rejected] when not tied).
    ref_logp_Bx2: the same under the frozen reference (no gradient flows into it).
    is_tie_B: 1/True where the pair is labelled a tie.
    beta: inverse temperature of the implicit reward.
    alpha: tie parameter α > 0.

  Returns:
    loss_B and per-prompt metrics: margin ℓ = βh, the three model probabilities (p_win, p_lose, p_tie),
    accuracy (the largest of the three is the label: win for a preference pair, tie for a tie), and the
    implicit rewards.

  Examples:
    >>> logp, ref = jnp.array([[-10., -12.]] * 2), jnp.array([[-10.5, -11.5]] * 2)
    >>> loss, m = todo(logp, ref, jnp.array([False, True]), beta=0.1, alpha=0.5)
    >>> print(f"{loss[0]:.6f} {loss[1]:.6f}")   # preference, tie; ALGORITHMS.md §7.7
    0.913015 1.409178
    >>> print(f"{m['p_win'][0]:.6f} {m['p_lose'][0]:.6f} {m['p_tie'][0]:.6f}")
    0.401312 0.354344 0.244344
  """
  if not alpha > 0:
    raise ConfigError(f"todo alpha must be > 0; got {alpha}")
  ratio_Bx2 = _log_ratios(logp_Bx2, ref_logp_Bx2)
  margin_B = beta * (ratio_Bx2[:, 0] - ratio_Bx2[:, 1])
  log_p_win_B = jax.nn.log_sigmoid(margin_B - alpha)
  log_p_lose_B = jax.nn.log_sigmoid(-margin_B - alpha)
  log_p_tie_B = jnp.log(jnp.expm1(2.0 * alpha)) + log_p_win_B + log_p_lose_B
  is_tie_B = jnp.asarray(is_tie_B).astype(bool)
  loss_B = jnp.where(is_tie_B, -log_p_tie_B, -log_p_win_B)
  log_p_Bx3 = jnp.stack([log_p_win_B, log_p_lose_B, log_p_tie_B], axis=-1)
  predicted_B = jnp.argmax(log_p_Bx3, axis=-1)
  metrics = {
    "margin": margin_B,
    "accuracy": (predicted_B == jnp.where(is_tie_B, 2, 0)).astype(jnp.float32),
    "p_win": jnp.exp(log_p_win_B),
    "p_lose": jnp.exp(log_p_lose_B),
    "p_tie": jnp.exp(log_p_tie_B),
    "reward_chosen": beta * ratio_Bx2[:, 0],
    "reward_rejected": beta * ratio_Bx2[:, 1],
  }
  return loss_B, metrics


def _per_token(logp_Bx2: jax.Array, num_tokens_Bx2: jax.Array) -> jax.Array:
  """ℓ = log π(y)/|y|: length-averaged log-probs (lengths clamped ≥ 1, no gradient into them)."""
  return logp_Bx2 / jnp.maximum(jax.lax.stop_gradient(num_tokens_Bx2), 1.0)


def simpo(logp_Bx2: jax.Array, num_tokens_Bx2: jax.Array, *, beta: float, gamma: float):
  r"""SimPO, simple preference optimisation (Meng et al. 2024, arXiv 2405.14734, eq. 6).

  .. math::
    \ell = -\log\sigma\!\left(\frac{\beta}{|y_w|}\log\pi(y_w) - \frac{\beta}{|y_l|}\log\pi(y_l)
                              - \gamma\right)

  Reference-free: the implicit reward is the length-averaged log-likelihood β·log π(y)/|y| (|y| the
  number of scored tokens), and γ is a target reward margin. TRL's `CPOTrainer` with
  `loss_type="simpo"` and `cpo_alpha=0` is this loss with `beta` = β and `simpo_gamma` = γ (it
  subtracts simpo_gamma/β from the log-prob gap, then scales by β); the authors' code takes
  `gamma_beta_ratio` = γ/β instead, so γ = gamma_beta_ratio·β.

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    num_tokens_Bx2: completion lengths |y_w|, |y_l| (clamped to ≥ 1; no gradient).
    beta: scale β of the length-averaged reward.
    gamma: target reward margin γ.

  Returns:
    loss_B and per-prompt metrics: margin β(ℓ_w − ℓ_l) (without γ), accuracy 1[margin > 0], and
    the rewards β·ℓ of chosen and rejected (TRL's `rewards/*`).

  Examples:
    >>> loss, m = simpo(jnp.array([[-10., -12.]]), jnp.array([[20., 10.]]), beta=2.0, gamma=1.0)
    >>> print(f"{loss[0]:.6f} {m['margin'][0]:.6f}")   # softplus(−(2·(−0.5 + 1.2) − 1))
    0.513015 1.400000
  """
  ell_Bx2 = _per_token(logp_Bx2, num_tokens_Bx2)
  margin_B = beta * (ell_Bx2[:, 0] - ell_Bx2[:, 1])
  return jax.nn.softplus(gamma - margin_B), _pair_metrics(margin_B, beta * ell_Bx2)


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012); finite gradients for x < 0."""
  near_zero = x > -math.log(2.0)
  small_x = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
  large_x = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
  return jnp.where(near_zero, small_x, large_x)


def orpo(logp_Bx2: jax.Array, num_tokens_Bx2: jax.Array, *, lam: float):
  r"""ORPO, odds-ratio preference optimisation (Hong et al. 2024, arXiv 2403.07691, eqs. 6–7).

  .. math::
    \ell = -\ell_w - \lambda\log\sigma\big(\mathrm{odds}(\ell_w) - \mathrm{odds}(\ell_l)\big),
    \qquad \mathrm{odds}(\ell) = \ell - \log(1 - e^{\ell}), \qquad \ell = \log\pi(y)/|y|

  Reference-free: the length-averaged NLL of the chosen response (the SFT term) plus λ times the
  log-odds-ratio loss, both on the length-averaged log-likelihood ℓ. log(1 − e^ℓ) is computed in
  log space (log1p(−e^ℓ) or log(−expm1(ℓ)), whichever is accurate), on ℓ clamped to at most −ε
  (the dtype's machine epsilon): an empty or certain response, ℓ = 0, gets a large finite log-odds
  instead of +∞ (TRL's log1p(−exp) gives inf or NaN there). TRL's `ORPOTrainer` calls λ `beta`
  (default 0.1) and logs the same log σ(·) as `log_odds_ratio`; its NLL is the cross-entropy
  averaged over all chosen tokens of the batch, ours the per-token NLL of each chosen response
  averaged over the batch (the same when the chosen responses have one length).

  Args:
    logp_Bx2: sequence log-probs of [chosen, rejected] under the policy.
    num_tokens_Bx2: completion lengths |y_w|, |y_l| (clamped to ≥ 1; no gradient).
    lam: weight λ of the odds-ratio term.

  Returns:
    loss_B and per-prompt metrics: margin odds(ℓ_w) − odds(ℓ_l) (TRL's `log_odds_chosen`), accuracy
    1[margin > 0], `log_odds_ratio` log σ(margin), `nll` −ℓ_w, and the rewards λ·ℓ.

  Examples:
    >>> loss, m = orpo(jnp.array([[-10., -12.]]), jnp.array([[20., 10.]]), lam=0.1)
    >>> print(f"{loss[0]:.6f} {m['margin'][0]:.6f}")   # 0.5 + 0.1·softplus(−1.274370)
    0.524655 1.274370
  """
  ell_Bx2 = _per_token(logp_Bx2, num_tokens_Bx2)
  below_one_Bx2 = jnp.minimum(ell_Bx2, -jnp.finfo(ell_Bx2.dtype).eps)
  log_odds_Bx2 = below_one_Bx2 - _log1mexp(below_one_Bx2)
  margin_B = log_odds_Bx2[:, 0] - log_odds_Bx2[:, 1]
  log_odds_ratio_B = jax.nn.log_sigmoid(margin_B)
  nll_B = -ell_Bx2[:, 0]
  metrics = {
    **_pair_metrics(margin_B, lam * ell_Bx2),
    "log_odds_ratio": log_odds_ratio_B,
    "nll": nll_B,
  }
  return nll_B - lam * log_odds_ratio_B, metrics


# -------------------------------------------------------------------------------------------------
# Objectives on a batch: fn(logp_BxK, batch, stats, **loss_cfg) -> (loss_B, metrics_B, stats).
# K = 2 ([chosen, rejected]); batch["ref_logp_BxK"] is the frozen reference where one is needed,
# batch["is_tie_B"] marks ternary ties, batch["loss_mask_BxKxL"] gives the lengths.


def dpo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`dpo` on a pairs batch; `cfg` is its keyword arguments (beta)."""
  return (*dpo(logp_BxK, batch["ref_logp_BxK"], **cfg), stats)


def cdpo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`cdpo` on a pairs batch; `cfg` is its keyword arguments (beta, label_smoothing)."""
  return (*cdpo(logp_BxK, batch["ref_logp_BxK"], **cfg), stats)


def rdpo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, **cfg):
  """`rdpo` on a pairs batch; `cfg` is its keyword arguments (beta, label_smoothing)."""
  return (*rdpo(logp_BxK, batch["ref_logp_BxK"], **cfg), stats)


def ipo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, *, tau: float, per_token: bool):
  """`ipo` on a pairs batch: per-token log-ratios when `per_token`, else sequence sums."""
  lengths_BxK = num_tokens(batch) if per_token else None
  return (*ipo(logp_BxK, batch["ref_logp_BxK"], tau=tau, num_tokens_Bx2=lengths_BxK), stats)


def slic_objective(logp_BxK: jax.Array, batch: dict, stats: dict, *, delta: float, lam: float):
  """`slic_hf` on a pairs batch; the cross-entropy regulariser targets the chosen response (an SFT
  target per prompt)."""
  del batch
  return (*slic_hf(logp_BxK, logp_BxK[:, 0], delta=delta, lam=lam), stats)


def ln_dpo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, *, beta: float):
  """`ln_dpo` on a pairs batch, lengths from its loss mask."""
  return (*ln_dpo(logp_BxK, batch["ref_logp_BxK"], num_tokens(batch), beta=beta), stats)


def todo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, *, beta: float, alpha: float):
  """`todo` on a ternary batch (pairs with `is_tie_B`)."""
  return (*todo(logp_BxK, batch["ref_logp_BxK"], batch["is_tie_B"], beta=beta, alpha=alpha), stats)


def simpo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, *, beta: float, gamma: float):
  """`simpo` on a pairs batch (no reference), lengths from its loss mask."""
  return (*simpo(logp_BxK, num_tokens(batch), beta=beta, gamma=gamma), stats)


def orpo_objective(logp_BxK: jax.Array, batch: dict, stats: dict, *, lam: float):
  """`orpo` on a pairs batch (no reference), lengths from its loss mask."""
  return (*orpo(logp_BxK, num_tokens(batch), lam=lam), stats)
