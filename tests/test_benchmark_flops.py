"""The benchmarks' FLOP and byte formulas (experiments/benchmarks/roofline.py) against exact
counts: every matmul of the traced align_jax update, XLA's cost analysis of the forward, the
parameter tree, and the KV cache the sampler allocates. Traced abstractly; one small compile."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import logps, models, step
from conftest import ROOT

sys.path.insert(0, ROOT)
from experiments.benchmarks import harness, roofline  # noqa: E402

SMALL = dict(
  vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=80
)


def _abstract_update(objective: str, model_cfg, k: int, length: int):
  """(update, abstract state, batch, reference) of configs/<objective>.py: traced, never run."""
  _, tx, update = harness.update(harness.run_config(objective), model_cfg)
  params = jax.eval_shape(functools.partial(models.init_params, model_cfg), jax.random.key(0))
  state = jax.eval_shape(lambda p: step.init_state(p, tx, 0), params)
  shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
  batch = {
    "tokens_BxKxL": jax.ShapeDtypeStruct((2, k, length), jnp.int32),
    "loss_mask_BxKxL": shape(2, k, length),
    "example_mask_B": shape(2),
    "score_BxK": shape(2, k),
    "response_mask_BxK": shape(2, k),
  }
  return update, state, batch, params


@pytest.mark.parametrize("objective,k,tied", [("dpo", 2, False), ("lipo", 4, True)])
def test_formula_equals_every_matmul_of_the_update(objective, k, tied):
  """(3 + 1 frozen) forwards: the policy's forward and backward and the reference's forward,
  attention included, equal the sum over all dot_generals of the update exactly."""
  model_cfg = models.ModelConfig(**SMALL, tie_embeddings=tied)
  update, *args = _abstract_update(objective, model_cfg, k, 12)
  counted = roofline.jaxpr_matmul_flops(jax.make_jaxpr(update)(*args))
  assert counted == roofline.train_step_flops(model_cfg, rows=2 * k, length=12)
  # Dropping the reference forward (or the attention term) breaks the equality.
  assert counted != roofline.train_step_flops(model_cfg, rows=2 * k, length=12, frozen_forwards=0)


def test_forward_formula_within_xla_cost_analysis():
  """XLA's compiled cost of the log-prob forward counts the elementwise work too (norms,
  softmax, RoPE): its FLOPs lie above the model FLOPs, by less than a fifth for this size."""
  model_cfg = models.ModelConfig(**SMALL)
  graphdef, shapes, _ = models.abstract(model_cfg)
  tokens = jax.ShapeDtypeStruct((2, 2, 32), jnp.int32)
  mask = jax.ShapeDtypeStruct((2, 2, 32), jnp.float32)
  forward = functools.partial(logps.sequence_logps, graphdef)
  cost = jax.jit(forward).lower(shapes, tokens, mask).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  formula = roofline.forward_flops(model_cfg, rows=4, length=32)
  assert formula < cost["flops"] < 1.2 * formula


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_params_from_the_parameter_tree(tied):
  """N = every matrix of the model except the embedding lookup (counted once, as the output
  projection, when tied); norms are not matmuls."""
  model_cfg = models.ModelConfig(**SMALL, tie_embeddings=tied)
  _, shapes, _ = models.abstract(model_cfg)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  matrices = sum(
    np.prod(v.shape)
    for path, v in flat
    if len(v.shape) >= 2 and (tied or "embed_VxD" not in jax.tree_util.keystr(path))
  )
  assert roofline.matmul_params(model_cfg) == matrices


def test_decode_bytes_are_params_and_the_whole_cache():
  model_cfg = models.ModelConfig(**SMALL)
  params = jax.eval_shape(functools.partial(models.init_params, model_cfg), jax.random.key(0))
  cache = jax.eval_shape(lambda: models.init_cache(model_cfg, rows=3, slots=10))
  expected = roofline.tree_bytes(params) + roofline.tree_bytes(cache)
  assert roofline.decode_step_bytes(roofline.tree_bytes(params), model_cfg, 3, 10) == expected
