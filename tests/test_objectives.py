"""Objectives against ALGORITHMS.md §7 test vectors, closed-form gradients and adversarial inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import objectives
from align_jax.objectives import likelihood, pairwise

# ALGORITHMS.md §7.7: log π(y_w) = −10, log π(y_l) = −12, log π_ref = −10.5, −11.5  =>  h = 1.
LOGP = jnp.array([[-10.0, -12.0]])
REF = jnp.array([[-10.5, -11.5]])


def test_dpo_test_vector():
  loss, metrics = pairwise.dpo(LOGP, REF, beta=0.1)
  np.testing.assert_allclose(loss, [0.644397], atol=1e-6)
  np.testing.assert_allclose(metrics["margin"], [0.1], atol=1e-7)
  np.testing.assert_allclose(metrics["accuracy"], [1.0])


def test_dpo_gradient_closed_form_and_reference_frozen():
  beta = 0.3
  h = 1.0
  g_logp, g_ref = jax.grad(lambda lp, rf: pairwise.dpo(lp, rf, beta=beta)[0].sum(), argnums=(0, 1))(
    LOGP, REF
  )
  weight = beta * jax.nn.sigmoid(-beta * h)  # d softplus(-βh)/dh = -β σ(-βh)
  np.testing.assert_allclose(g_logp, [[-weight, weight]], rtol=1e-6)
  np.testing.assert_array_equal(g_ref, 0.0)  # stop-gradient on the reference


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_dpo_finite_on_extreme_log_ratios(scale):
  logp = jnp.array([[scale, -scale], [0.0, 0.0]])
  loss, grad = jax.value_and_grad(
    lambda lp: pairwise.dpo(lp, jnp.zeros((2, 2)), beta=0.1)[0].sum()
  )(logp)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  if scale < 0:  # softplus(-β·2e4·(-1)) = 2000 exactly in the linear regime
    np.testing.assert_allclose(pairwise.dpo(logp, jnp.zeros((2, 2)), beta=0.1)[0][0], 2000.0)


def test_sft_is_token_mean_nll():
  logp = jnp.array([[-6.0], [-2.0]])
  n = jnp.array([[3.0], [0.0]])  # a row with no scored token is clamped to 1 token
  loss, m = likelihood.sft(logp, n)
  np.testing.assert_allclose(loss, [2.0, 2.0])
  np.testing.assert_allclose(m["perplexity"], np.exp([2.0, 2.0]), rtol=1e-6)


def test_registry_binds_batch_fields():
  batch = {"ref_logp_BxK": REF, "loss_mask_BxKxL": jnp.ones((1, 2, 4))}
  loss, metrics, stats = objectives.get("dpo").fn(LOGP, batch, {"z": 1}, beta=0.1)
  np.testing.assert_allclose(loss, [0.644397], atol=1e-6)
  assert stats == {"z": 1}
  with pytest.raises(ValueError, match="unknown"):
    objectives.get("no_such_objective")


def test_registry_entries_declare_a_known_granularity():
  from align_jax.errors import ConfigError

  assert all(o.granularity in objectives.GRANULARITIES for o in objectives.OBJECTIVES.values())
  fn = objectives.get("dpo").fn
  assert (
    objectives.Objective(fn, needs_ref=True, data="pairs", granularity="token").granularity
    == "token"
  )
  with pytest.raises(ValueError, match="granularity 'word'"):
    objectives.Objective(fn, needs_ref=True, data="pairs", granularity="word")
  with pytest.raises(ConfigError, match="'nope' is unknown"):
    objectives.get("nope")
