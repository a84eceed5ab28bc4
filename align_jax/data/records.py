"""A run's records: the arrays its data pipeline batches, by the objective's record format.

From the testbed (generated from the base LM's exact conditional) or from a file source
(align_jax/data/preference.py, prompts.py), then completed by what the frozen reference adds:
the model's own samples beside negatives (D2O), BCO's density-ratio weights (UDM), and reference
log-probs computed once per dataset (`data.precompute_ref`).
"""

import math
import os

import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from align_jax import sampling
from align_jax.data import corpus, packing, pipeline, preference, prompts, reference, tokenize
from align_jax.data import udm
from align_jax.errors import ConfigError
from align_jax.models import hf
from align_jax.testbed import base as testbed_base
from align_jax.testbed import target, task

# data.share_prompt=auto shares prompts of at least SHARE_MIN_PROMPT tokens whose shared row saves
# at least SHARE_MIN_SAVING of the K rows' token positions.
SHARE_MIN_PROMPT = 16
SHARE_MIN_SAVING = 0.1
HELD_OUT_SEED = 7919  # Added to the run's seed to draw data.eval_fraction's held-out records.
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


def read_file(cfg, fmt: str, vocab_size: int) -> tuple | None:
  """(records, counts, text format, held-out records or None) of a file source in record format
  `fmt`, read before any model work (bad data fails fast); None for the testbed.

  The held-out records (validation, align_jax/validate.py) are data.eval_source's, or a random
  data.eval_fraction of the source's (drawn with the seed; counts: records trained on,
  eval_records held out)."""
  d = cfg.data
  if d.source == "testbed":
    if d.eval_source or d.eval_fraction:
      raise ConfigError(
        "data.eval_source / data.eval_fraction hold out file records; the "
        "testbed is evaluated exactly"
      )
    return None
  if d.eval_source and d.eval_fraction:
    raise ConfigError("set one of data.eval_source and data.eval_fraction")
  if not 0.0 <= d.eval_fraction < 1.0:
    raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
  if (d.chat_template or d.system_prompt) and not d.tokenizer:
    raise ConfigError("data.chat_template and data.system_prompt format text: set data.tokenizer")
  text = (
    tokenize.Text(tokenize.load(d.tokenizer), d.chat_template, d.system_prompt)
    if d.tokenizer
    else None
  )
  if text is not None:
    check_tokenizer(text, vocab_size, cfg.init_checkpoint)
  arrays, counts = _read(cfg, fmt, d.source, vocab_size, text)
  held = None
  if d.eval_source:
    held, _ = _read(cfg, fmt, d.eval_source, vocab_size, text)
  elif d.eval_fraction:
    arrays, held = _split(arrays, d.eval_fraction, cfg.seed)
    counts["records"] = len(arrays["tokens_KxL" if fmt != "prompts" else "prompt_P"])
  if held is not None:
    counts["eval_records"] = len(next(iter(held.values())))
  return arrays, counts, text, held


def _read(cfg, fmt, source, vocab_size, text) -> tuple[dict, dict]:
  """(records, counts) of one source in format `fmt`."""
  d = cfg.data
  if fmt == "prompts":  # On-policy from prompt-only records (align_jax/data/prompts.py).
    if not cfg.reward_model:
      raise ConfigError(
        f"objective {cfg.objective!r} on data.source={d.source!r} needs "
        "reward_model (a reward-model run's workdir): only the testbed has a rule "
        "reward"
      )
    return prompts.read(
      source, prompt_len=d.prompt_len, text=text, limit=d.num_examples, vocab_size=vocab_size
    )
  if fmt == "corpus":  # SFT from text, conversations or prompt-completion records.
    return corpus.read(source, max_len=d.max_len, vocab_size=vocab_size, text=text)
  if fmt not in preference.FORMATS:
    raise ConfigError(
      f"objective {cfg.objective!r} trains on {fmt!r} records, which only the "
      "testbed provides; set data.source=testbed"
    )
  return preference.read(
    source,
    fmt,
    max_len=d.max_len,
    list_size=d.list_size if fmt == "lists" else 0,
    vocab_size=vocab_size,
    text=text,
  )


def _split(arrays: dict, fraction: float, seed: int) -> tuple[dict, dict]:
  """(kept, held out): round(fraction · N) records (at least 1, at most N − 1) drawn at random
  with the seed, each part in source order; prompt indices renumbered."""
  n = len(next(iter(arrays.values())))
  k = min(max(round(fraction * n), 1), n - 1)
  if k < 1:
    raise ConfigError(f"data.eval_fraction={fraction}: {n} record(s) cannot be split")
  held_out = np.zeros(n, bool)
  held_out[np.random.default_rng(seed + HELD_OUT_SEED).permutation(n)[:k]] = True
  parts = tuple({key: v[mask] for key, v in arrays.items()} for mask in (~held_out, held_out))
  for part in parts:
    if "prompt_index" in part:
      part["prompt_index"] = np.arange(len(part["prompt_index"]), dtype=np.int32)
  return parts


def held_out(cfg, fmt: str, file_data, model, mesh) -> dict | None:
  """The held-out records of a file source made ready as training records are (KTO's mismatched
  completions, D2O's own samples), or None."""
  if not file_data or file_data[3] is None:
    return None
  arrays, text = file_data[3], file_data[2]
  return _file(cfg, fmt, (arrays, {}, text, None), model.graphdef, model.ref_params, mesh)[0]


def check_tokenizer(text: tokenize.Text, vocab_size: int, init_checkpoint: str) -> None:
  """The tokenizer against the model: its ids must fit the model's vocabulary (ConfigError), and
  its BOS and end of turn should be the ones a Hugging Face init_checkpoint generates with
  (generation_config.json; a warning, one line each)."""
  tok = text.tokenizer
  if tok.vocab_size > vocab_size:
    raise ConfigError(
      f"data.tokenizer {tok.path!r} has {tok.vocab_size} tokens, more than the model's "
      f"vocab_size={vocab_size}: pick the model's own tokenizer"
    )
  if not hf.is_hf_dir(init_checkpoint):
    return
  ids = hf.generation_token_ids(init_checkpoint)
  where = f"init_checkpoint {init_checkpoint!r}'s generation_config.json"
  if tok.bos_id is not None and ids["bos"] and tok.bos_id not in ids["bos"]:
    logging.warning(
      "data.tokenizer's BOS %r (id %d) is not %s bos_token_id %s",
      tok.bos_token,
      tok.bos_id,
      where,
      ids["bos"],
    )
  if text.stop_id is not None and ids["eos"] and text.stop_id not in ids["eos"]:
    logging.warning(
      "data.tokenizer's end of a response (id %d) is not among %s eos_token_id %s: the "
      "exported model will not stop where training stopped",
      text.stop_id,
      where,
      ids["eos"],
    )


def shared_prompt(cfg, objective, records: dict) -> int:
  """The step's `shared_prompt` (`logps.shared_token_logps_BxK`): a lower bound on every
  example's prompt length when its K > 1 responses are scored in one shared-prompt row
  (data.share_prompt), else 0.

  On-policy batches are [prompt P | response] rows: P. Fixed records: the shortest prompt (the
  positions before a record's first scored token), provided each record's K rows agree there
  (else one logged line, and rows unshared). Reward models' scores and whole next-token
  distributions stay unshared. `auto` shares where it saves work (`prompt_shared`).
  """
  if objective.scores or objective.granularity == "distribution":
    return 0
  if "prompt_P" in records:  # The rollout's rows: each prompt with its samples.
    samples = cfg.rollout.num_policy + cfg.rollout.num_anchor
    P = records["prompt_P"].shape[-1]
    return prompt_shared(cfg, P, samples, P + cfg.sampling.max_new_tokens)
  tokens_NxKxL, mask_NxKxL = records["tokens_KxL"], records["loss_mask_KxL"] > 0
  if tokens_NxKxL.shape[1] < 2:
    return 0
  scored_NxK = mask_NxKxL.any(axis=-1)
  start_N = np.argmax(mask_NxKxL.any(axis=1), axis=-1)  # A record's first scored position.
  before_NxL = np.arange(tokens_NxKxL.shape[-1]) < start_N[:, None]
  differ_NxK = ((tokens_NxKxL != tokens_NxKxL[:, :1]) & before_NxL[:, None]).any(axis=-1)
  bad = np.flatnonzero((differ_NxK & scored_NxK).any(axis=-1))
  if len(bad):
    logging.info(
      "data.share_prompt: record %d's %d responses follow different prompts; rows unshared",
      bad[0],
      tokens_NxKxL.shape[1],
    )
    return 0
  real_N = scored_NxK.any(axis=-1)
  shortest = int(start_N[real_N].min()) if real_N.any() else 0
  return prompt_shared(cfg, shortest, tokens_NxKxL.shape[1], tokens_NxKxL.shape[-1])


def prompt_shared(cfg, prompt_len: int, rows: int, length: int) -> int:
  """`prompt_len` if data.share_prompt shares a prompt that long among `rows` rows of `length`
  tokens, else 0. on: any prompt of K ≥ 2 rows. auto: where it saves work, a prompt of at least
  SHARE_MIN_PROMPT tokens whose shared row is at least SHARE_MIN_SAVING shorter than the rows,
  (K − 1)·p of K·L positions. Below that the saving is smaller than the shared row's own costs:
  its gathers, and a larger program to compile (+25 % start-up for the testbed's 3-token
  prompts); DPO pairs of 16-token prompts in 320-token rows (2.5 % saved) ran 8 % slower shared."""
  mode = cfg.data.share_prompt
  if mode == "off" or rows < 2 or prompt_len < 1:
    return 0
  saving = (rows - 1) * prompt_len / (rows * length)
  enough = prompt_len >= SHARE_MIN_PROMPT and saving >= SHARE_MIN_SAVING
  return prompt_len if mode == "on" or enough else 0


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
    "corpus": lambda: _corpus(cfg, tb, base),
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


def _corpus(cfg, tb, chain_XxY) -> dict:
  """Testbed SFT records: chain samples (pretraining), or draws from the run's target (e.g.
  target.kind = bon: Best-of-N samples of the chain, rejection-sampling fine-tuning)."""
  n = cfg.data.num_examples
  if cfg.target.kind in ("", "chain"):
    return task.corpus(tb, n, cfg.seed)
  logp_XxY = target.target_logp(cfg, tb, chain_XxY, target.potential(cfg, tb, chain_XxY))
  return task.demonstrations(tb, logp_XxY, n, cfg.seed)


def batches(cfg, arrays: dict, objective, counts: dict | None = None):
  """The run's checkpointable iterator of this process's rows of each global batch: records, or
  with data.pack_len rows packed with records (align_jax/data/packing.py; the records checked
  first, and `counts` given their padding unpacked and their mean packed length)."""
  d = cfg.data
  if d.pack_len:
    shared = shared_prompt(cfg, objective, arrays) > 0
    length_N = packing.check_records(arrays, shared, d.pack_len)
    if counts is not None:
      counts["padding_unpacked"] = packing.padding_unpacked(arrays)
      counts["packed_tokens_per_record"] = float(length_N.mean())
    return packing.batches(
      pipeline.ArraySource(arrays),
      shared=shared,
      pack_len=d.pack_len,
      pack_records=d.pack_records,
      global_rows=d.batch_size,
      total_steps=cfg.total_steps,
      seed=cfg.seed,
      shuffle=d.shuffle,
    )
  return pipeline.batches(
    pipeline.ArraySource(arrays),
    global_batch=cfg.data.batch_size,
    total_steps=cfg.total_steps,
    seed=cfg.seed,
    shuffle=cfg.data.shuffle,
  )


def _file(cfg, fmt, file_data, graphdef, ref_params, mesh) -> tuple[dict, dict]:
  """A file source's records; negatives get the reference's own samples beside them."""
  arrays, counts = file_data[:2]
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
