"""BCO's underlying distribution matching (UDM): density-ratio weights for undesirable examples.

ALGORITHMS.md §5.7 [R]: a class-balanced logistic-regression classifier on prompt embeddings gives
p̂(desirable | x), and each undesirable example's loss is multiplied by clip(p̂/(1 − p̂), 0.5, 10)
(`bco_udm_weight`). Because the classes are balanced, p̂/(1 − p̂) estimates the prompt density ratio
p_D(x)/p_U(x). TRL embeds prompts with a separate embedding model; our stated choice of "prompt
embedding" is the mean of the reference model's input-embedding rows over the prompt tokens, so no
extra model is needed. Everything here runs once on the whole dataset before training (numpy,
except the final clip); the result is a per-record loss weight, the batch field `udm_weight_B` that
`objectives.binary.bco_objective` reads.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from align_jax.errors import DataError

_CHUNK_ELEMENTS = 1 << 24  # gathered embedding values per chunk in `prompt_features`


def bco_udm_weight(
  prob_desirable_B: jax.Array, *, min_ratio: float = 0.5, max_ratio: float = 10.0
) -> jax.Array:
  r"""BCO's underlying-distribution-matching weight of undesirable examples (ALGORITHMS.md §5.7, [R]).

  .. math:: w = \mathrm{clip}\!\left(\frac{\hat p}{1 - \hat p},\ \text{min\_ratio},\
            \text{max\_ratio}\right)

  p̂ = p̂(desirable | x) comes from a class-balanced logistic-regression classifier on prompt
  embeddings (TRL samples 1024 prompts per class; here `fit_logistic` on `prompt_features`). TRL's
  defaults: min 0.5, max 10. A p̂ of 1 gives the maximum weight.

  Args:
    prob_desirable_B: classifier probability that each example's prompt is from the desirable set.
    min_ratio: lower clip of the density ratio.
    max_ratio: upper clip of the density ratio.

  Returns:
    weight_B, under stop-gradient; pass it to `objectives.binary.bco` as `udm_weight_B`.

  Examples:
    >>> print(bco_udm_weight(jnp.array([0.5, 0.75, 0.2, 1.0])))   # odds 1, 3, 0.25 → 0.5, ∞ → 10
    [ 1.   3.   0.5 10. ]
  """
  p_B = jnp.clip(jax.lax.stop_gradient(prob_desirable_B), 0.0, 1.0)
  return jnp.clip(p_B / (1.0 - p_B), min_ratio, max_ratio)


def prompt_features(
  tokens_NxL: np.ndarray, loss_mask_NxL: np.ndarray, embed_VxD: np.ndarray
) -> np.ndarray:
  """Mean input embedding of each record's prompt tokens.

  The prompt is every position before the first 1 in the loss mask (the completion starts there;
  right padding lies after it). A record with no prompt token, or no completion token at all, gets
  the zero vector.

  Args:
    tokens_NxL: int token ids, prompt + completion + right padding.
    loss_mask_NxL: 1 on completion tokens, 0 elsewhere.
    embed_VxD: the (reference) model's input-embedding table.

  Returns:
    [N, D] float64 features.
  """
  tokens_NxL = np.asarray(tokens_NxL)
  mask_NxL = np.asarray(loss_mask_NxL) > 0
  n, length = tokens_NxL.shape
  has_completion_N = mask_NxL.any(axis=1)
  prompt_len_N = np.where(has_completion_N, np.argmax(mask_NxL, axis=1), 0)
  prompt_NxL = np.arange(length)[None, :] < prompt_len_N[:, None]
  out_NxD = np.zeros((n, embed_VxD.shape[1]), np.float64)
  rows = max(1, _CHUNK_ELEMENTS // max(1, length * embed_VxD.shape[1]))
  for start in range(0, n, rows):
    sl = slice(start, start + rows)
    gathered_nxLxD = np.asarray(embed_VxD[tokens_NxL[sl]], np.float64)
    out_NxD[sl] = np.einsum("nl,nld->nd", prompt_NxL[sl].astype(np.float64), gathered_nxLxD)
  return out_NxD / np.maximum(prompt_len_N, 1)[:, None]


def _objective(z_N, y_N, s_N, v_D, l2):
  """Class-balanced negative log-likelihood plus the ridge penalty (standardised coefficients)."""
  return float(s_N @ (np.logaddexp(0.0, z_N) - y_N * z_N) + 0.5 * l2 * v_D @ v_D)


def fit_logistic(
  features_NxD: np.ndarray,
  labels_N: np.ndarray,
  *,
  l2: float = 1e-3,
  max_iter: int = 100,
  tol: float = 1e-8,
) -> tuple[np.ndarray, float]:
  r"""Class-balanced, L2-regularised logistic regression by damped Newton's method (IRLS), float64.

  Sample weights s_i = 1/(2 n_{class(i)}) sum to 1/2 per class. Features are standardised with the
  s-weighted mean μ and standard deviation σ (σ = 1 where a feature is constant), and the minimised
  objective, with z = x̃·v + c on standardised x̃ = (x − μ)/σ and the intercept c unpenalised, is

  .. math:: \sum_i s_i\,[\mathrm{softplus}(z_i) - y_i z_i] + \tfrac{\lambda}{2}\lVert v\rVert^2

  so duplicating a class's examples changes nothing. The result is folded back into the raw
  feature space: w = v/σ, b = c − μ·w, i.e. logit(p̂) = x·w + b. Iteration stops once the gradient's
  largest entry is below `tol` (or after `max_iter` Newton steps, with a warning).

  Args:
    features_NxD: features, one row per example.
    labels_N: 1/True for the positive (desirable) class, 0/False otherwise.
    l2: ridge strength λ ≥ 0 on the standardised coefficients.
    max_iter: most Newton steps.
    tol: convergence threshold on the gradient's max-norm.

  Returns:
    (w_D float64, b float) in the raw feature space.

  Raises:
    ValueError: if either class has no example.
  """
  x_NxD = np.asarray(features_NxD, np.float64)
  y_N = (np.asarray(labels_N) > 0).astype(np.float64)
  n_pos, n_neg = int(y_N.sum()), int(y_N.size - y_N.sum())
  if n_pos == 0 or n_neg == 0:
    raise DataError(
      f"fit_logistic needs examples of both classes; got {n_pos} positive "
      f"(desirable) and {n_neg} negative (undesirable)"
    )
  s_N = np.where(y_N > 0, 0.5 / n_pos, 0.5 / n_neg)
  mu_D = s_N @ x_NxD / s_N.sum()
  sigma_D = np.sqrt(s_N @ (x_NxD - mu_D) ** 2 / s_N.sum())
  sigma_D = np.where(sigma_D > 0, sigma_D, 1.0)
  z_NxE = np.concatenate([(x_NxD - mu_D) / sigma_D, np.ones((len(y_N), 1))], axis=1)
  ridge_E = np.append(np.full(x_NxD.shape[1], l2), 0.0)
  theta_E = np.zeros(z_NxE.shape[1])
  logit_N = z_NxE @ theta_E
  loss = _objective(logit_N, y_N, s_N, theta_E[:-1], l2)
  for _ in range(max_iter):
    p_N = np.exp(-np.logaddexp(0.0, -logit_N))
    grad_E = z_NxE.T @ (s_N * (p_N - y_N)) + ridge_E * theta_E
    if np.max(np.abs(grad_E)) < tol:
      break
    hess_ExE = (z_NxE * (s_N * p_N * (1.0 - p_N))[:, None]).T @ z_NxE + np.diag(ridge_E)
    try:
      step_E = np.linalg.solve(hess_ExE, grad_E)
    except np.linalg.LinAlgError:
      step_E = np.linalg.lstsq(hess_ExE, grad_E, rcond=None)[0]
    t = 1.0  # backtracking (Armijo) keeps Newton monotone on near-separable data
    while t > 1e-10:
      new_theta_E = theta_E - t * step_E
      new_logit_N = z_NxE @ new_theta_E
      new_loss = _objective(new_logit_N, y_N, s_N, new_theta_E[:-1], l2)
      if new_loss <= loss - 1e-4 * t * (grad_E @ step_E) or t * (grad_E @ step_E) < 1e-13:
        break
      t *= 0.5
    else:
      break  # no decrease possible at float64 precision: at the optimum
    theta_E, logit_N, loss = new_theta_E, new_logit_N, new_loss
  else:
    logging.warning(
      "fit_logistic: no convergence in %d Newton steps (gradient max %.3g)",
      max_iter,
      np.max(np.abs(grad_E)),
    )
  w_D = theta_E[:-1] / sigma_D
  return w_D, float(theta_E[-1] - mu_D @ w_D)


def balanced_subsample(desirable_N: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
  """Sorted indices of at most `per_class` records of each class, drawn without replacement."""
  rng = np.random.default_rng(seed)
  desirable_N = np.asarray(desirable_N) > 0.5
  picks = []
  for members in (np.flatnonzero(desirable_N), np.flatnonzero(~desirable_N)):
    picks.append(rng.choice(members, size=min(per_class, members.size), replace=False))
  return np.sort(np.concatenate(picks))


def density_ratio_weights(
  tokens_KxL: np.ndarray,
  loss_mask_KxL: np.ndarray,
  desirable_N: np.ndarray,
  embed_VxD: np.ndarray,
  *,
  per_class: int = 1024,
  seed: int = 0,
  min_ratio: float = 0.5,
  max_ratio: float = 10.0,
) -> np.ndarray:
  """Per-record UDM loss weights for a binary dataset (ALGORITHMS.md §5.7; TRL defaults).

  Fits `fit_logistic` on the prompt features (`prompt_features` of K index 0) of a seeded,
  class-balanced subsample (`balanced_subsample`, at most `per_class` prompts per class), predicts
  p̂(desirable | x) for every record and returns `bco_udm_weight(p̂)` for undesirable records and
  exactly 1.0 for desirable ones. The result can be used directly as a per-example loss weight
  (multiply every record's loss by it); `bco` ignores the desirable entries anyway.

  Args:
    tokens_KxL: [N, K, L] int token ids; K index 0 is the example's prompt + completion.
    loss_mask_KxL: [N, K, L] completion-token mask.
    desirable_N: [N] 1 for desirable records, 0 for undesirable ones.
    embed_VxD: the reference model's input-embedding table.
    per_class: most prompts per class used to fit the classifier.
    seed: subsampling seed.
    min_ratio: lower clip of the density ratio.
    max_ratio: upper clip of the density ratio.

  Returns:
    [N] float32 weights.

  Raises:
    ValueError: if either class has no record.
  """
  desirable_N = np.asarray(desirable_N) > 0.5
  x_NxD = prompt_features(np.asarray(tokens_KxL)[:, 0], np.asarray(loss_mask_KxL)[:, 0], embed_VxD)
  fit_idx = balanced_subsample(desirable_N, per_class, seed)
  w_D, b = fit_logistic(x_NxD[fit_idx], desirable_N[fit_idx])
  p_N = np.exp(-np.logaddexp(0.0, -(x_NxD @ w_D + b)))
  ratio_N = np.asarray(bco_udm_weight(p_N, min_ratio=min_ratio, max_ratio=max_ratio), np.float32)
  return np.where(desirable_N, np.float32(1.0), ratio_N)
