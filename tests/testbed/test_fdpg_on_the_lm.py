"""f-DPG and GDC on the testbed's language model: exact expected gradients, the RLHF identity, moment matching.

Enumeration makes every expectation a finite sum: with every response of every prompt in one batch
and a uniform proposal q = 1/Y, the estimator's batch mean IS its expectation under q, so its
gradient must equal the autodiff gradient of the exact divergence (float64).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from align_jax import config_lib, models, targets
from align_jax.objectives import fdpg
from align_jax.testbed import exact, task

CFG = dataclasses.replace(
  models.ModelConfig(**models.preset("tiny")), n_layers=1, dtype="float64", param_dtype="float64"
)


@pytest.fixture(scope="module")
def testbed():
  tb_cfg = config_lib.base().testbed
  tb_cfg.prompt_len, tb_cfg.response_len = 1, 2  # 8 prompts x 64 responses.
  return task.make(tb_cfg)


def _policy(testbed, seed):
  with jax.enable_x64(True):
    graphdef, _, _ = models.abstract(CFG)
    params = models.init_params(CFG, jax.random.key(seed))
    return graphdef, params, task.exact_logp_fn(graphdef, testbed, chunk=None)


DIVERGENCES = [
  ("forward_kl", None),
  ("reverse_kl", None),
  ("tv", None),
  ("js", None),
  ("amari", 0.5),
  ("amari", 2.0),
  ("pearson", None),
  ("neyman", None),
]


def test_expected_surrogate_gradient_is_the_exact_divergence_gradient(testbed):
  """For every divergence, ∇_θ of the expected surrogate equals ∇_θ D_f(π_θ‖p) (float64).

  Both are functions of the enumerated table log π_θ(y|x), so each parameter gradient is the
  model's vector-Jacobian product with the table gradient: one forward pass serves all of them.
  The table gradients themselves differ (they agree only along normalised directions), so the
  comparison must be made in parameter space, as here.
  """
  with jax.enable_x64(True):
    graphdef, params, logp_fn = _policy(testbed, 0)
    base_XxY = logp_fn(models.init_params(CFG, jax.random.key(1)))  # The target's a.
    log_P_XxY = base_XxY + jnp.asarray(testbed.reward_XxY, jnp.float64) / 2.0  # P = a·exp(r/2)
    log_z_X = jax.nn.logsumexp(log_P_XxY, axis=1)  # Exact per-prompt Z.
    p_XxY = log_P_XxY - log_z_X[:, None]
    w_X = jnp.exp(jnp.asarray(testbed.prompt_logw_X))
    num_y = p_XxY.shape[1]
    baseline_X = jnp.linspace(-0.3, 0.4, p_XxY.shape[0])  # Any fixed baseline per prompt.
    logpi_XxY, model_vjp = jax.vjp(logp_fn, params)
    model_vjp = jax.jit(model_vjp)  # One compiled backward pass for every divergence below.
    for divergence, alpha in DIVERGENCES:

      def exact_divergence(logpi):
        return exact.f_divergence(logpi, p_XxY, testbed.prompt_logw_X, divergence, alpha=alpha)

      def expected_surrogate(logpi):
        loss_X, _, _ = fdpg.fdpg(
          logpi,
          jnp.full_like(logpi, -np.log(num_y)),
          log_P_XxY,
          log_z_X,
          baseline_X,
          divergence=divergence,
          alpha=alpha,
        )
        return jnp.sum(w_X * loss_X)

      (want,) = model_vjp(jax.grad(exact_divergence)(logpi_XxY))
      (got,) = model_vjp(jax.grad(expected_surrogate)(logpi_XxY))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6, err_msg=f"{divergence} {alpha}")
      assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want)) > 1e-3  # Not trivial.


def test_expected_surrogate_gradient_vanishes_at_the_target(testbed):
  with jax.enable_x64(True):
    graphdef, params, logp_fn = _policy(testbed, 2)
    logpi_XxY, model_vjp = jax.vjp(logp_fn, params)
    model_vjp = jax.jit(model_vjp)  # One compiled backward pass for every divergence below.
    p_XxY = logpi_XxY  # The target is the policy itself.
    num_y = p_XxY.shape[1]
    for divergence, alpha in DIVERGENCES:

      def expected_surrogate(logpi):
        loss_X, _, _ = fdpg.fdpg(
          logpi,
          jnp.full_like(logpi, -np.log(num_y)),
          p_XxY,
          0.0,
          0.3,
          divergence=divergence,
          alpha=alpha,
        )
        return jnp.sum(jnp.exp(jnp.asarray(testbed.prompt_logw_X)) * loss_X)

      (grad,) = model_vjp(jax.grad(expected_surrogate)(logpi_XxY))
      for g in jax.tree.leaves(grad):
        np.testing.assert_allclose(g, 0.0, atol=1e-9, err_msg=f"{divergence} {alpha}")


def test_rlhf_identity_on_the_lm(testbed):
  """KL(π‖p) = log Z − (E_π[r] − β·KL(π‖a))/β for p ∝ a·exp(r/β), prompt-weighted (§1.7)."""
  with jax.enable_x64(True):
    _, params, logp_fn = _policy(testbed, 3)
    pi_XxY = logp_fn(params)
    a_XxY = logp_fn(models.init_params(CFG, jax.random.key(4)))
    r_XxY, beta, w_X = jnp.asarray(testbed.reward_XxY, jnp.float64), 0.7, testbed.prompt_logw_X
    log_P_XxY = targets.rlhf(a_XxY, r_XxY, beta)
    log_z_X = jax.nn.logsumexp(log_P_XxY, axis=1)
    lhs = exact.kl(pi_XxY, log_P_XxY - log_z_X[:, None], w_X)
    mean_log_z = jnp.sum(jnp.exp(jnp.asarray(w_X)) * log_z_X)
    rhs = (
      mean_log_z
      - (exact.expectation(pi_XxY, r_XxY, w_X) - beta * exact.kl(pi_XxY, a_XxY, w_X)) / beta
    )
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)
    assert float(lhs) > 0.01


def test_moment_matching_reaches_the_constraint_and_the_dual_optimum(testbed):
  """GDC's λ from exact expectations: |E_p[φ] − μ̄| < 1e-3 and λ = argmax of the exact dual."""
  with jax.enable_x64(True):
    _, params, logp_fn = _policy(testbed, 5)
    a_XxY = logp_fn(params)
    phi_Y = np.isin(testbed.responses_YxT[:, 0], (4, 5)).astype(np.float64)
    phi_XxYx1 = jnp.asarray(np.broadcast_to(phi_Y[None, :, None], (*a_XxY.shape, 1)))
    w_X = jnp.asarray(testbed.prompt_logw_X)
    mu_bar = 0.5
    lam, achieved, converged = targets.fit_lambda(
      phi_XxYx1, a_XxY, jnp.array([mu_bar]), lr=1.0, tol=1e-8, max_iter=10_000, prompt_logw_X=w_X
    )
    assert bool(converged)
    p_XxY = exact.normalize(targets.exponential(a_XxY, phi_XxYx1, lam))
    moment = exact.expectation(p_XxY, jnp.asarray(np.broadcast_to(phi_Y, a_XxY.shape)), w_X)
    assert abs(float(moment) - mu_bar) < 1e-3
    assert (
      abs(
        float(exact.expectation(a_XxY, jnp.asarray(np.broadcast_to(phi_Y, a_XxY.shape)), w_X))
        - mu_bar
      )
      > 0.05
    )  # The base misses the moment.

    def neg_dual(l):  # −g(λ) = −(λ μ̄ − Σ_x w_x log Z_x(λ))
      log_z_X = jax.nn.logsumexp(a_XxY + l[0] * phi_Y[None], axis=1)
      return -(l[0] * mu_bar - float(jnp.sum(jnp.exp(w_X) * log_z_X)))

    best = scipy.optimize.minimize_scalar(
      lambda l: neg_dual([l]), bounds=(-10, 10), method="bounded", options={"xatol": 1e-10}
    )
    assert abs(float(lam[0]) - best.x) < 1e-3
