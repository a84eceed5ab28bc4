"""LoRA: the effective-weight formula and its gradients, training only adapters through the one
train_step (DPO on the testbed), the adapters-off reference, resume, merged export, on-policy
rollouts from the adapted policy."""

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from align_jax import checkpoint, export, logps, models, rollout, sampling, step, train
from align_jax.models import hf, lora
from align_jax.testbed import base as tb_base
from conftest import load_config, read_jsonl

TINY = dataclasses.replace(models.ModelConfig(**models.preset("tiny")), n_layers=1)
LORA = mlc.ConfigDict(dict(rank=3, alpha=6.0, targets=("attn", "mlp")))
ADAPTED = {
  "wq_DxHxE": 1,
  "wk_DxGxE": 1,
  "wv_DxGxE": 1,
  "wo_HxExD": 2,
  "wgate_DxF": 1,
  "wup_DxF": 1,
  "wdown_FxD": 1,
}  # Weight -> its input dims (as in the model's einsum).


def _normal(rng, shapes, std=0.3):
  """Random arrays of these shapes (no compilation): a random model, or adapters with A and B
  both random (B = 0 at init would hide the formula's B side)."""
  return jax.tree.map(lambda s: jnp.asarray(std * rng.standard_normal(s.shape), s.dtype), shapes)


MERGE = jax.jit(functools.partial(lora.merge, cfg=LORA))


@pytest.fixture(scope="module")
def tiny():
  """(graphdef, names, random base, shapes of its adapters, random adapters)."""
  graphdef, shapes, names = models.abstract(TINY)
  adapter_shapes = lora.abstract(shapes, names, LORA)
  rng = np.random.default_rng(0)
  return graphdef, names, _normal(rng, shapes), adapter_shapes, _normal(rng, adapter_shapes)


def test_effective_weight_is_w_plus_scaled_a_b(tiny):
  _, names, base, _, adapters = tiny
  merged = MERGE(base, adapters)
  scale = LORA.alpha / LORA.rank
  for layer in range(TINY.n_layers):
    for module in ("attn", "mlp"):
      for name, w in base["layers"][layer][module].items():
        ad = adapters["layers"][layer][module][name]
        n_in = ADAPTED[name]
        a, b = np.asarray(ad["lora_a"]), np.asarray(ad["lora_b"])
        assert a.shape == (*w.shape[:n_in], 3) and b.shape == (3, *w.shape[n_in:])
        # An explicit matmul of the flattened input and output dims.
        dw = (a.reshape(-1, 3) @ b.reshape(3, -1)).reshape(w.shape)
        np.testing.assert_allclose(
          merged["layers"][layer][module][name], w + scale * dw, rtol=1e-6, atol=1e-6, err_msg=name
        )
    for norm in ("attn_norm", "mlp_norm"):  # Not targeted: the base's values.
      np.testing.assert_array_equal(
        merged["layers"][layer][norm]["scale_D"], base["layers"][layer][norm]["scale_D"]
      )
  for name in ("embed_VxD", "unembed_DxV"):
    np.testing.assert_array_equal(merged[name], base[name])
  # Only the attention projections when targets = (attn,).
  attn_only = mlc.ConfigDict(dict(rank=3, alpha=6.0, targets=("attn",)))
  assert set(lora.names(names, attn_only)["layers"][0]) == {"attn"}
  # B = 0 leaves every weight bit-identical: adapters at init == adapters off.
  zero_b = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(p) else x, adapters
  )
  jax.tree.map(np.testing.assert_array_equal, MERGE(base, zero_b), base)


def test_adapter_gradients_are_the_chain_rule_of_the_weight_gradient(tiny):
  """d/dA = s·G·Bᵀ and d/dB = s·Aᵀ·G, G = ∂loss/∂W' of the merged model (3-D weights included):
  autodiff through `merge` (the chain rule applied to G) against the explicit matmuls."""
  graphdef, _, base, _, adapters = tiny
  tokens = jax.random.randint(jax.random.key(4), (3, 2, 6), 0, TINY.vocab_size)
  mask = jnp.ones(tokens.shape, jnp.float32)

  def loss(params):
    logp = logps.sequence_logps(graphdef, params, tokens, mask)
    return -jnp.mean(jax.nn.log_sigmoid(0.5 * (logp[:, 0] - logp[:, 1])))

  grad_w = jax.jit(jax.grad(loss))(MERGE(base, adapters))
  grad_adapters = jax.jit(lambda a, b, g: jax.vjp(lambda x: lora.merge(b, x, LORA), a)[1](g)[0])(
    adapters, base, grad_w
  )
  scale = LORA.alpha / LORA.rank
  for module in ("attn", "mlp"):
    for name, n_in in ((k, v) for k, v in ADAPTED.items() if k in base["layers"][0][module]):
      g = np.asarray(grad_w["layers"][0][module][name])
      ad = adapters["layers"][0][module][name]
      a, b = np.asarray(ad["lora_a"]), np.asarray(ad["lora_b"])
      g2 = g.reshape(int(np.prod(g.shape[:n_in])), -1)
      want_a = scale * (g2 @ b.reshape(3, -1).T).reshape(a.shape)
      want_b = scale * (a.reshape(-1, 3).T @ g2).reshape(b.shape)
      got = grad_adapters["layers"][0][module][name]
      assert np.abs(want_b).max() > 1e-3, name  # The comparison is not of zeros.
      np.testing.assert_allclose(got["lora_a"], want_a, rtol=1e-4, atol=1e-6, err_msg=name)
      np.testing.assert_allclose(got["lora_b"], want_b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_rollout_samples_the_adapted_policy_and_anchor(tiny):
  graphdef, _, base, adapter_shapes, adapters = tiny
  anchor = _normal(np.random.default_rng(7), adapter_shapes)
  state = dataclasses.replace(
    step.init_state(adapters, optax.sgd(0.1), seed=3), anchor={"params": anchor}
  )  # A moving anchor: adapters too.
  fn = jax.jit(
    lambda st, p, x, r: rollout.rollout(
      st,
      p,
      x,
      r,
      graphdef=graphdef,
      sampling_cfg=sampling.SamplingConfig(max_new_tokens=3),
      num_policy=2,
      num_anchor=2,
      anchor_is_ref=False,
      merge=functools.partial(lora.merge, cfg=LORA),
      score_fn=lambda *args: {},
    )
  )
  prompts = jnp.array([[0, 1], [2, 3], [4, 5]])
  batch = fn(state, prompts, jnp.arange(3), base)
  tokens, mask = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"]
  score = jax.jit(functools.partial(logps.sequence_logps, graphdef))
  policy = score(MERGE(base, adapters), tokens, mask)
  anchor_logp = score(MERGE(base, anchor), tokens, mask)
  ref = score(base, tokens, mask)
  # Each sample's sampler log-prob is its teacher-forced log-prob under the adapted model it came
  # from; the reference is the base with adapters off.
  np.testing.assert_allclose(batch["sample_logp_BxK"][:, :2], policy[:, :2], atol=1e-5)
  np.testing.assert_allclose(batch["sample_logp_BxK"][:, 2:], anchor_logp[:, 2:], atol=1e-5)
  np.testing.assert_allclose(batch["anchor_logp_BxK"], anchor_logp, atol=1e-5)
  np.testing.assert_allclose(batch["ref_logp_BxK"], ref, atol=1e-6)
  assert np.abs(np.asarray(policy - ref)).max() > 0.1  # The adapters change the policy.


# ---- LoRA DPO through train.run on the testbed (configs/dpo.py:smoke, lora.rank=4) -------------


def _dpo_config(total_steps):
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.lora.rank = 4
    cfg.total_steps, cfg.checkpoint_every, cfg.log_every, cfg.eval_every = total_steps, 2, 1, 0
  return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A straight 4-step LoRA DPO run, and a run resumed from its step-2 checkpoint."""
  root = tmp_path_factory.mktemp("lora")
  straight = train.run(_dpo_config(4), str(root / "straight"))
  shutil.copytree(root / "straight" / "checkpoints" / "2", root / "resumed" / "checkpoints" / "2")
  shutil.copy(root / "straight" / "initial_eval.json", root / "resumed")
  resumed = train.run(_dpo_config(4), str(root / "resumed"))
  return root, straight, resumed


def _load(path, shapes):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoint.load_params(
    path, checkpoint.abstract_like(shapes, jax.tree.map(lambda _: one, shapes))
  )


@pytest.fixture(scope="module")
def trained(runs):
  """(cfg, graphdef, names, base LM the runs started from, trained adapters, merged params)."""
  cfg = _dpo_config(4)
  graphdef, shapes, names = models.abstract(models.ModelConfig(**cfg.model))
  base = _load(os.path.join(tb_base.base_dir(cfg.testbed, cfg.model), "params"), shapes)
  adapters = jax.device_get(runs[1].state.params)
  merged = jax.jit(functools.partial(lora.merge, cfg=cfg.lora))(base, adapters)
  return cfg, graphdef, names, base, adapters, merged


def _flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def test_step0_dpo_loss_with_adapters_off_reference_is_log2(runs):
  root, _, _ = runs
  first = read_jsonl(root / "straight" / "metrics.jsonl")[0]
  assert first["step"] == 1
  assert first["loss"] == float(np.float32(np.log(2.0)))  # B = 0: policy == reference.
  assert abs(first["objective/margin"]) < 1e-6
  assert first["grad_norm"] > 0  # ... yet the adapters get a gradient (through B).


def test_training_changes_only_adapters_and_checkpoints_only_them(runs, trained):
  root = runs[0]
  cfg, _, names, base, adapters, merged = trained
  init = jax.jit(functools.partial(lora.init, base, names, cfg.lora))(
    jax.random.fold_in(jax.random.key(cfg.seed), 1)
  )  # As train.run draws them.
  for path, x in jax.tree_util.tree_flatten_with_path(init)[0]:
    if "lora_b" in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(x, 0.0)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]]
  assert len(paths) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers.
  assert all(p.endswith(("['lora_a']", "['lora_b']")) for p in paths)
  for new, old in zip(jax.tree.leaves(adapters), jax.tree.leaves(init)):
    assert np.abs(new - old).max() > 0  # Every A and B moved (A from step 2, once B != 0).
  merged = _flat(merged)
  for key, w in _flat(base).items():
    if "['attn']" in key or "['mlp']" in key:
      assert np.abs(merged[key] - w).max() > 0, key
    else:  # Embeddings, norms, unembedding: the base, bit for bit.
      np.testing.assert_array_equal(merged[key], w, err_msg=key)
  # The checkpoint: adapters, their optimizer moments, counters. No base weight.
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore(os.path.abspath(root / "straight" / "checkpoints" / "4" / "state"))
  n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
  n_base = sum(x.size for x in jax.tree.leaves(base))
  arrays = jax.tree_util.tree_flatten_with_path(saved)[0]
  big = [jax.tree_util.keystr(p) for p, x in arrays if np.size(x) > 2]
  assert all(p.endswith(("['lora_a']", "['lora_b']")) for p in big), big
  assert sum(np.size(x) for _, x in arrays) < 3 * n_adapter + 16 < n_base


def test_resume_is_exact(runs):
  root, straight, resumed = runs
  assert int(resumed.state.step) == 4
  steps = [r["step"] for r in read_jsonl(root / "resumed" / "metrics.jsonl") if "loss" in r]
  assert steps == [3, 4]  # Resumed after step 2.
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(straight.state), jax.device_get(resumed.state)
  )


def test_merged_export_equals_the_adapted_model(runs, trained, tmp_path):
  """`python -m align_jax.export` of the LoRA run writes the merged model: read back, its logits
  are the adapted policy's (the train step's merge-then-apply)."""
  cfg, graphdef, _, base, adapters, _ = trained
  assert export.export(str(runs[0] / "straight"), str(tmp_path / "hf")) == 4
  shapes = models.abstract(models.ModelConfig(**cfg.model))[1]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  exported = hf.load_params(
    str(tmp_path / "hf"), models.ModelConfig(**cfg.model), jax.tree.map(lambda _: one, shapes)
  )
  tokens = jax.random.randint(jax.random.key(5), (16, 5), 0, cfg.model.vocab_size)
  logits = jax.jit(lambda p, t: models.apply(graphdef, p, t)[0])
  adapted = jax.jit(lambda a, b, t: models.apply(graphdef, lora.merge(b, a, cfg.lora), t)[0])
  want = adapted(adapters, base, tokens)
  np.testing.assert_allclose(logits(exported, tokens), want, atol=1e-5, rtol=0)
  assert np.abs(np.asarray(want - logits(base, tokens))).max() > 1e-3  # Training moved it.
