"""Hugging Face import/export: logit parity with transformers for every family, sampler log-probs,
sharded import, and DPO / BOND runs started from an HF checkpoint and exported back.

Each family (Llama, Gemma 1/2/3, Qwen2/3 with irregular layer_types, Mistral, Phi-3, GPT-2) is a
tiny random HF model built here with torch on the CPU (no download), its parameters redrawn at a
scale where every option matters: the sliding window (4) is shorter than the sequence (12), the
soft-caps are small, biases and norm weights are non-zero.
"""

import dataclasses
import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from align_jax import checkpoint, config_lib, models, sampling, sharding  # noqa: E402
from align_jax.models import hf, presets  # noqa: E402
from conftest import ROOT, main_command, subprocess_env  # noqa: E402

import torch  # noqa: E402  The parity extra: pip install -e ".[test,parity]".
import transformers  # noqa: E402

torch.set_num_threads(1)

L, P = 12, 4  # Tokens per row; prompt tokens of the sampler test.
SHAPE_FIELDS = dict(
  vocab_size=96, d_model=64, mlp_dim=96, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16
)
SHAPE = dict(
  vocab_size=96,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
)
# family -> (HF config class, its arguments, ModelConfig options that must bite: turning one off
# breaks parity).
FAMILIES = {
  "llama": (
    "LlamaConfig",
    dict(
      SHAPE,
      rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
      ),
    ),
    dict(rope_scaling=""),
  ),
  "gemma": (
    "GemmaConfig",
    dict(SHAPE, hidden_act="gelu_pytorch_tanh"),
    dict(embed_scale=False, norm_plus_one=False),
  ),
  "gemma2": (
    "Gemma2Config",
    dict(
      SHAPE,
      sliding_window=4,
      attn_logit_softcapping=2.0,
      final_logit_softcapping=3.0,
      query_pre_attn_scalar=24,
    ),
    dict(
      sliding_window=0,
      attn_softcap=0.0,
      final_softcap=0.0,
      post_norms=False,
      query_pre_attn_scalar=0.0,
    ),
  ),
  "gemma3": (
    "Gemma3TextConfig",
    dict(
      SHAPE,
      sliding_window=4,
      sliding_window_pattern=3,
      final_logit_softcapping=3.0,
      query_pre_attn_scalar=24,
      rope_scaling=dict(rope_type="linear", factor=2.0),
    ),
    dict(sliding_window=0, qk_norm=False, rope_local_theta=0.0, rope_scaling=""),
  ),
  # Qwen's layer_types in any pattern (here not "every P-th layer global").
  "qwen2": (
    "Qwen2Config",
    dict(
      SHAPE,
      tie_word_embeddings=True,
      use_sliding_window=True,
      sliding_window=4,
      layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    ),
    dict(qkv_bias=False, window_layers=()),
  ),
  "qwen3": (
    "Qwen3Config",
    dict(
      SHAPE,
      use_sliding_window=True,
      sliding_window=4,
      layer_types=["full_attention", "full_attention", "sliding_attention"],
    ),
    dict(qk_norm=False, window_layers=()),
  ),
  "mistral": ("MistralConfig", dict(SHAPE, sliding_window=4), dict(sliding_window=0)),
  # Fused q|k|v and gate|up projections.
  "phi3": (
    "Phi3Config",
    dict(SHAPE, sliding_window=4, bos_token_id=0, eos_token_id=1, pad_token_id=1),
    dict(sliding_window=0),
  ),
  "gpt2": (
    "GPT2Config",
    dict(
      vocab_size=96, n_embd=64, n_layer=3, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=1
    ),
    dict(positions="rope", norm="rms"),
  ),
}


def _hf_model(config_class: str, kwargs: dict, seed: int = 0):
  """A random HF model whose every parameter (biases and norms too) is N(0, 0.2²) (embeddings
  N(0, 1)), in float32 and eval mode."""
  config = getattr(transformers, config_class)(**kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(
        torch.randn_like(p) * (1.0 if ("embed" in name or name.endswith("wte.weight")) else 0.2)
      )
  return model


def _hf_logits(model, tokens_RxL) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens_RxL), dtype=torch.long)).logits.numpy()


def _single_device(shapes):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, shapes)


def _import(path):
  cfg = models.ModelConfig(**hf.config_fields(hf.read_config(path)))
  graphdef, shapes, _ = models.abstract(cfg)
  return cfg, graphdef, hf.load_params(path, cfg, _single_device(shapes))


def _restrict(params, shapes):
  """`params` without the leaves a model of `shapes` does not have (an option turned off)."""
  if not isinstance(shapes, dict):
    return params
  return {k: _restrict(params[k], v) for k, v in shapes.items()}


def _forward(graphdef, params, tokens_RxL) -> np.ndarray:
  """Logits, float64. Eagerly: per-op compilations are shared by every model of this file, where
  jitting each architecture would compile it whole."""
  return np.asarray(models.apply(graphdef, params, jnp.asarray(tokens_RxL))[0], np.float64)


@pytest.fixture(scope="module")
def tokens_RxL():
  return np.asarray(jax.random.randint(jax.random.key(0), (3, L), 0, 96), np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_parity_sampler_and_export_roundtrip(family, tmp_path, tokens_RxL):
  config_class, kwargs, must_bite = FAMILIES[family]
  model = _hf_model(config_class, kwargs)
  model.save_pretrained(tmp_path / "hf")
  expected = _hf_logits(model, tokens_RxL)

  cfg, graphdef, params = _import(tmp_path / "hf")
  assert cfg.family == family
  logits = _forward(graphdef, params, tokens_RxL)
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  for option, off in must_bite.items():  # Each option is exercised: without it parity fails.
    other, other_shapes, _ = models.abstract(dataclasses.replace(cfg, **{option: off}))
    gap = np.abs(_forward(other, _restrict(params, other_shapes), tokens_RxL) - expected)
    assert gap.max() > 1e-2, (option, gap.max())

  # The sampler's log-probs (temperature 1, KV cache, window in decode) equal teacher forcing of
  # the same rows without their left padding (0, 1, 2 pad tokens): positions count real tokens.
  pads_R, N = np.arange(3), L - P
  mask_RxP = (np.arange(P) >= pads_R[:, None]).astype(np.int32)
  out = sampling.sample(
    graphdef,
    params,
    jnp.asarray(tokens_RxL[:, :P] * mask_RxP),
    jax.random.key(1),
    sampling.SamplingConfig(max_new_tokens=N),
    prompt_mask_RxP=jnp.asarray(mask_RxP),
  )
  sampled_RxL, unpadded_RxL = np.asarray(out["tokens_RxL"]), np.zeros((3, L), np.int32)
  for r, pad in enumerate(pads_R):  # Right padding: causal, so it changes nothing before it.
    unpadded_RxL[r, : L - pad] = sampled_RxL[r, pad:]
  logits_RxLxV = _forward(graphdef, params, unpadded_RxL)
  shifted_RxLxV = logits_RxLxV - logits_RxLxV.max(-1, keepdims=True)
  logp_RxLxV = shifted_RxLxV - np.log(np.exp(shifted_RxLxV).sum(-1, keepdims=True))
  at_RxN = P - pads_R[:, None] + np.arange(N)  # Where each generated token sits, unpadded.
  teacher_RxN = logp_RxLxV[
    np.arange(3)[:, None], at_RxN - 1, unpadded_RxL[np.arange(3)[:, None], at_RxN]
  ]
  np.testing.assert_allclose(out["logp_RxN"], teacher_RxN, atol=1e-5, rtol=0)

  hf.save(tmp_path / "out", params, cfg, max_shard_bytes=2**16)  # Several files and an index.
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(reloaded) is type(model)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens_RxL), expected, atol=1e-5, rtol=0)


def test_phi3_longrope_short_and_long_factors_and_export(tmp_path):
  """Phi-3's su / LongRoPE: a call whose last position is within original_max_position_embeddings
  (8) divides the frequencies by the short factors, a longer one by the long factors, and cos /
  sin are scaled by sqrt(1 + ln(32/8) / ln 8); logits equal transformers' at both lengths, and the
  export reloads to the same."""
  rng = np.random.default_rng(0)
  factors = {k: (1.0 + 3.0 * rng.random(8)).round(3).tolist() for k in ("short", "long")}
  kwargs = dict(
    SHAPE,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
    max_position_embeddings=32,
    original_max_position_embeddings=8,
    rope_scaling=dict(type="longrope", short_factor=factors["short"], long_factor=factors["long"]),
  )
  model = _hf_model("Phi3Config", kwargs)
  model.save_pretrained(tmp_path / "hf")
  cfg, graphdef, params = _import(tmp_path / "hf")
  assert cfg.rope_scaling == "longrope" and cfg.rope_original_max_len == 8
  assert cfg.rope_attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(8)))
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 12), 0, 96), np.int32)
  for length in (6, 12):  # Short factors, then long ones.
    expected = _hf_logits(model, tokens[:, :length])
    np.testing.assert_allclose(_forward(graphdef, params, tokens[:, :length]), expected, atol=1e-4)
    for other in ("short", "long"):  # Each factor set bites where it applies.
      swapped = dict(rope_short_factor=cfg.rope_long_factor, rope_long_factor=cfg.rope_short_factor)
      changed, _, _ = models.abstract(
        dataclasses.replace(cfg, **{f"rope_{other}_factor": swapped[f"rope_{other}_factor"]})
      )
      gap = np.abs(_forward(changed, params, tokens[:, :length]) - expected).max()
      assert (gap > 1e-2) == ((length > 8) == (other == "long")), (length, other, gap)
  hf.save(tmp_path / "out", params, cfg)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens), atol=1e-5)


def test_sharded_import_reads_only_each_device_block(tmp_path, devices8, monkeypatch):
  """On a (1, 4, 2) mesh the arrays carry the rules' shardings and equal the unsharded import;
  no device block is read whole where the rule splits it (sharded index, fused GPT-2 c_attn)."""
  mesh = sharding.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"))
  table = sharding.check_rules(config_lib.base().rules, mesh, set(models.transformer.PARAM_AXES))
  for family in ("gpt2", "qwen2"):
    config_class, kwargs, _ = FAMILIES[family]
    path = tmp_path / family
    _hf_model(config_class, kwargs).save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists()
    cfg, _, plain = _import(path)
    _, shapes, names = models.abstract(cfg)
    shardings = sharding.tree_shardings(names, mesh, table)
    read = []  # (index, block shape) of every read of the safetensors files.
    real_read = hf._read_block
    monkeypatch.setattr(
      hf,
      "_read_block",
      lambda t, spec, shape, index: (
        read.append((index, shape, real_read(t, spec, shape, index))) or read[-1][-1]
      ),
    )
    params = hf.load_params(path, cfg, shardings)
    monkeypatch.undo()

    for got, want, sh in zip(*(jax.tree.leaves(t) for t in (params, plain, shardings))):
      assert got.sharding == sh
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert params["layers"][0]["attn"]["wq_DxHxE"].sharding.spec == jax.P("fsdp", "tensor", None)
    # Each read is one device block, each block is read once: every parameter element once.
    for index, shape, block in read:
      assert block.shape == tuple(len(range(*s.indices(d))) for s, d in zip(index, shape))
    assert sum(b.size for _, _, b in read) == sum(x.size for x in jax.tree.leaves(shapes))
    assert max(b.size for _, _, b in read) < max(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_scanned_layout_imports_sharded_and_exports(family, tmp_path, devices8, tokens_RxL):
  """With scan_layers the same directory imports into stacked parameters [N, ...] on a (1, 4, 2)
  mesh (each layer's device block read from its own tensor, once), equal to the unrolled import
  stacked, with transformers' logits; the export unstacks them into a directory transformers
  reads back. Gemma 3: local and global layers in one scan; GPT-2: the fused c_attn."""
  config_class, kwargs, _ = FAMILIES[family]
  model = _hf_model(config_class, kwargs)
  model.save_pretrained(tmp_path / "hf")
  cfg, graphdef, plain = _import(tmp_path / "hf")
  scanned = dataclasses.replace(cfg, scan_layers=True)
  mesh = sharding.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"))
  table = sharding.check_rules(config_lib.base().rules, mesh, set(models.transformer.PARAM_AXES))
  scan_graphdef, shapes, names = models.abstract(scanned)
  shardings = sharding.tree_shardings(names, mesh, table)
  reads = []
  real_read = hf._read_block
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hf, "_read_block", lambda t, *a: reads.append(real_read(t, *a)) or reads[-1])
    params = hf.load_params(tmp_path / "hf", scanned, shardings)
  for got, want, sh in zip(
    *(jax.tree.leaves(t) for t in (params, models.stack_layers(plain), shardings))
  ):
    assert got.sharding == sh
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert sum(b.size for b in reads) == sum(x.size for x in jax.tree.leaves(shapes))
  expected = _hf_logits(model, tokens_RxL)
  np.testing.assert_allclose(_forward(scan_graphdef, params, tokens_RxL), expected, atol=1e-4)
  host = jax.tree.map(np.asarray, params)
  hf.save(tmp_path / "out", host, scanned)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(_hf_logits(reloaded, tokens_RxL), expected, atol=1e-5, rtol=0)


def test_bfloat16_checkpoint_imports_into_float32_params_and_exports_back(tmp_path):
  config_class, kwargs, _ = FAMILIES["qwen3"]
  model = _hf_model(config_class, kwargs).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  cfg, _, params = _import(tmp_path)
  assert cfg.param_dtype == "float32" and params["embed_VxD"].dtype == jnp.float32
  want = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()  # [G·K, D]
  got = np.asarray(params["layers"][1]["attn"]["wk_DxGxE"]).reshape(64, -1).T
  np.testing.assert_array_equal(got, want)
  hf.save(tmp_path / "out", params, cfg, dtype="bfloat16")  # Back to bf16: lossless.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  for (name, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters()):
    assert p.dtype == q.dtype == torch.bfloat16 and torch.equal(p, q), name


def test_config_translation_errors_and_presets(tmp_path):
  """Contradicting shapes, unsupported architectures and inexpressible exports fail in one line
  naming the field; every real preset is expressible in its family and reads back the same."""
  _hf_model(*FAMILIES["llama"][:2]).save_pretrained(tmp_path)
  tiny = models.preset("tiny").to_dict()
  with pytest.raises(ValueError, match=r"model.vocab_size=8 \(checkpoint: 96\), model.d_model=32"):
    hf.model_config(tmp_path, tiny)  # A hand-built model section: every field is asked for.
  # A fresh-init preset yields to config.json; the run's own fields (dtype, remat) stay.
  merged = hf.model_config(tmp_path, {**tiny, "dtype": "bfloat16"}, presets.fresh("tiny"))
  assert merged == {
    **dataclasses.asdict(models.ModelConfig(**hf.config_fields(hf.read_config(tmp_path)))),
    "dtype": "bfloat16",
  }
  assert merged["rope_scaling"] == "llama3" and merged["d_model"] == 64
  # Overrides of it (fields that differ from the preset) must agree, unless without effect.
  same = {**tiny, "d_model": 64, "rope_scaling": "llama3", "max_positions": 99}
  assert hf.model_config(tmp_path, same, presets.fresh("tiny")) == merged | {"dtype": "float32"}
  with pytest.raises(ValueError, match=r"disagrees with the config: model.n_layers=5 \("):
    hf.model_config(tmp_path, {**tiny, "n_layers": 5}, presets.fresh("tiny"))
  with pytest.raises(ValueError, match=r"model.rope_theta=1000.0 \(checkpoint: 10000.0\);"):
    hf.model_config(tmp_path, {**tiny, "rope_theta": 1e3}, presets.fresh("tiny"))
  assert presets.fresh("llama3_1b") is None  # A real preset is asked for whole.
  with pytest.raises(ValueError, match="model_type 'mamba' is not supported"):
    hf.config_fields({"model_type": "mamba"})
  with pytest.raises(ValueError, match="RoPE type 'yarn' is not supported"):
    hf.config_fields({**hf.read_config(tmp_path), "rope_parameters": {"rope_type": "yarn"}})
  cfg = models.ModelConfig(**hf.config_fields(hf.read_config(tmp_path)))
  with pytest.raises(ValueError, match="cannot express model.qk_norm=True"):
    hf.hf_config(dataclasses.replace(cfg, qk_norm=True))
  for name in presets.PRESETS:
    preset_cfg = models.ModelConfig(**models.preset(name))
    back = models.ModelConfig(
      **hf.config_fields(hf.hf_config(preset_cfg)), **hf.run_fields(preset_cfg)
    )
    assert back.max_positions == (preset_cfg.max_positions or 8192)
    assert dataclasses.replace(back, max_positions=preset_cfg.max_positions) == preset_cfg, name


def test_init_checkpoint_alone_brings_the_architecture(tmp_path):
  """A config file's default preset (testbed-sized) yields to the checkpoint's config.json; an
  override or an explicitly chosen real preset that contradicts it is an error naming the fields."""
  from align_jax import train
  from conftest import load_config

  _hf_model(*FAMILIES["qwen3"][:2]).save_pretrained(tmp_path)
  want = models.ModelConfig(**hf.config_fields(hf.read_config(tmp_path)))
  for arg in ("", "smoke"):
    cfg = load_config("dpo", arg)
    cfg.init_checkpoint, cfg.model.remat = str(tmp_path), True
    got = models.ModelConfig(**train._checked(cfg).model)
    assert got == dataclasses.replace(want, remat=True), arg
  cfg.model.n_kv_heads = 1
  with pytest.raises(ValueError, match=r"model.n_kv_heads=1 \(checkpoint: 2\); the architecture"):
    train._checked(cfg)
  cfg = load_config("dpo", "model=qwen3_0.6b")
  cfg.init_checkpoint = str(tmp_path)
  with pytest.raises(ValueError, match=r"model.vocab_size=151936 \(checkpoint: 96\), model.d_"):
    train._checked(cfg)


def test_dpo_and_bond_from_an_hf_checkpoint_export_to_transformers(tmp_path, tokens_RxL):
  """3 DPO steps and 3 BOND steps through the CLI from a tiny HF Llama over ToyLang's 8 tokens
  (its shape is no preset's: config.json alone gives it), exported with `python -m
  align_jax.export`: transformers' logits of the export equal the run's final parameters' logits,
  and those moved away from the checkpoint's."""
  source = tmp_path / "hf"
  _hf_model(
    "LlamaConfig",
    dict(
      vocab_size=8,
      hidden_size=40,
      intermediate_size=72,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
    ),
    seed=1,
  ).save_pretrained(source)
  runs = ("dpo", "bond")
  env = subprocess_env(1)

  def run_all(commands):  # Both at once, each must succeed.
    procs = [
      subprocess.Popen(
        c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
      for c in commands
    ]
    for p in procs:
      out = p.communicate(timeout=600)[0]
      assert p.returncode == 0, out[-3000:]

  run_all(
    [
      main_command(
        f"--config={ROOT}/configs/{name}.py:smoke",
        f"--workdir={tmp_path / name}",
        f"--config.init_checkpoint={source}",
        "--config.total_steps=3",
        "--config.testbed.exact_eval=False",
      )
      for name in runs
    ]
  )
  run_all(
    [
      [
        sys.executable,
        "-m",
        "align_jax.export",
        f"--workdir={tmp_path / name}",
        f"--out={tmp_path / name}_hf",
      ]
      for name in runs
    ]
  )

  tokens_RxL = tokens_RxL % 8
  _, _, initial = _import(source)
  for name in runs:
    with open(tmp_path / name / "config.json") as f:
      cfg = models.ModelConfig(**json.load(f)["model"])
    assert cfg.family == "llama" and (cfg.d_model, cfg.mlp_dim) == (40, 72)
    assert not cfg.tie_embeddings
    graphdef, shapes, _ = models.abstract(cfg)
    step, params = checkpoint.load_state_params(
      tmp_path / name / "checkpoints", checkpoint.abstract_like(shapes, _single_device(shapes))
    )
    assert step == 3
    moved = jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), params, initial
    )
    assert min(jax.tree.leaves(moved)) > 1e-4, moved
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_hf").eval()
    np.testing.assert_allclose(
      _hf_logits(exported, tokens_RxL), _forward(graphdef, params, tokens_RxL), atol=1e-4, rtol=0
    )
