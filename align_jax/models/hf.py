"""Hugging Face checkpoints: config.json <-> ModelConfig, sharded import, export.

A local HF directory (`config.json` with a `model_type`, and `model.safetensors` or shards listed in
`model.safetensors.index.json`) of a Llama 3.x, Gemma 1/2/3, Qwen2/2.5/3, Mistral, Phi-3 or GPT-2
causal LM:

  fields = hf.config_fields(hf.read_config(path))        # ModelConfig's architecture fields
  params = hf.load_params(path, model_cfg, shardings)     # sharded, each process reads its slices
  hf.save(out_dir, params, model_cfg)                     # loads in AutoModelForCausalLM

Every parameter is one HF tensor (or a block of a fused one: GPT-2's `c_attn` columns, Phi-3's
`qkv_proj` and `gate_up_proj` rows) viewed as a matrix M[a, b]: its first `split` axes flatten to
a, the rest to b (wq_DxHxE: a = D, b = H·E). HF Linear weights store M transposed ([out, in]);
GPT-2's Conv1D and embeddings store M as is. Import builds
each array with `jax.make_array_from_callback`, reading through `safe_open(...).get_slice` only
the rows and columns of the blocks the process's devices hold. With `scan_layers` a block
parameter stacks the layers' tensors on its leading axis: import reads each layer's block and
stacks them, export unstacks (`transformer.unstack_layers`); both layouts import the same
directory.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from align_jax.models.transformer import ModelConfig, abstract, unstack_layers
from align_jax.errors import HFDirError, MissingFileError

# family -> (model_type, architecture) written on export.
ARCHITECTURES = {
  "llama": ("llama", "LlamaForCausalLM"),
  "gemma": ("gemma", "GemmaForCausalLM"),
  "gemma2": ("gemma2", "Gemma2ForCausalLM"),
  "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
  "qwen2": ("qwen2", "Qwen2ForCausalLM"),
  "qwen3": ("qwen3", "Qwen3ForCausalLM"),
  "gpt2": ("gpt2", "GPT2LMHeadModel"),
  "mistral": ("mistral", "MistralForCausalLM"),
  "phi3": ("phi3", "Phi3ForCausalLM"),
}
_FAMILY = {model_type: family for family, (model_type, _) in ARCHITECTURES.items()}
# ModelConfig fields that shape the parameters: a run's config must agree with the checkpoint.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim")
# ModelConfig fields that are the run's choice, not the checkpoint's.
RUN_FIELDS = (
  "dtype",
  "param_dtype",
  "remat",
  "remat_policy",
  "num_scores",
  "attention_impl",
  "scan_layers",
  "logits_chunk",
  "attention_chunk",
)
# Files of the source directory an export carries over (tokenizer, generation defaults).
_CARRIED = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "chat_template.jinja",
  "generation_config.json",
  "vocab.json",
  "merges.txt",
)
_ACTIVATIONS = {
  "silu": "silu",
  "swish": "silu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "gelu_fast": "gelu_tanh",
  "gelu": "gelu",
}


def is_hf_dir(path: str) -> bool:
  """Whether `path` is a Hugging Face model directory (a config.json naming a model_type)."""
  config = os.path.join(path, "config.json") if path else ""
  if not os.path.isfile(config):
    return False
  with open(config) as f:
    return "model_type" in json.load(f)


def read_config(hf_dir: str) -> dict:
  """config.json as a dict (a multimodal Gemma 3's text_config)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise MissingFileError(f"{hf_dir!r}: no config.json (not a Hugging Face model directory)")
  with open(path) as f:
    hf = json.load(f)
  if hf.get("model_type") == "gemma3" and "text_config" in hf:
    hf = {**hf["text_config"], "model_type": "gemma3_text"}
  return hf


def generation_token_ids(hf_dir: str) -> dict[str, list[int]]:
  """{"bos": [...], "eos": [...]}: the ids generation_config.json (else config.json) names."""
  path = os.path.join(hf_dir, "generation_config.json")
  source = read_config(hf_dir)
  if os.path.isfile(path):
    with open(path) as f:
      source = {**source, **json.load(f)}
  out = {}
  for key in ("bos", "eos"):
    value = source.get(f"{key}_token_id")
    out[key] = [] if value is None else list(value) if isinstance(value, list) else [value]
  return out


# ---- config.json -> ModelConfig ------------------------------------------------------------------


def config_fields(hf: Mapping, where: str = "config.json") -> dict:
  """The ModelConfig architecture fields (all but RUN_FIELDS) of an HF config dict."""
  try:
    return _config_fields(hf, where)
  except KeyError as e:
    raise HFDirError(
      f"{where}: no {e.args[0]!r} (a {hf.get('model_type')} config needs it)"
    ) from None


def _config_fields(hf: Mapping, where: str) -> dict:
  model_type = hf.get("model_type")
  if model_type not in _FAMILY:
    raise HFDirError(
      f"{where}: model_type {model_type!r} is not supported; supported: {sorted(_FAMILY)}"
    )
  family = _FAMILY[model_type]
  if family == "gpt2":
    return _gpt2_fields(hf, where)
  gemma = family.startswith("gemma")
  H = hf["num_attention_heads"]
  fields = dict(
    family=family,
    vocab_size=hf["vocab_size"],
    d_model=hf["hidden_size"],
    n_layers=hf["num_hidden_layers"],
    n_heads=H,
    n_kv_heads=hf.get("num_key_value_heads") or H,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // H,
    mlp_dim=hf["intermediate_size"],
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    max_positions=hf.get("max_position_embeddings", 0),
    tie_embeddings=hf.get("tie_word_embeddings", gemma),
    mlp_act=_activation(hf, family, where),
    norm_plus_one=gemma,
    embed_scale=gemma,
    qkv_bias=family == "qwen2" or hf.get("attention_bias", False),
    out_bias=family != "qwen2" and hf.get("attention_bias", False),
    mlp_bias=family == "llama" and hf.get("mlp_bias", False),
    qk_norm=family in ("qwen3", "gemma3"),
    post_norms=family in ("gemma2", "gemma3"),
  )
  if family in ("gemma2", "gemma3"):
    fields.update(
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
      final_softcap=float(
        hf.get("final_logit_softcapping", 30.0 if family == "gemma2" else None) or 0.0
      ),
    )
  if family == "gemma2":  # Gemma 3's attention ignores attn_logit_softcapping (transformers 5).
    fields["attn_softcap"] = float(hf.get("attn_logit_softcapping", 50.0) or 0.0)
  if hf.get("use_bidirectional_attention"):
    raise HFDirError(f"{where}: use_bidirectional_attention is not supported (causal LMs only)")
  fields.update(_rope_fields(hf, family, where))
  fields.update(_window_fields(hf, family, where))
  return fields


def _activation(hf, family, where) -> str:
  act = (
    hf.get("hidden_activation")
    or hf.get("hidden_act")
    or ("gelu_pytorch_tanh" if family.startswith("gemma") else "silu")
  )
  if family == "gemma" and act == "gelu":  # transformers reads Gemma's legacy "gelu" as tanh.
    act = "gelu_pytorch_tanh"
  if act not in _ACTIVATIONS:
    raise HFDirError(
      f"{where}: activation {act!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
    )
  return _ACTIVATIONS[act]


def _gpt2_fields(hf, where) -> dict:
  for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
    if hf.get(key):
      raise HFDirError(f"{where}: GPT-2 with {key}=true is not supported")
  D, H = hf["n_embd"], hf["n_head"]
  act = hf.get("activation_function", "gelu_new")
  if act not in _ACTIVATIONS:
    raise HFDirError(f"{where}: activation_function {act!r} is not supported")
  return dict(
    family="gpt2",
    vocab_size=hf["vocab_size"],
    d_model=D,
    n_layers=hf["n_layer"],
    n_heads=H,
    n_kv_heads=H,
    head_dim=D // H,
    mlp_dim=hf.get("n_inner") or 4 * D,
    norm="layer",
    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    mlp_act=_ACTIVATIONS[act],
    gated_mlp=False,
    positions="learned",
    max_positions=hf["n_positions"],
    tie_embeddings=hf.get("tie_word_embeddings", True),
    query_pre_attn_scalar=0.0 if hf.get("scale_attn_weights", True) else 1.0,
  )


def _rope_fields(hf, family, where) -> dict:
  """RoPE of the global layers (theta, scaling) and Gemma 3's local theta; old and new layouts."""
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params or "sliding_attention" in params:  # Per layer type (Gemma 3).
    global_, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
  else:
    global_, local = params or hf.get("rope_scaling") or {}, {}
  default_theta = 1_000_000.0 if family == "gemma3" else 10_000.0
  fields = dict(rope_theta=float(global_.get("rope_theta", hf.get("rope_theta", default_theta))))
  if family == "gemma3":
    fields["rope_local_theta"] = float(
      local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    )
  for p in (global_, local):
    if p.get("partial_rotary_factor", 1.0) != 1.0:
      raise HFDirError(f"{where}: partial_rotary_factor is not supported")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise HFDirError(f"{where}: partial_rotary_factor is not supported")
  kind = global_.get("rope_type", global_.get("type")) or "default"
  kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it.
  if local.get("rope_type", "default") != "default" or kind not in (
    "default",
    "linear",
    "llama3",
    "longrope",
  ):
    raise HFDirError(
      f"{where}: RoPE type {kind!r} is not supported; supported: default, linear, llama3, longrope"
    )
  if kind == "linear":
    fields.update(rope_scaling="linear", rope_factor=float(global_["factor"]))
  elif kind == "longrope":  # transformers' _compute_longrope_parameters.
    original = int(
      global_.get("original_max_position_embeddings") or hf["original_max_position_embeddings"]
    )
    factor = global_.get("factor") or hf.get("max_position_embeddings", original) / original
    attention = global_.get("attention_factor")
    if attention is None:
      attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    fields.update(
      rope_scaling="longrope",
      rope_short_factor=tuple(float(f) for f in global_["short_factor"]),
      rope_long_factor=tuple(float(f) for f in global_["long_factor"]),
      rope_original_max_len=original,
      rope_attention_factor=float(attention),
    )
  elif kind == "llama3":
    fields.update(
      rope_scaling="llama3",
      rope_factor=float(global_["factor"]),
      rope_low_freq_factor=float(global_["low_freq_factor"]),
      rope_high_freq_factor=float(global_["high_freq_factor"]),
      rope_original_max_len=int(
        global_.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
      ),
    )
  return fields


def _layer_types(hf, family) -> list[str]:
  if hf.get("layer_types"):
    return list(hf["layer_types"])
  n = hf["num_hidden_layers"]
  if family in ("gemma2", "gemma3"):
    period = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
  if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    return [
      "sliding_attention" if i >= hf.get("max_window_layers", n) else "full_attention"
      for i in range(n)
    ]
  if family in ("mistral", "phi3") and hf.get("sliding_window"):  # Every layer.
    return ["sliding_attention"] * n
  return ["full_attention"] * n


def _window_fields(hf, family, where) -> dict:
  """layer_types as (sliding_window, sliding_window_pattern) when every P-th layer is global,
  else as the list of local layers (window_layers). Qwen's window exists only with
  use_sliding_window (transformers drops it otherwise)."""
  local = [t == "sliding_attention" for t in _layer_types(hf, family)]
  window = hf.get("sliding_window") or (4096 if family.startswith("gemma") else 0)
  if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
    window = 0
  if not any(local) or not window:
    return {}
  for period in range(len(local) + 1):
    if local == [not (period and (i + 1) % period == 0) for i in range(len(local))]:
      return dict(sliding_window=int(window), sliding_window_pattern=period)
  return dict(sliding_window=int(window), window_layers=tuple(i for i, x in enumerate(local) if x))


def model_config(hf_dir: str, model: Mapping, defaults: Mapping | None = None) -> dict:
  """A run's model fields with the architecture taken from `hf_dir`'s config.json.

  Args:
    hf_dir: the Hugging Face directory.
    model: the run's model fields (a preset, overrides, RUN_FIELDS).
    defaults: the fields `model` holds by default and that yield to the checkpoint (a fresh-init
      preset's); a field of `model` equal to its default is not asked for. None: every field is.

  Returns:
    The checkpoint's ModelConfig fields, with `model`'s RUN_FIELDS.

  Raises:
    HFDirError naming each asked-for field that contradicts the checkpoint: a shape field, or one
    whose value would change the checkpoint's computation (fields without effect, such as a RoPE
    model's max_positions, pass).
  """
  fields = config_fields(read_config(hf_dir), os.path.join(hf_dir, "config.json"))
  run = {k: v for k, v in model.items() if k in RUN_FIELDS}
  checkpoint = ModelConfig(**fields, **run)
  arch = {k: v for k, v in dataclasses.asdict(checkpoint).items() if k not in RUN_FIELDS}
  unset = object()
  asked = {
    k: v
    for k, v in model.items()
    if k in arch and (defaults is None or defaults.get(k, unset) != v)
  }
  bad = [  # In ModelConfig's order: the shape first.
    f"model.{k}={asked[k]!r} (checkpoint: {arch[k]!r})"
    for k in arch
    if k in asked and asked[k] != arch[k] and _changes(checkpoint, k, asked[k])
  ]
  if bad:
    raise HFDirError(
      f"init_checkpoint {hf_dir!r} disagrees with the config: {', '.join(bad)}; the "
      "architecture comes from its config.json: drop the model preset or these overrides"
    )
  return {**arch, **run}


def _changes(cfg: ModelConfig, key: str, value) -> bool:
  """Whether setting `key` to `value` changes `cfg`'s parameters or computation."""
  if key in SHAPE_FIELDS or (key == "max_positions" and cfg.positions == "learned"):
    return True
  try:
    other = dataclasses.replace(cfg, **{key: value})
  except (ValueError, TypeError):  # Not even a valid architecture with it.
    return True
  return _canonical(other) != _canonical(cfg)


# ---- Parameter <-> tensor correspondence ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Our parameter is M[a, b] (first `split` axes -> a) of HF tensor `name`, stored transposed
  (Linear: [out, in]) or not, starting at column `offset` (GPT-2's fused c_attn)."""

  name: str
  split: int
  transposed: bool = False
  offset: int = 0
  stacked: bool = False  # scan_layers: `name` has a `{}` for the layer; axis 0 is the layer.


def _specs(cfg: ModelConfig, shapes: dict, prefix: str, lm_head: str) -> dict:
  """{our parameter path (keystr) -> _Spec} for every parameter of `shapes`."""
  specs = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    stacked = cfg.scan_layers and keys[0] == "layers"
    if stacked:  # As layer "{}" of the unrolled layout; the layer is filled in per tensor.
      keys = ("layers", "{}", *keys[1:])
    spec = (_gpt2_spec if cfg.family == "gpt2" else _spec)(cfg, keys, prefix, lm_head)
    if spec is None:
      raise HFDirError(f"parameter {'/'.join(map(str, keys))} has no {cfg.family} counterpart")
    specs[jax.tree_util.keystr(path)] = dataclasses.replace(spec, stacked=stacked)
  return specs


def _spec(cfg, keys, prefix, lm_head) -> _Spec | None:
  top = {
    "embed_VxD": _Spec(prefix + "embed_tokens.weight", 1),
    "unembed_DxV": _Spec(lm_head, 1, True),
    "final_norm/scale_D": _Spec(prefix + "norm.weight", 0),
  }
  if keys[0] != "layers":
    return top.get("/".join(map(str, keys)))
  mlp_norm = "pre_feedforward_layernorm" if cfg.post_norms else "post_attention_layernorm"
  names = {
    "attn_norm/scale_D": ("input_layernorm.weight", 0, False),
    "mlp_norm/scale_D": (f"{mlp_norm}.weight", 0, False),
    "post_attn_norm/scale_D": ("post_attention_layernorm.weight", 0, False),
    "post_mlp_norm/scale_D": ("post_feedforward_layernorm.weight", 0, False),
    "attn/wq_DxHxE": ("self_attn.q_proj.weight", 1, True),
    "attn/wk_DxGxE": ("self_attn.k_proj.weight", 1, True),
    "attn/wv_DxGxE": ("self_attn.v_proj.weight", 1, True),
    "attn/wo_HxExD": ("self_attn.o_proj.weight", 2, True),
    "attn/bq_HxE": ("self_attn.q_proj.bias", 0, False),
    "attn/bk_GxE": ("self_attn.k_proj.bias", 0, False),
    "attn/bv_GxE": ("self_attn.v_proj.bias", 0, False),
    "attn/bo_D": ("self_attn.o_proj.bias", 0, False),
    "attn/q_norm/scale_E": ("self_attn.q_norm.weight", 0, False),
    "attn/k_norm/scale_E": ("self_attn.k_norm.weight", 0, False),
    "mlp/wgate_DxF": ("mlp.gate_proj.weight", 1, True),
    "mlp/wup_DxF": ("mlp.up_proj.weight", 1, True),
    "mlp/wdown_FxD": ("mlp.down_proj.weight", 1, True),
    "mlp/bgate_F": ("mlp.gate_proj.bias", 0, False),
    "mlp/bup_F": ("mlp.up_proj.bias", 0, False),
    "mlp/bdown_D": ("mlp.down_proj.bias", 0, False),
  }
  path = "/".join(map(str, keys[2:]))
  if cfg.family == "phi3":  # Fused rows: qkv_proj = [q | k | v], gate_up_proj = [gate | up].
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    fused = {
      "attn/wq_DxHxE": ("self_attn.qkv_proj.weight", 0),
      "attn/wk_DxGxE": ("self_attn.qkv_proj.weight", q),
      "attn/wv_DxGxE": ("self_attn.qkv_proj.weight", q + kv),
      "mlp/wgate_DxF": ("mlp.gate_up_proj.weight", 0),
      "mlp/wup_DxF": ("mlp.gate_up_proj.weight", cfg.mlp_dim),
    }
    if path in fused:
      name, offset = fused[path]
      return _Spec(f"{prefix}layers.{keys[1]}.{name}", 1, True, offset)
  found = names.get(path)
  if found is None:
    return None
  name, split, transposed = found
  return _Spec(f"{prefix}layers.{keys[1]}.{name}", split, transposed)


def _gpt2_spec(cfg, keys, prefix, lm_head) -> _Spec | None:
  top = {
    "embed_VxD": _Spec(prefix + "wte.weight", 1),
    "pos_embed_LxD": _Spec(prefix + "wpe.weight", 1),
    "unembed_DxV": _Spec(lm_head, 1, True),
    "final_norm/scale_D": _Spec(prefix + "ln_f.weight", 0),
    "final_norm/bias_D": _Spec(prefix + "ln_f.bias", 0),
  }
  if keys[0] != "layers":
    return top.get("/".join(map(str, keys)))
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim  # c_attn = [q | k | v].
  names = {
    "attn_norm/scale_D": ("ln_1.weight", 0, 0),
    "attn_norm/bias_D": ("ln_1.bias", 0, 0),
    "mlp_norm/scale_D": ("ln_2.weight", 0, 0),
    "mlp_norm/bias_D": ("ln_2.bias", 0, 0),
    "attn/wq_DxHxE": ("attn.c_attn.weight", 1, 0),
    "attn/wk_DxGxE": ("attn.c_attn.weight", 1, q),
    "attn/wv_DxGxE": ("attn.c_attn.weight", 1, q + kv),
    "attn/bq_HxE": ("attn.c_attn.bias", 0, 0),
    "attn/bk_GxE": ("attn.c_attn.bias", 0, q),
    "attn/bv_GxE": ("attn.c_attn.bias", 0, q + kv),
    "attn/wo_HxExD": ("attn.c_proj.weight", 2, 0),
    "attn/bo_D": ("attn.c_proj.bias", 0, 0),
    "mlp/wup_DxF": ("mlp.c_fc.weight", 1, 0),
    "mlp/bup_F": ("mlp.c_fc.bias", 0, 0),
    "mlp/wdown_FxD": ("mlp.c_proj.weight", 1, 0),
    "mlp/bdown_D": ("mlp.c_proj.bias", 0, 0),
  }
  found = names.get("/".join(map(str, keys[2:])))
  if found is None:
    return None
  name, split, offset = found
  return _Spec(f"{prefix}h.{keys[1]}.{name}", split, False, offset)


def _hf_shape(spec: _Spec, shape) -> tuple[int, ...]:
  """The shape of our parameter's block of the HF tensor (as stored)."""
  a, b = math.prod(shape[: spec.split]), math.prod(shape[spec.split :])
  if not spec.split:
    return (b,)
  return (b, a) if spec.transposed else (a, b)


# ---- Import --------------------------------------------------------------------------------------


def _tensor_files(hf_dir: str) -> dict[str, str]:
  """{tensor name -> safetensors file} from the index, or the single model.safetensors."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      return {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
  single = os.path.join(hf_dir, "model.safetensors")
  if not os.path.isfile(single):
    raise MissingFileError(
      f"{hf_dir!r}: neither model.safetensors nor "
      "model.safetensors.index.json (only safetensors weights are read)"
    )
  with safe_open(single, "numpy") as f:
    return {k: single for k in f.keys()}


def _prefixes(cfg: ModelConfig, names, hf_dir) -> tuple[str, str]:
  """(prefix of the decoder's tensors, name of lm_head) in this checkpoint's naming."""
  embed = "wte.weight" if cfg.family == "gpt2" else "embed_tokens.weight"
  candidates = (
    ("transformer.", "")
    if cfg.family == "gpt2"
    else ("model.", "language_model.model.", "model.language_model.", "")
  )
  for prefix in candidates:
    if prefix + embed in names:
      heads = [h for h in ("lm_head.weight", "language_model.lm_head.weight") if h in names]
      return prefix, (heads[0] if heads else "lm_head.weight")
  raise HFDirError(f"{hf_dir!r}: no {embed} under any of the prefixes {list(candidates)}")


def _outer(dims, slices) -> tuple[int, int, list[slice]]:
  """A block of the flattened axes `dims`: the flat range covering whole rows of the first
  sliced axis, and the slices of the other axes to take from it."""
  norm = [slice(*s.indices(d)) for s, d in zip(slices, dims)]
  if any(s.step != 1 for s in norm):
    raise HFDirError("strided shardings are not supported")
  if not dims:
    return 0, 1, []
  inner = math.prod(dims[1:])
  return norm[0].start * inner, norm[0].stop * inner, norm[1:]


def _read_block(tensor, spec: _Spec, shape, index) -> np.ndarray:
  """Our parameter's block at `index` (a tuple of slices) read from the HF tensor slice object."""
  a_dims, b_dims = shape[: spec.split], shape[spec.split :]
  a0, a1, a_rest = _outer(a_dims, index[: spec.split])
  b0, b1, b_rest = _outer(b_dims, index[spec.split :])
  o = spec.offset
  if not a_dims:
    block = tensor[b0 + o : b1 + o]
  elif spec.transposed:
    block = np.asarray(tensor[b0 + o : b1 + o, a0:a1]).T
  else:
    block = tensor[a0:a1, b0 + o : b1 + o]
  a_shape = ((a1 - a0) // math.prod(a_dims[1:]), *a_dims[1:]) if a_dims else ()
  b_shape = ((b1 - b0) // math.prod(b_dims[1:]), *b_dims[1:])
  block = np.asarray(block).reshape(*a_shape, *b_shape)
  take = (*([slice(None)] if a_dims else []), *a_rest, slice(None), *b_rest)
  return block[take]


def load_params(hf_dir: str, cfg: ModelConfig, shardings) -> dict:
  """The parameters of `hf_dir` as arrays with `shardings` (the tree of `models.abstract(cfg)`),
  each device's block read from the safetensors files directly; cast to cfg.param_dtype."""
  _, shapes, _ = abstract(cfg)
  files = _tensor_files(hf_dir)
  prefix, lm_head = _prefixes(cfg, files, hf_dir)
  specs = _specs(cfg, shapes, prefix, lm_head)
  expected = {}  # HF name -> shape: our blocks side by side (GPT-2's c_attn holds three).
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    spec = specs[jax.tree_util.keystr(path)]
    block = _hf_shape(spec, leaf.shape[1:] if spec.stacked else leaf.shape)
    known = expected.get(spec.name)
    if known is not None and spec.transposed:  # Fused rows (Phi-3).
      block = (known[0] + block[0], *block[1:])
    elif known is not None:  # Fused columns (GPT-2).
      block = (*block[:-1], known[-1] + block[-1])
    expected[spec.name] = block
  dtype = jnp.dtype(cfg.param_dtype)
  templates = {spec.name for spec in specs.values() if spec.stacked}
  layer_names = {t.format(i): t for t in templates for i in range(cfg.n_layers)}
  spec_name = lambda name: layer_names.get(name, name)  # A layer's tensor -> its spec's name.
  with contextlib.ExitStack() as stack:
    opened = {}

    def tensor(name):
      if name not in files:
        raise HFDirError(f"{hf_dir!r}: tensor {name!r} is missing")
      if files[name] not in opened:
        opened[files[name]] = stack.enter_context(safe_open(files[name], "numpy"))
      return opened[files[name]].get_slice(name)

    def checked(name):
      t = tensor(name)
      if tuple(t.get_shape()) != expected[spec_name(name)]:
        raise HFDirError(
          f"{hf_dir!r}: tensor {name!r} has shape {tuple(t.get_shape())}; "
          f"config.json implies {expected[spec_name(name)]}"
        )
      return t

    def load(path, leaf, sh):
      spec, shape = specs[jax.tree_util.keystr(path)], tuple(leaf.shape)
      memo = {}  # Replicated blocks are read once.

      def block(index):
        key = tuple((s.start, s.stop) for s in index)
        if key not in memo:
          if spec.stacked:  # Layer i's block of its own tensor, for each layer of the block.
            layers = range(*index[0].indices(shape[0]))
            memo[key] = np.stack(
              [
                _read_block(checked(spec.name.format(i)), spec, shape[1:], index[1:])
                for i in layers
              ]
            ).astype(dtype)
          else:
            memo[key] = _read_block(checked(spec.name), spec, shape, index).astype(dtype)
        return memo[key]

      return jax.make_array_from_callback(shape, sh, block)

    return jax.tree_util.tree_map_with_path(load, shapes, shardings)


# ---- Export --------------------------------------------------------------------------------------


def run_fields(cfg: ModelConfig) -> dict:
  """cfg's RUN_FIELDS (the run's choices, which no checkpoint carries)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k in RUN_FIELDS}


def _canonical(cfg: ModelConfig) -> dict:
  """The architecture fields that change the computation (for the export round-trip check)."""
  f = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_FIELDS}
  f["local_layers"] = tuple(cfg.is_local(i) for i in range(cfg.n_layers))
  drop = {"sliding_window_pattern", "window_layers", "max_positions"}
  if not any(f["local_layers"]):
    drop |= {"sliding_window", "rope_local_theta"}
  elif not cfg.rope_local_theta and not cfg.rope_scaling:  # Local layers: the same RoPE.
    f["rope_local_theta"] = cfg.rope_theta
  if cfg.rope_scaling != "longrope":
    drop |= {"rope_short_factor", "rope_long_factor", "rope_attention_factor"}
  if cfg.rope_scaling not in ("llama3", "longrope"):
    drop |= {"rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"}
  elif cfg.rope_scaling == "longrope":
    drop |= {"rope_low_freq_factor", "rope_high_freq_factor", "rope_factor"}
  if not cfg.rope_scaling:
    drop.add("rope_factor")
  if cfg.positions == "learned":
    drop |= {k for k in f if k.startswith("rope_")}
  return {k: v for k, v in f.items() if k not in drop}


def hf_config(cfg: ModelConfig, special_tokens: Mapping | None = None) -> dict:
  """config.json of `cfg` for its family (the same keys transformers writes, old and new RoPE
  layouts both). Raises ValueError if the family cannot express the config."""
  if cfg.family not in ARCHITECTURES:
    raise HFDirError(f"model.family={cfg.family!r} has no Hugging Face architecture")
  model_type, arch = ARCHITECTURES[cfg.family]
  out = {
    "architectures": [arch],
    "model_type": model_type,
    "vocab_size": cfg.vocab_size,
    "tie_word_embeddings": cfg.tie_embeddings,
    "dtype": cfg.param_dtype,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    **(special_tokens or {}),
  }
  if cfg.family == "gpt2":
    out.update(
      n_embd=cfg.d_model,
      n_layer=cfg.n_layers,
      n_head=cfg.n_heads,
      n_inner=cfg.mlp_dim,
      n_positions=cfg.max_positions,
      layer_norm_epsilon=cfg.norm_eps,
      activation_function={"gelu_tanh": "gelu_new"}.get(cfg.mlp_act, cfg.mlp_act),
      scale_attn_weights=cfg.query_pre_attn_scalar != 1.0,
    )
  else:
    types = [
      "sliding_attention" if cfg.is_local(i) else "full_attention" for i in range(cfg.n_layers)
    ]
    act = {"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.mlp_act, cfg.mlp_act)
    out.update(
      hidden_size=cfg.d_model,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim,
      intermediate_size=cfg.mlp_dim,
      rms_norm_eps=cfg.norm_eps,
      max_position_embeddings=cfg.max_positions or 8192,
      attention_bias=cfg.qkv_bias,
      mlp_bias=cfg.mlp_bias,
      **{"hidden_activation" if cfg.family in ("gemma2", "gemma3") else "hidden_act": act},
    )
    if cfg.family in ("gemma2", "gemma3"):
      scalar = cfg.query_pre_attn_scalar  # An int in transformers' config class.
      out.update(
        query_pre_attn_scalar=int(scalar) if scalar == int(scalar) else scalar,
        final_logit_softcapping=cfg.final_softcap or None,
        attn_logit_softcapping=cfg.attn_softcap or None,
      )
    if cfg.family in ("gemma2", "gemma3", "qwen2", "qwen3"):
      out["layer_types"] = types
    if any(t == "sliding_attention" for t in types):
      out.update(
        sliding_window=cfg.sliding_window, sliding_window_pattern=cfg.sliding_window_pattern
      )
      if cfg.family.startswith("qwen"):  # Else transformers drops the window.
        out.update(use_sliding_window=True, max_window_layers=0)
    elif cfg.family in ("mistral", "phi3"):  # Else transformers' default window (Mistral: 4096).
      out["sliding_window"] = None
    out.update(_rope_config(cfg))
  have = _canonical(ModelConfig(**config_fields(out), **run_fields(cfg)))
  want = _canonical(cfg)
  diff = sorted(k for k in want if have.get(k) != want[k])
  if diff:
    raise HFDirError(
      f"a {cfg.family} checkpoint cannot express model."
      f"{', model.'.join(f'{k}={want[k]!r}' for k in diff)}"
    )
  return out


def _rope_config(cfg: ModelConfig) -> dict:
  scaling = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "longrope":
    scaling.update(
      short_factor=list(cfg.rope_short_factor),
      long_factor=list(cfg.rope_long_factor),
      original_max_position_embeddings=cfg.rope_original_max_len,
      attention_factor=cfg.rope_attention_factor,
    )
  elif cfg.rope_scaling:
    scaling["factor"] = cfg.rope_factor
  if cfg.rope_scaling == "llama3":
    scaling.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  out = {
    "rope_theta": cfg.rope_theta,
    "rope_scaling": scaling if cfg.rope_scaling else None,
    "rope_parameters": scaling,
  }
  if cfg.rope_scaling == "longrope":
    out["original_max_position_embeddings"] = cfg.rope_original_max_len
  if cfg.family == "gemma3":
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    out.update(
      rope_local_base_freq=local["rope_theta"],
      rope_parameters={"full_attention": scaling, "sliding_attention": local},
    )
  return out


def save(
  out_dir: str,
  params: dict,
  cfg: ModelConfig,
  *,
  source_dir: str | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
) -> None:
  """Writes `params` as a Hugging Face directory: config.json, generation_config.json and
  model.safetensors (or shards and an index above `max_shard_bytes`).

  Args:
    out_dir: the directory to write (created).
    params: the model's parameters (host-readable: a single-process export).
    cfg: their ModelConfig; cfg.family picks the architecture.
    source_dir: the HF directory the run started from: its special token ids and tokenizer /
      generation files are carried over.
    dtype: the stored dtype (e.g. "bfloat16"); default cfg.param_dtype.
    max_shard_bytes: largest safetensors file.
  """
  if cfg.num_scores:
    raise HFDirError("a scoring model (num_scores > 0) has no causal-LM Hugging Face form")
  if cfg.scan_layers:  # The same tensors as the unrolled layout's, one per layer.
    params, cfg = unstack_layers(params), dataclasses.replace(cfg, scan_layers=False)
  special = {}
  if source_dir:
    src = read_config(source_dir)
    special = {k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in src}
  config = hf_config(cfg, special)
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  config["dtype"] = str(dtype)
  specs = _specs(
    cfg, params, "transformer." if cfg.family == "gpt2" else "model.", "lm_head.weight"
  )
  pieces = {}  # HF name -> [(offset, path)]
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    spec = specs[jax.tree_util.keystr(path)]
    pieces.setdefault(spec.name, []).append((spec.offset, path))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}

  def tensor(name) -> np.ndarray:
    blocks = []
    for _, path in sorted(pieces[name], key=lambda p: p[0]):
      spec, x = specs[jax.tree_util.keystr(path)], np.asarray(flat[jax.tree_util.keystr(path)])
      m = x.reshape(_hf_shape(dataclasses.replace(spec, transposed=False), x.shape))
      blocks.append(m.T if spec.transposed else m)
    axis = 0 if specs[jax.tree_util.keystr(pieces[name][0][1])].transposed else -1
    return np.ascontiguousarray(np.concatenate(blocks, axis=axis).astype(dtype))

  sizes = {
    n: sum(flat[jax.tree_util.keystr(p)].size for _, p in v) * dtype.itemsize
    for n, v in pieces.items()
  }
  shards, current = [], []
  for name in pieces:
    if current and sum(sizes[n] for n in current) + sizes[name] > max_shard_bytes:
      shards.append(current)
      current = []
    current.append(name)
  shards.append(current)
  os.makedirs(out_dir, exist_ok=True)
  files = (
    ["model.safetensors"]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  for file, names in zip(files, shards):
    save_file({n: tensor(n) for n in names}, os.path.join(out_dir, file), metadata={"format": "pt"})
  if len(shards) > 1:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(
        {
          "metadata": {"total_size": sum(sizes.values())},
          "weight_map": {n: file for file, names in zip(files, shards) for n in names},
        },
        f,
        indent=1,
      )
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=1)
  for name in _CARRIED if source_dir else ():
    if os.path.isfile(os.path.join(source_dir, name)):
      shutil.copyfile(os.path.join(source_dir, name), os.path.join(out_dir, name))
  if not os.path.isfile(os.path.join(out_dir, "generation_config.json")):
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(
        {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, f, indent=1
      )
