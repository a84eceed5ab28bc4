"""Energy-based targets for distribution matching (GDC / f-DPG, ALGORITHMS.md §1.1–§1.2, §5.11).

A target is an unnormalised log P(x) = log a(x) + (constraint terms): p = P/Z with Z = Σ_x P(x),
or per context P_c(y) with its own Z_c (CDPG). Every function is elementwise over its log-prob
argument, so the same call builds the target on an enumerated testbed table [X, Y] (normalise with
`align_jax.testbed.exact.normalize`) or on a sampled batch [B, K] (then Z comes from
`objectives.fdpg.update_log_z`). No gradient is meant to flow through a target.

Hybrid targets (§1.1.3) compose: `exponential(pointwise(a, b), φ, λ)` = log(a·b·exp(λ·φ)), with λ
fitted by `fit_lambda` on the base a·b (log weights from `pointwise`).
"""

import jax
import jax.numpy as jnp
from align_jax.errors import ConfigError


def pointwise(base_logp: jax.Array, b: jax.Array, *, epsilon: float = 0.0) -> jax.Array:
  r"""GDC pointwise constraints: log P = log(a·b), so p = a(· | b = 1) and Z = E_a[b] (§1.1.1).

  .. math:: \log P(x) = \log a(x) + \log\max(b(x), \varepsilon)

  b ∈ {0, 1} is the product of the binary features that must all hold (pass the product); samples
  with b = 0 get log P = −∞ (outside the support). ε > 0 is the smoothed constraint
  b_ε = max(b, ε) (ALGORITHMS.md §1.10): every sample keeps positive mass, which makes reverse KL
  (and Pearson, Amari α > 1) finite, at the price of a target that puts mass ∝ ε·a on violations.

  Args:
    base_logp: log a(x) of the original model, any shape ([X, Y] table or [B, K] samples).
    b: constraint indicator (bool or {0, 1}), broadcastable to `base_logp`.
    epsilon: smoothing ε ∈ [0, 1); 0 gives the hard constraint.

  Returns:
    log P with the shape of `base_logp`.

  Examples:
    >>> log_P = pointwise(jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1])), jnp.array([1, 0, 1, 1]))  # §7.1
    >>> print(" ".join(f"{v:.1f}" for v in jnp.exp(log_P)))
    0.4 0.0 0.2 0.1
    >>> print(f"Z = {jnp.exp(jax.nn.logsumexp(log_P)):.1f}")
    Z = 0.7
  """
  if not 0.0 <= epsilon < 1.0:
    raise ConfigError(f"pointwise epsilon must lie in [0, 1); got {epsilon}")
  b = jnp.asarray(b).astype(jnp.result_type(base_logp))
  return base_logp + jnp.log(jnp.maximum(b, epsilon))


def exponential(base_logp: jax.Array, phi: jax.Array, lam_F: jax.Array) -> jax.Array:
  r"""GDC distributional constraints: the exponential family log P = log(a·exp(λ·φ)) (§1.1.2).

  .. math:: \log P(x) = \log a(x) + \textstyle\sum_f \lambda_f \phi_f(x)

  The I-projection of a onto {c : E_c[φ] = μ̄} when λ solves the moment matching of `fit_lambda`.
  The base may itself be a target (hybrid: pass `pointwise(a, b)`).

  Args:
    base_logp: log a(x) (or log a·b), any shape S.
    phi: features φ(x), shape S + [F].
    lam_F: natural parameters λ, shared by every context.

  Returns:
    log P with shape S.

  Examples:
    >>> a = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1]))
    >>> log_P = exponential(a, jnp.array([[1.], [0.], [1.], [0.]]), jnp.log(jnp.array([2 / 3])))
    >>> p = jnp.exp(log_P - jax.nn.logsumexp(log_P))
    >>> print(f"{p[0] + p[2]:.4f}")   # E_p[φ] = μ̄ = 0.5 at λ* = log(2/3), ALGORITHMS.md §7.1
    0.5000
  """
  return base_logp + jnp.einsum("...f,f->...", phi, lam_F)


def rlhf(base_logp: jax.Array, reward: jax.Array, beta: float) -> jax.Array:
  r"""The KL-regularised RLHF target log P = log(a·exp(r/β)) (§1.1.4, §1.7).

  p = P/Z maximises E_π[r] − β KL(π‖a); reverse-KL f-DPG on it is REINFORCE on r − β log(π/a).
  Normalised per context (`exact.normalize`) it is the KL-regularised optimum.

  Args:
    base_logp: log a(x), any shape.
    reward: r(x), broadcastable to `base_logp`.
    beta: KL coefficient β > 0.

  Returns:
    log P with the shape of `base_logp`.

  Examples:
    >>> log_P = rlhf(jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1])), jnp.array([1., 0., 2., -1.]), 1.0)
    >>> print(f"{jnp.exp(jax.nn.logsumexp(log_P)):.5f}")   # Z = 2.901912, ALGORITHMS.md §7.1
    2.90191
  """
  if isinstance(beta, (int, float)) and not beta > 0:  # A traced β is the caller's to check.
    raise ConfigError(f"rlhf beta must be > 0; got {beta}")
  return base_logp + reward / beta


def lsc(reward: jax.Array, reward_ref: jax.Array) -> jax.Array:
  r"""LSC reward transformation u = log σ(r − r_ref) (Wang et al. 2024, arXiv 2402.00742; §5.11).

  The log-probability, under Bradley–Terry, that a response is better than the prompt's reference
  level: u < 0, increasing and concave (du/dr = σ(r_ref − r): diminishing returns), invariant to a
  common shift of r and r_ref; summing u over properties is the log of the product of the
  probabilities (logical AND). Use it as the reward of `rlhf` (target ∝ a·σ(r − r_ref)^{1/β}) or of
  any RL objective.

  Args:
    reward: Bradley–Terry reward r(x, y), any shape.
    reward_ref: per-prompt reference reward r_ref(x), broadcastable to `reward`.

  Returns:
    u with the broadcast shape; computed as −softplus(r_ref − r).

  Examples:
    >>> u = lsc(jnp.array([1.2, -0.3]), jnp.array([0.5, 0.1]))
    >>> print(f"{u[0]:.6f} {u[1]:.6f}")   # log σ(0.7), log σ(−0.4); ALGORITHMS.md §7.7
    -0.403186 -0.913015
  """
  return jax.nn.log_sigmoid(reward - reward_ref)


def _expected_features(lam_F, phi_XxNxF, log_weight_XxN, prompt_w_X):
  """Σ_x w_x Σ_n softmax_n(log weight + λ·φ) φ — SNIS per prompt, then the prompt average."""
  log_omega_XxN = log_weight_XxN + jnp.einsum("xnf,f->xn", phi_XxNxF, lam_F)
  s_XxN = jax.nn.softmax(log_omega_XxN, axis=-1)
  return jnp.einsum("x,xn,xnf->f", prompt_w_X, s_XxN, phi_XxNxF)


def fit_lambda(
  phi: jax.Array,
  log_weight: jax.Array,
  mu_bar_F: jax.Array,
  *,
  lr: float,
  tol: float,
  max_iter: int,
  prompt_logw_X: jax.Array | None = None,
  lam_init_F: jax.Array | None = None,
):
  r"""Moment matching for GDC distributional constraints by SNIS (ALGORITHMS.md §1.2).

  Finds λ with E[φ] = μ̄ under P_λ = a·exp(λ·φ), by ascent on the concave dual
  g(λ) = λ·μ̄ − Σ_x w_x log Z_x(λ) from a fixed pool of samples:

  .. math::
    \log\omega_{xn} = \lambda\cdot\phi_{xn} + \text{log\_weight}_{xn},\quad
    \hat\mu(\lambda) = \sum_x w_x \sum_n \mathrm{softmax}_n(\log\omega_{x\cdot})\,\phi_{xn},\quad
    \lambda \leftarrow \lambda + \eta\,(\bar\mu - \hat\mu(\lambda))

  until max_f |μ̄ − μ̂| < tol (naver/disco's criterion; naver/gdc uses the L2 norm < 0.01 with
  η = 0.5, disco η = 0.05, tol 1e-5; both ≤ 1000 iterations). λ is shared by all contexts (GDC: the
  constraint is one unconditional moment over (prompt, response) pairs, E_{x∼w, y∼p_λ(·|x)}[φ], with
  each context normalised by its own Z_x(λ) so the prompt distribution stays w).

  Layouts:

  * pooled, unconditional GDC: `phi` [N, F] and `log_weight` [N] for N samples of q, log weight
    log a − log q (0 when q = a); one self-normalisation over the pool.
  * per prompt: `phi` [X, N, F], `log_weight` [X, N] — N samples of each context, normalised within
    the context, averaged with `prompt_logw_X` (default uniform: contexts sampled from w).
  * exact, on a testbed table: `phi` [X, Y, F] of all responses and `log_weight` = the exact base
    log a(y|x) (or log a·b from `targets.pointwise` for a hybrid; −inf entries drop out) with the
    true `prompt_logw_X`: then μ̂ is the exact moment and λ the exact dual optimum.

  The pooled layout over all (x, y) pairs of a conditional table (log weight log w_x + log a(y|x))
  is a different problem: normalising jointly lets λ shift the prompt marginal away from w.

  A feature that never fires in the pool cannot reach a positive target: λ diverges and `converged`
  is False.

  Args:
    phi: features, [N, F] or [X, N, F].
    log_weight: log ω at λ = 0, [N] or [X, N].
    mu_bar_F: target moments μ̄.
    lr: step size η (1 reaches §7.1's λ* from exact expectations).
    tol: stopping threshold on max |μ̄ − μ̂|.
    max_iter: iteration cap.
    prompt_logw_X: log prompt weights for the [X, N, F] layout (None: uniform).
    lam_init_F: starting λ (None: 0, i.e. p = a).

  Returns:
    (λ_F, achieved moments μ̂(λ)_F, converged): all arrays; runs under `jax.lax.while_loop`.

  Examples:
    >>> lam, mu, ok = fit_lambda(jnp.array([[1.], [0.], [1.], [0.]]),
    ...                          jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1])), jnp.array([0.5]),
    ...                          lr=1.0, tol=1e-6, max_iter=1000)
    >>> print(f"{lam[0]:.4f} {mu[0]:.4f} {ok}")   # λ* = log(2/3) = −0.405465, ALGORITHMS.md §7.1
    -0.4055 0.5000 True
  """
  if phi.ndim == 2:
    phi, log_weight = phi[None], log_weight[None]
  if phi.ndim != 3 or log_weight.shape != phi.shape[:2]:
    raise ConfigError(
      f"fit_lambda wants phi [N, F] or [X, N, F] and log_weight [N] or [X, N]; got "
      f"{phi.shape} and {log_weight.shape}"
    )
  dtype = jnp.result_type(phi, log_weight, mu_bar_F, jnp.float32)
  phi, log_weight = jnp.asarray(phi, dtype), jnp.asarray(log_weight, dtype)
  mu_bar_F = jnp.asarray(mu_bar_F, dtype)
  num_x = phi.shape[0]
  if prompt_logw_X is None:
    prompt_w_X = jnp.full((num_x,), 1.0 / num_x, dtype)
  else:
    prompt_w_X = jnp.exp(jnp.asarray(prompt_logw_X, dtype))
  lam_F = jnp.zeros(phi.shape[-1:], dtype) if lam_init_F is None else jnp.asarray(lam_init_F, dtype)
  moments = lambda lam: _expected_features(lam, phi, log_weight, prompt_w_X)
  error = lambda mu: jnp.max(jnp.abs(mu_bar_F - mu))

  def cond(carry):
    i, _, mu = carry
    return (i < max_iter) & (error(mu) >= tol)

  def body(carry):
    i, lam, mu = carry
    lam = lam + lr * (mu_bar_F - mu)
    return i + 1, lam, moments(lam)

  _, lam_F, mu_F = jax.lax.while_loop(cond, body, (0, lam_F, moments(lam_F)))
  return lam_F, mu_F, error(mu_F) < tol
