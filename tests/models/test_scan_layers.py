"""Scanned layers (model.scan_layers) are the unrolled model in another layout: logits, gradients,
cached decoding and the sampler's draws agree for every option that differs per layer or family;
the scan compiles one layer body with remat inside it; LoRA adapts stacked weights; an Orbax
params directory of either layout starts a run of the other; a scanned DPO run trains as the
unrolled one does and resumes from its own checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import checkpoint, logps, models, sampling, sharding, train
from align_jax.models import loading, lora
from conftest import FAMILIES, load_config, read_jsonl

TINY = dict(models.preset("tiny"))


def _pair(options: dict, **run):
  """(unrolled cfg, scanned cfg, unrolled params, the same params stacked), float32."""
  cfg = models.ModelConfig(**{**TINY, **options, **run})
  scanned = dataclasses.replace(cfg, scan_layers=True)
  params = models.init_params(cfg, jax.random.key(0))
  return cfg, scanned, params, models.stack_layers(params)


def _close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=tol * max(1.0, float(np.max(np.abs(y)))), rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_equals_unrolled_logits_gradients_cache_and_sampler(family):
  cfg, scanned, params, stacked = _pair(FAMILIES[family], remat=True)
  graphdef, scan_graphdef = models.abstract(cfg)[0], models.abstract(scanned)[0]
  assert jax.tree.structure(stacked) == jax.tree.structure(models.abstract(scanned)[1])
  tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, cfg.vocab_size)

  logits = jax.jit(models.apply, static_argnums=0)
  _close(logits(scan_graphdef, stacked, tokens)[0], logits(graphdef, params, tokens)[0], 1e-5)

  def grads(g, p):  # Weighted token log-probs: every position and layer reaches the loss.
    return jax.jit(jax.grad(lambda p: jnp.sum(logps.token_logps(g, p, tokens) * jnp.arange(8.0))))(
      p
    )

  _close(grads(scan_graphdef, stacked), models.stack_layers(grads(graphdef, params)), 1e-5)

  # Cached decoding through the stacked cache [N, R, S, G, E] equals the full forward.
  cache = models.init_cache(scanned, 3, 9)
  assert cache["k"].shape == (cfg.n_layers, 3, 9, cfg.n_kv_heads, cfg.head_dim)
  outs, cache = [], models.apply(scan_graphdef, stacked, tokens[:, :4], cache=cache)[1]
  for i in range(4, 9):
    out, cache = models.apply(
      scan_graphdef,
      stacked,
      tokens[:, i : i + 1],
      positions_RxL=jnp.full((3, 1), i),
      cache=cache,
      cache_index=i,
    )
    outs.append(out)
  _close(jnp.concatenate(outs, 1), logits(graphdef, params, tokens)[0][:, 4:], 1e-5)

  sample = lambda g, p: sampling.sample(
    g, p, tokens[:, :3], jax.random.key(2), sampling.SamplingConfig(max_new_tokens=5)
  )
  a, b = sample(scan_graphdef, stacked), sample(graphdef, params)
  np.testing.assert_array_equal(a["tokens_RxL"], b["tokens_RxL"])
  _close(a["logp_RxN"], b["logp_RxN"], 1e-5)


def test_one_layer_body_remat_inside_the_scan_and_stacked_names():
  """The jaxpr's matmuls do not grow with the depth when scanned (one body, a scan of length N
  holding a checkpoint); parameters carry the `layers` axis first; each layer has its own init."""

  def jaxprs(n_layers, scan):  # (the forward's, its gradient's)
    cfg = models.ModelConfig(**{**TINY, "n_layers": n_layers, "scan_layers": scan, "remat": True})
    graphdef, shapes, _ = models.abstract(cfg)
    loss = lambda p: jnp.sum(logps.token_logps(graphdef, p, jnp.zeros((2, 5), jnp.int32)))
    return jax.make_jaxpr(loss)(shapes), jax.make_jaxpr(jax.grad(loss))(shapes)

  matmuls = lambda n, scan: str(jaxprs(n, scan)[1]).count("dot_general")
  assert matmuls(2, True) == matmuls(4, True) and matmuls(4, False) > matmuls(2, False)
  forward = jaxprs(3, True)[0].jaxpr
  (scan,) = [e for e in forward.eqns if e.primitive.name == "scan"]
  assert scan.params["length"] == 3
  assert [e.primitive.name for e in scan.params["jaxpr"].jaxpr.eqns] == ["remat2"]  # checkpoint

  cfg = models.ModelConfig(**{**TINY, "n_layers": 3, "scan_layers": True})
  _, shapes, names = models.abstract(cfg)
  assert shapes["layers"]["attn"]["wq_DxHxE"].shape == (3, 32, 4, 8)
  assert names["layers"]["attn"]["wq_DxHxE"] == ("layers", "embed", "heads", "head_dim")
  assert names["layers"]["mlp_norm"]["scale_D"] == ("layers", "norm")
  w = models.init_params(cfg, jax.random.key(0))["layers"]["mlp"]["wup_DxF"]
  assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])
  params = models.init_params(cfg, jax.random.key(0))
  back = models.stack_layers(models.unstack_layers(params))
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_lora_on_stacked_weights_is_lora_per_layer():
  cfg, scanned, params, stacked = _pair({}, n_layers=3)
  lora_cfg = type("Lora", (), dict(rank=2, alpha=4.0, targets=("attn", "mlp")))()
  _, _, names = models.abstract(cfg)
  _, _, scan_names = models.abstract(scanned)
  adapters = lora.init(params, names, lora_cfg, jax.random.key(3))
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B ≠ 0: the update bites.
  stacked_adapters = models.stack_layers(adapters)
  assert jax.tree.structure(stacked_adapters) == jax.tree.structure(
    lora.abstract(stacked, scan_names, lora_cfg)
  )
  assert lora.names(scan_names, lora_cfg)["layers"]["attn"]["wo_HxExD"] == {
    "lora_a": ("layers", "heads", "head_dim", None),
    "lora_b": ("layers", None, "embed"),
  }
  merged = lora.merge(stacked, stacked_adapters, lora_cfg)
  _close(merged, models.stack_layers(lora.merge(params, adapters, lora_cfg)), 1e-6)
  assert not np.allclose(merged["layers"]["mlp"]["wup_DxF"], stacked["layers"]["mlp"]["wup_DxF"])


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_orbax_params_of_either_layout_load_into_the_other(tmp_path, devices8, saved_scanned):
  cfg, scanned, params, stacked = _pair(FAMILIES["gemma2"])
  checkpoint.save_params(str(tmp_path / "params"), stacked if saved_scanned else params)
  mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  table = sharding.check_rules(load_config("dpo", "smoke").rules, mesh)
  want = cfg if saved_scanned else scanned
  shardings = sharding.tree_shardings(models.abstract(want)[2], mesh, table)
  loaded = loading.read_lm(str(tmp_path / "params"), want, shardings)
  jax.tree.map(np.testing.assert_array_equal, loaded, params if saved_scanned else stacked)
  for x, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings)):
    assert x.sharding == s


def test_scanned_dpo_run_trains_like_the_unrolled_and_resumes(tmp_path):
  """From the same cached (unrolled) testbed base LM: the same losses to 1e-5; a scanned run
  resumed from its step-2 checkpoint ends where the straight scanned run ends."""

  def run(workdir, scan, steps):
    cfg = load_config("dpo", "smoke")
    with cfg.unlocked():
      cfg.model.scan_layers, cfg.model.remat = scan, True
      cfg.total_steps, cfg.checkpoint_every, cfg.log_every = steps, 2, 1
      cfg.mesh.shape = (2, 2, 2)
      cfg.testbed.exact_eval = False
    result = train.run(cfg, str(workdir))
    losses = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    return result, losses

  _, unrolled = run(tmp_path / "unrolled", False, 4)
  straight, scanned = run(tmp_path / "scanned", True, 4)
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5)
  assert len(set(unrolled)) == 4  # Training moved.
  run(tmp_path / "resumed", True, 2)
  resumed, _ = run(tmp_path / "resumed", True, 4)
  assert straight.state.params["layers"]["attn"]["wq_DxHxE"].shape[0] == 2
  jax.tree.map(np.testing.assert_array_equal, resumed.state.params, straight.state.params)
