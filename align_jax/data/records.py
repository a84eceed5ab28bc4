"""A run's records: the arrays its data pipeline batches, by the objective's record format.

From the testbed (generated from the base LM's exact conditional) or from a file source
(align_jax/data/preference.py, prompts.py), then completed by what the frozen reference adds:
the model's own samples beside negatives (D2O), BCO's density-ratio weights (UDM), and reference
log-probs computed once per dataset (`data.precompute_ref`).
"""

import os

import numpy as np
from jax.experimental import multihost_utils

from align_jax import sampling
from align_jax.data import pipeline, preference, prompts, reference, tokenize, udm
from align_jax.errors import ConfigError
from align_jax.testbed import base as testbed_base
from align_jax.testbed import task

# Record fields that become batch fields (others, e.g. testbed indices, stay on the host).
BATCH_FIELDS = (
  "tokens_KxL",
  "loss_mask_KxL",
  "score_K",
  "response_mask_K",
  "desirable",
  "is_tie",
  "label_dist_C",
  "ref_logp_K",
  "udm_weight",
  "prompt_P",
  "prompt_index",
)


def record_shapes(cfg, fmt: str, needs_ref: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{batch field: (per-record shape, dtype)} of a run's records in format `fmt`, from the config
  alone (an ahead-of-time plan, align_jax/plan.py): L = data.max_len tokens per sequence, K from
  the format (pairs and mismatched binary examples 2, lists data.list_size, negatives
  1 + data.num_samples), C = testbed.categories; prompts: P = data.prompt_len tokens."""
  d = cfg.data
  if fmt == "prompts":
    return {"prompt_P": ((d.prompt_len,), np.int32), "prompt_index": ((), np.int32)}
  K = {"corpus": 1, "pairs": 2, "lists": d.list_size, "binary": 2, "ternary": 2}.get(fmt)
  K = {"distribution": 1, "negatives": 1 + d.num_samples}.get(fmt, K)
  if K is None:
    raise ConfigError(f"record format {fmt!r} is unknown")
  f32 = np.float32
  shapes = {"tokens_KxL": ((K, d.max_len), np.int32), "loss_mask_KxL": ((K, d.max_len), f32)}
  if fmt != "corpus":
    shapes |= {"score_K": ((K,), f32), "response_mask_K": ((K,), f32)}
  shapes |= {
    "binary": {"desirable": ((), f32)},
    "ternary": {"is_tie": ((), f32)},
    "distribution": {"label_dist_C": ((cfg.testbed.categories,), f32)},
  }.get(fmt, {})
  if d.udm:
    shapes["udm_weight"] = ((), f32)
  if needs_ref and d.precompute_ref:
    shapes["ref_logp_K"] = ((K,), f32)
  return shapes


def read_file(cfg, fmt: str, vocab_size: int) -> tuple[dict, dict, tokenize.Text | None] | None:
  """(records, counts, text format) of a file source in record format `fmt`, read before any
  model work (bad data fails fast); None for the testbed."""
  d = cfg.data
  if d.source == "testbed":
    return None
  if (d.chat_template or d.system_prompt) and not d.tokenizer:
    raise ConfigError("data.chat_template and data.system_prompt format text: set data.tokenizer")
  text = (
    tokenize.Text(tokenize.load(d.tokenizer), d.chat_template, d.system_prompt)
    if d.tokenizer
    else None
  )
  if fmt == "prompts":  # On-policy from prompt-only records (align_jax/data/prompts.py).
    if not cfg.reward_model:
      raise ConfigError(
        f"objective {cfg.objective!r} on data.source={d.source!r} needs "
        "reward_model (a reward-model run's workdir): only the testbed has a rule "
        "reward"
      )
    return (
      *prompts.read(
        d.source, prompt_len=d.prompt_len, text=text, limit=d.num_examples, vocab_size=vocab_size
      ),
      text,
    )
  if fmt not in preference.FORMATS:
    raise ConfigError(
      f"objective {cfg.objective!r} trains on {fmt!r} records, which only the "
      "testbed provides; set data.source=testbed"
    )
  return (
    *preference.read(
      d.source,
      fmt,
      max_len=d.max_len,
      list_size=d.list_size if fmt == "lists" else 0,
      vocab_size=vocab_size,
      text=text,
    ),
    text,
  )


def sampling_config(cfg, file_data) -> sampling.SamplingConfig:
  """cfg.sampling; with text data and sampling.eos_id = -1, responses stop at the chat template's
  end-of-turn token (else the tokenizer's EOS, if it has one)."""
  settings = cfg.sampling.to_dict()
  text = file_data[2] if file_data else None
  if settings["eos_id"] < 0 and text is not None and text.stop_id is not None:
    settings["eos_id"] = text.stop_id
  return sampling.SamplingConfig(**settings)


def assemble(
  cfg, fmt: str, *, needs_ref: bool, tb, base_logp_XxY, file_data, model, mesh, workdir: str
) -> tuple[dict, dict]:
  """(record arrays, data counts) of the run: its records in format `fmt`, with self-samples,
  UDM weights and precomputed reference log-probs where the config asks for them. `model` is the
  run's `models.loading.RunModel` (its graphdef and frozen reference)."""
  d, graphdef, ref_params = cfg.data, model.graphdef, model.ref_params
  records, counts = (
    _testbed(cfg, fmt, tb, base_logp_XxY)
    if tb is not None
    else _file(cfg, fmt, file_data, graphdef, ref_params, mesh)
  )
  if d.udm:  # BCO's underlying-distribution matching, from the reference's embeddings.
    embed_VxD = multihost_utils.process_allgather(ref_params["embed_VxD"], tiled=True)
    records["udm_weight"] = udm.density_ratio_weights(
      records["tokens_KxL"],
      records["loss_mask_KxL"],
      records["desirable"],
      np.asarray(embed_VxD),
      per_class=d.udm_per_class,
      seed=cfg.seed,
      min_ratio=d.udm_min_ratio,
      max_ratio=d.udm_max_ratio,
    )
    counts["udm_mean_weight"] = float(records["udm_weight"][records["desirable"] == 0].mean())
  if needs_ref and d.precompute_ref:
    records["ref_logp_K"], cached = reference.ref_logps(
      records,
      graphdef=graphdef,
      ref_params=ref_params,
      mesh=mesh,
      rows_per_call=d.batch_size,
      cache_dir=os.path.join(workdir, "ref_logps"),
      key=reference.cache_key(records, cfg.model.to_dict(), _reference_id(cfg)),
    )
    counts["ref_logps_from_cache"] = int(cached)
  return records, counts


def _testbed(cfg, fmt, tb, base_logp_XxY) -> tuple[dict, dict]:
  """Testbed records of format `fmt`, drawn from the base LM's exact conditional."""
  d, t = cfg.data, cfg.testbed
  base = None if base_logp_XxY is None else np.asarray(base_logp_XxY)
  T = t.bt_temperature
  make = {
    "corpus": lambda: task.corpus(tb, d.num_examples, cfg.seed),
    "pairs": lambda: task.pairs(tb, base, d.num_examples, cfg.seed, T),
    "lists": lambda: task.lists(tb, base, d.num_examples, cfg.seed, T, d.list_size),
    "binary": lambda: task.binary(tb, base, d.num_examples, cfg.seed, T),
    "ternary": lambda: task.ternary(tb, base, d.num_examples, cfg.seed, T, t.tie_alpha),
    "negatives": lambda: task.negatives(tb, base, d.num_examples, cfg.seed, d.num_samples),
    "prompts": lambda: task.prompt_records(tb, d.num_examples, cfg.seed),
    "distribution": lambda: task.distribution(
      tb, base, d.num_examples, cfg.seed, T, t.categories, t.voters
    ),
  }[fmt]
  return {k: v for k, v in make().items() if k in BATCH_FIELDS}, {}


def batches(cfg, arrays: dict):
  """The run's checkpointable iterator of this process's rows of each global batch."""
  return pipeline.batches(
    pipeline.ArraySource(arrays),
    global_batch=cfg.data.batch_size,
    total_steps=cfg.total_steps,
    seed=cfg.seed,
    shuffle=cfg.data.shuffle,
  )


def _file(cfg, fmt, file_data, graphdef, ref_params, mesh) -> tuple[dict, dict]:
  """A file source's records; negatives get the reference's own samples beside them."""
  arrays, counts, _ = file_data
  if fmt == "binary":
    arrays = preference.with_mismatched(arrays)
  if fmt == "negatives":  # The model's own samples beside each negative, drawn from π_ref.
    d = cfg.data
    arrays = reference.append_samples(
      arrays,
      graphdef=graphdef,
      ref_params=ref_params,
      mesh=mesh,
      sampling_cfg=sampling_config(cfg, file_data),
      num_samples=d.num_samples,
      rows_per_call=d.batch_size * d.num_samples,
      seed=cfg.seed,
    )
  return arrays, dict(counts)


def _reference_id(cfg) -> str:
  """What the frozen reference is, for the reference log-prob cache key."""
  if cfg.init_checkpoint == "testbed":
    return testbed_base.base_key(cfg.testbed, cfg.model)
  if cfg.init_checkpoint:
    return os.path.abspath(cfg.init_checkpoint)
  return f"random-init-seed-{cfg.seed}"
