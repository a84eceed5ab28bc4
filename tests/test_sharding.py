"""Meshes, the rules table, and parameters created already sharded."""

import functools
import types

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from align_jax import config_lib, models, sharding

RULES = config_lib.base().rules
AXES = ("data", "fsdp", "tensor")
USED = set(models.transformer.PARAM_AXES) | set(models.transformer.ACT_AXES)


def test_mesh_fills_minus_one_with_auto_axes(devices8):
  mesh = sharding.make_mesh((2, -1, 2), AXES)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape", [(3, -1, 1), (-1, -1, 1), (16, 1, 1), (0, 8, 1), (2, 4)])
def test_bad_mesh_shapes(shape, devices8):
  with pytest.raises(ValueError, match="mesh"):
    sharding.make_mesh(shape, AXES)


def test_rules_are_validated(devices8):
  mesh = sharding.make_mesh((1, -1, 1), AXES)
  table = sharding.check_rules(RULES, mesh, USED)
  assert table["act_batch"] == ("data", "fsdp") and table["head_dim"] is None
  with pytest.raises(ValueError, match="repeated: \\['embed'\\]"):
    sharding.check_rules(RULES + (("embed", "tensor"),), mesh, USED)
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.check_rules((("embed", "model"),), mesh)
  with pytest.raises(ValueError, match="no rule"):
    sharding.check_rules(RULES[:-1], mesh, USED)
  with pytest.raises(ValueError, match="twice"):
    sharding.spec(("embed", "embed"), table)


def _tiny_sharded():
  """(mesh (1, 4, 2), rules table, the tiny model's config, its params initialised sharded)."""
  mesh = sharding.make_mesh((1, 4, 2), AXES)
  table = sharding.check_rules(RULES, mesh, USED)
  cfg = models.ModelConfig(**models.preset("tiny"))
  names = models.abstract(cfg)[2]
  shardings = sharding.tree_shardings(names, mesh, table)
  init = jax.jit(functools.partial(models.init_params, cfg), out_shardings=shardings)
  return mesh, table, cfg, init(jax.random.key(0))


def test_parameters_are_created_sharded_by_their_logical_names(devices8):
  _, _, cfg, params = _tiny_sharded()
  w = params["layers"][0]["mlp"]["wgate_DxF"]
  assert w.sharding.spec == P("fsdp", "tensor")
  assert {s.data.shape for s in w.addressable_shards} == {(32 // 4, 64 // 2)}
  assert params["layers"][1]["attn"]["wo_HxExD"].sharding.spec == P("tensor", None, "fsdp")
  assert params["final_norm"]["scale_D"].sharding.spec == P(None)
  # Same values as an unsharded init: sharding changes placement, not numbers.
  plain = models.init_params(cfg, jax.random.key(0))
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, plain
  )


def test_train_state_copies_of_the_parameters_are_sharded_as_they_are(devices8):
  """Adam's moments and a moving anchor take each parameter's sharding (left to XLA, a jitted
  optax init puts them on one device); step, rng and statistics are replicated."""
  from align_jax import step, train

  mesh, _, _, params = _tiny_sharded()
  shardings = jax.tree.map(lambda x: x.sharding, params)
  tx = step.optimizer(types.SimpleNamespace(**config_lib.base().optim, total_steps=10))
  init = lambda p: step.init_state(p, tx, 0, {"z": jax.numpy.zeros(3)}, moving_anchor=True)
  state_shardings = train.state_shardings(jax.eval_shape(init, params), params, mesh)
  state = jax.jit(init, out_shardings=state_shardings)(params)
  adam = state.opt_state[1][0]
  for tree in (adam.mu, adam.nu, state.anchor["params"], state.params):
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
      assert x.sharding == s
  assert state.params["layers"][0]["mlp"]["wup_DxF"].sharding.spec == P("fsdp", "tensor")
  for x in (state.step, state.rng, state.stats["z"], adam.count):
    assert x.sharding == sharding.replicated(mesh)
