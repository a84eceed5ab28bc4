"""The step's per-update metrics: the parameter and update norms only on the steps the metric
writer logs (`log_steps`), equal to their definitions there."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from align_jax import models, step
from conftest import dpo_update

TINY = dict(models.preset("tiny"))


def test_norms_are_computed_on_logged_steps_only():
  cfg = models.ModelConfig(**TINY)
  graphdef = models.abstract(cfg)[0]
  init = jax.jit(models.init_params, static_argnums=0)
  params, ref = init(cfg, jax.random.key(0)), init(cfg, jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (2, 2, 6), 1, cfg.vocab_size)
  batch = {
    "tokens_BxKxL": tokens,
    "loss_mask_BxKxL": jnp.ones(tokens.shape).at[..., :2].set(0.0),
    "example_mask_B": jnp.ones(2),
  }
  (logged, tx), (every, _) = (
    dpo_update(graphdef, ref, total_steps=5, log_steps=log) for log in ((2, 5), None)
  )
  state = step.init_state(params, tx, 0)
  for s in range(1, 6):  # Steps 2, 4 (multiples of log_every) and 5 (the last) are logged.
    new, metrics = logged(state, batch)
    reference, want = every(state, batch)
    if s in (2, 4, 5):
      np.testing.assert_allclose(metrics["param_norm"], optax.tree.norm(state.params), rtol=1e-6)
      update = jax.tree.map(lambda a, b: a - b, new.params, state.params)
      np.testing.assert_allclose(metrics["update_norm"], optax.tree.norm(update), rtol=1e-4)
      for key in ("param_norm", "update_norm"):
        np.testing.assert_allclose(metrics[key], want[key], rtol=1e-6)
    else:
      assert np.isnan(metrics["param_norm"]) and np.isnan(metrics["update_norm"])
    np.testing.assert_allclose(metrics["grad_norm"], want["grad_norm"], rtol=1e-6)
    assert float(metrics["finite_state"]) == 1.0
    for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(reference.params), strict=True):
      np.testing.assert_array_equal(x, y)  # The update itself is the same.
    state = new
