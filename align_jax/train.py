"""`run(config, workdir)`: mesh, model, data, state, resume, the jitted step, the loop, evaluation.

Reads top to bottom. Resume order: a checkpoint in the workdir > `init_checkpoint` > fresh init.
"""

import dataclasses
import fcntl
import functools
import json
import os
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from align_jax import (checkpoint, logps, models, objectives, preemption, rollout, sampling,
                       sharding, step)
from align_jax.data import pipeline, preference, prompts, reference, tokenize, udm
from align_jax.metrics import MetricWriter
from align_jax.models import hf
from align_jax.models import lora
from align_jax import targets
from align_jax.objectives import bond
from align_jax.testbed import exact, language, task

# Record fields that become batch fields (others, e.g. testbed indices, stay on the host).
BATCH_FIELDS = ("tokens_KxL", "loss_mask_KxL", "score_K", "response_mask_K", "desirable", "is_tie",
                "label_dist_C", "ref_logp_K", "udm_weight", "prompt_P", "prompt_index")


@dataclasses.dataclass
class RunResult:
  state: step.TrainState
  summary: dict


def run(cfg, workdir: str) -> RunResult:
  """Trains `cfg` into `workdir`, resuming from the newest checkpoint there."""
  _validate(cfg)
  if hf.is_hf_dir(cfg.init_checkpoint):  # The architecture is the checkpoint's config.json.
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.model.update(hf.model_config(cfg.init_checkpoint, cfg.model.to_dict()))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=1, sort_keys=True))

  mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
  table = sharding.check_rules(cfg.rules, mesh, set(models.transformer.PARAM_AXES)
                               | set(models.transformer.ACT_AXES))
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())
  with jax.set_mesh(mesh), sharding.use_rules(table), preemption.watch():
    return _run(cfg, workdir, mesh, table, is_main)


def _validate(cfg) -> None:
  objectives.get(cfg.objective)
  if cfg.data.source != "testbed":
    preference.check_source(cfg.data.source)
  if cfg.total_steps < 1:
    raise ValueError(f"total_steps={cfg.total_steps} must be >= 1")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    if cfg[key] < 0:
      raise ValueError(f"{key}={cfg[key]} must be >= 0")
  lora.check(cfg.lora)
  if lora.enabled(cfg.lora) and objectives.get(cfg.objective).scores:
    raise ValueError(f"lora.rank={cfg.lora.rank}: objective {cfg.objective!r} trains a fresh "
                     "scoring head; LoRA adapts policies only (set lora.rank=0)")


def _run(cfg, workdir, mesh, table, is_main) -> RunResult:
  t_start = time.time()
  objective = objectives.get(cfg.objective)
  replicated = sharding.replicated(mesh)

  # ---- Model: abstract shapes, logical names -> shardings, parameters created sharded ---------
  model_cfg = models.ModelConfig(**cfg.model)
  file_data = _read_file(cfg, objective, model_cfg)
  graphdef, shapes, names = models.abstract(model_cfg)
  param_shardings = sharding.tree_shardings(names, mesh, table)
  sharding.log_param_shardings(shapes, param_shardings)
  init_fn = jax.jit(functools.partial(models.init_params, model_cfg),
                    out_shardings=param_shardings)

  def load_init_params():  # Each call returns its own buffers (the reference is never aliased).
    if not cfg.init_checkpoint:
      return init_fn(jax.random.key(cfg.seed))
    if not model_cfg.num_scores:
      return load_lm(cfg, model_cfg, param_shardings)
    # A scoring model (reward model): the language model's body, a freshly initialised head.
    lm_cfg = dataclasses.replace(model_cfg, num_scores=0)
    body = load_lm(cfg, lm_cfg, sharding.tree_shardings(models.abstract(lm_cfg)[2], mesh, table))
    head = init_fn(jax.random.key(cfg.seed))["score_DxO"]
    return {**{k: v for k, v in body.items() if k not in ("unembed_DxV",)}, "score_DxO": head}

  params = load_init_params()
  merge = None  # LoRA: (frozen base, adapters) -> the policy's params.
  if lora.enabled(cfg.lora):  # The base is frozen: what the adapters modify, and the reference.
    ref_params, merge = params, functools.partial(lora.merge, cfg=cfg.lora)
    adapter_shardings = sharding.tree_shardings(lora.names(names, cfg.lora), mesh, table)
    trainable = jax.jit(functools.partial(lora.init, shapes, names, cfg.lora),
                        out_shardings=adapter_shardings)(
                            jax.random.fold_in(jax.random.key(cfg.seed), 1))
    sharding.log_param_shardings(trainable, adapter_shardings)
  else:
    ref_params = load_init_params() if objective.needs_ref else None
    trainable = params

  # ---- Exact evaluation on the testbed ---------------------------------------------------------
  tb = task.make(cfg.testbed) if cfg.data.source == "testbed" else None
  evaluate = potential_XxY = None
  if tb is not None and objective.scores:
    # Reward-model pairs are drawn from the chain's conditional (no policy is involved).
    evaluate = _reward_model_eval(cfg, objective, tb, graphdef, mesh) if cfg.testbed.exact_eval \
        else None
    eval_ref_XxY = jnp.asarray(tb.chain_logp_XxY, jnp.float32)
  elif tb is not None:
    logp_fn = jax.jit(task.exact_logp_fn(graphdef, tb, cfg.testbed.eval_chunk),
                      out_shardings=replicated)
    # The reference of the exact metrics: the starting policy (the base LM of testbed configs;
    # the same as the frozen reference where there is one), or the chain for pretraining.
    eval_ref_XxY = (jnp.asarray(tb.chain_logp_XxY, jnp.float32) if objective.data == "corpus"
                    else logp_fn(params))
    potential_XxY = _target_potential(cfg, tb, eval_ref_XxY)  # log P − log π_ref (f-DPG targets)
    target_XxY = _target(cfg, tb, eval_ref_XxY, potential_XxY)
    held_out = _held_out_pairs(cfg, objective, tb, eval_ref_XxY)

    def exact_metrics(p, eval_ref_XxY, target_XxY, reward_XxY):  # Arguments: not folded by XLA.
      logp_XxY = logp_fn(p)
      metrics = exact.policy_metrics(logp_XxY, eval_ref_XxY, reward_XxY, tb.prompt_logw_X,
                                     target_XxY)
      if cfg.testbed.distinct_samples:  # Diversity: expected Distinct-1/2 and distinct responses.
        metrics |= exact.expected_distinct(logp_XxY, tb.responses_YxT, tb.prompt_logw_X,
                                           num_samples=cfg.testbed.distinct_samples,
                                           vocab=language.V)
      if cfg.testbed.target == "bon":
        metrics["exact/jeffreys_bon"] = bond.jeffreys(logp_XxY, target_XxY, tb.prompt_logw_X,
                                                      cfg.testbed.target_jeffreys)
        metrics["exact/bon_quantile"] = bond.bon_quantile(logp_XxY, eval_ref_XxY, reward_XxY,
                                                          tb.prompt_logw_X)
      if cfg.testbed.target in ("pointwise", "hybrid"):
        metrics["exact/constraint_rate"] = exact.expectation(
            logp_XxY, language.contains(tb.responses_YxT, cfg.testbed.constraint_token)[None]
            .astype(np.float32), tb.prompt_logw_X)
      if cfg.testbed.target in ("distributional", "hybrid"):
        metrics["exact/moments"] = exact.expectation(logp_XxY, _moment_features(tb)[..., 0],
                                                     tb.prompt_logw_X)
      if objective.data == "negatives":  # D2O's negatives are the responses containing h.
        metrics["exact/harm"] = exact.expectation(
            logp_XxY, language.harm(tb.responses_YxT)[None].astype(np.float32), tb.prompt_logw_X)
      if held_out is not None:
        metrics["exact/ranking_accuracy"] = exact.ranking_accuracy(logp_XxY, *held_out)
        prompt_N, chosen_N, rejected_N = held_out  # FSD of chosen over rejected log π/π_ref:
        rho_XxY = logp_XxY - eval_ref_XxY         # AOT's dominance diagnostics.
        metrics |= {f"exact/fsd_{k}": v for k, v in exact.dominance(
            rho_XxY[prompt_N, chosen_N], rho_XxY[prompt_N, rejected_N]).items()}
        if target_XxY is not None:
          metrics["exact/idealized_ranking_accuracy"] = exact.ranking_accuracy(target_XxY,
                                                                               *held_out)
      return metrics
    if cfg.testbed.exact_eval:
      exact_jit = jax.jit(exact_metrics, out_shardings=replicated)
      evaluate = functools.partial(exact_jit, eval_ref_XxY=eval_ref_XxY, target_XxY=target_XxY,
                                   reward_XxY=jnp.asarray(tb.reward_XxY))
  if merge is not None and evaluate is not None:  # Evaluations take the state's adapters.
    evaluate_model, merge_jit = evaluate, jax.jit(merge)

    def evaluate(adapters):
      return evaluate_model(merge_jit(ref_params, adapters))

  # ---- Data ------------------------------------------------------------------------------------
  records, data_counts = _records(cfg, objective, tb,
                                  eval_ref_XxY if tb is not None else None, file_data, graphdef,
                                  ref_params, mesh)
  if cfg.data.udm:
    if cfg.objective != "bco":
      raise ValueError(f"data.udm is BCO's density-ratio matching; objective is {cfg.objective!r}")
    embed_VxD = multihost_utils.process_allgather(ref_params["embed_VxD"], tiled=True)
    records["udm_weight"] = udm.density_ratio_weights(
        records["tokens_KxL"], records["loss_mask_KxL"], records["desirable"], np.asarray(embed_VxD),
        per_class=cfg.data.udm_per_class, seed=cfg.seed, min_ratio=cfg.data.udm_min_ratio,
        max_ratio=cfg.data.udm_max_ratio)
    data_counts["udm_mean_weight"] = float(records["udm_weight"][records["desirable"] == 0].mean())
  if objective.needs_ref and cfg.data.precompute_ref:
    records["ref_logp_K"], cached = reference.ref_logps(
        records, graphdef=graphdef, ref_params=ref_params, mesh=mesh,
        rows_per_call=cfg.data.batch_size, cache_dir=os.path.join(workdir, "ref_logps"),
        key=reference.cache_key(records, cfg.model.to_dict(), _reference_id(cfg)))
    data_counts["ref_logps_from_cache"] = int(cached)
  data_iter = pipeline.batches(
      pipeline.ArraySource(records), global_batch=cfg.data.batch_size,
      total_steps=cfg.total_steps, seed=cfg.seed, shuffle=cfg.data.shuffle)

  # ---- Train state and the one step ------------------------------------------------------------
  optim = cfg.optim.to_dict() | {"total_steps": cfg.total_steps}
  tx = step.optimizer(_Attrs(optim))
  move_anchor = step.anchor_update(cfg.rollout.anchor, ema_rate=cfg.rollout.anchor_ema,
                                   every=cfg.rollout.anchor_every)
  # Per-prompt statistics (Ẑ): one row per testbed prompt or per prompt record of a file.
  num_contexts = len(tb.prompts_XxP) if tb is not None else len(records.get("prompt_index", ()))
  stats = objective.init_stats(num_contexts, cfg.loss.to_dict())
  state = jax.jit(lambda p: step.init_state(p, tx, cfg.seed, stats,
                                            moving_anchor=move_anchor is not None))(trainable)
  state_shardings = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated,
      state)
  state = jax.device_put(state, state_shardings)
  batch_shardings = {pipeline.batch_key(k): sharding.batch_sharding(mesh, v.ndim)
                     for k, v in records.items()} | {"example_mask_B": sharding.batch_sharding(
                         mesh, 1)}
  make_batch = None
  reward_fn, reward_params, reward_shardings = _reward_model(cfg, mesh, table)
  if objective.data == "prompts":  # On-policy: the rollout turns prompts into the step's batch.
    score_fn = (_file_scorer(cfg, reward_fn) if tb is None else task.scorer(
        tb, potential_XxY, reward_fn, _training_reward(cfg, tb, eval_ref_XxY)))
    roll = functools.partial(
        rollout.rollout, graphdef=graphdef, sampling_cfg=_sampling(cfg, file_data),
        num_policy=cfg.rollout.num_policy, num_anchor=cfg.rollout.num_anchor,
        anchor_is_ref=move_anchor is None, greedy=objective.greedy, merge=merge,
        score_fn=score_fn)
    prompt_shardings = (batch_shardings["prompt_BxP"], batch_shardings["prompt_index_B"])
    shapes = jax.eval_shape(roll, state, *(jax.ShapeDtypeStruct(
        (cfg.data.batch_size, *records[k].shape[1:]), records[k].dtype)
        for k in ("prompt_P", "prompt_index")), ref_params, reward_params)
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in shapes.items()}
    make_batch = jax.jit(roll, in_shardings=(state_shardings, *prompt_shardings, param_shardings,
                                             reward_shardings), out_shardings=batch_shardings)
  train_step = jax.jit(
      functools.partial(step.train_step, graphdef=graphdef, objective=objective,
                        loss_cfg=cfg.loss.to_dict(), tx=tx, lr_fn=step.learning_rate(_Attrs(optim)),
                        move_anchor=move_anchor, merge=merge),
      in_shardings=(state_shardings, batch_shardings,
                    param_shardings if ref_params is not None else None),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0)

  # ---- Resume ----------------------------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 every=cfg.checkpoint_every or cfg.total_steps,
                                 keep=cfg.keep_checkpoints, use_async=cfg.async_checkpointing)
  start, restored = ckpt.restore_latest(checkpoint.abstract_like(state, state_shardings), data_iter)
  if start:
    state = restored
    logging.info("resumed from %s at step %d", ckpt.directory, start)
    print(f"resuming from step {start} ({ckpt.directory})", flush=True)
  initial = _initial_eval(workdir, evaluate, state.params if not start else None, is_main)

  # ---- Loop ------------------------------------------------------------------------------------
  writer = MetricWriter(workdir, total_steps=cfg.total_steps, log_every=cfg.log_every,
                        is_main=is_main, resumed_from=start)
  if data_counts and not start:
    writer.write(0, {f"data/{k}": v for k, v in data_counts.items()})
  try:
    for s in range(start + 1, cfg.total_steps + 1):
      batch = pipeline.to_global(next(data_iter), mesh)  # The one explicit host->device copy.
      with jax.transfer_guard("disallow"):  # Anything else implicit in the step is a bug.
        if make_batch is not None:
          batch = make_batch(state, batch["prompt_BxP"], batch["prompt_index_B"], ref_params,
                             reward_params)
        state, metrics = train_step(state, batch, ref_params)
      writer.submit(s, metrics)
      stop = preemption.reached(s) and s < cfg.total_steps  # SIGTERM: checkpoint, then stop.
      if evaluate is not None and cfg.eval_every and s % cfg.eval_every == 0 and s < cfg.total_steps:
        writer.write(s, _host(evaluate(state.params)))
      if stop or ckpt.should_save(s) or s == cfg.total_steps:
        writer.flush()  # Never checkpoint a state whose step produced a non-finite loss.
        ckpt.save(s, state, data_iter, force=True)
      if stop:
        raise preemption.Preempted(s, ckpt.directory)  # After `finally` has finished the save.
    writer.flush()
  finally:
    ckpt.close()
    writer.close()

  # ---- Summary ---------------------------------------------------------------------------------
  if objective.scores:  # A trained reward model, ready for --config.reward_model=<workdir>.
    checkpoint.save_params(os.path.join(workdir, "params"), state.params)
  summary = {"steps": cfg.total_steps, "wall_time_s": time.time() - t_start,
             "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
             "commit": _commit(), **{f"data/{k}": v for k, v in data_counts.items()}}
  if evaluate is not None:
    final = _host(evaluate(state.params))
    summary |= {"initial": initial, "final": final}
    if is_main:
      _print_table(initial, final)
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return RunResult(state=state, summary=summary)


# ---- Helpers (one line each of purpose) ----------------------------------------------------------

class _Attrs(dict):
  """Attribute access over a plain dict (optimizer settings with total_steps added)."""
  __getattr__ = dict.__getitem__


def load_lm(cfg, model_cfg, shardings) -> dict:
  """The language model `cfg.init_checkpoint` names: the testbed's cached base LM ("testbed"), an
  Orbax params directory or a Hugging Face directory (export reads LoRA runs' bases with it)."""
  path = (os.path.join(_testbed_base(cfg), "params") if cfg.init_checkpoint == "testbed"
          else cfg.init_checkpoint)
  if hf.is_hf_dir(path):
    return hf.load_params(path, model_cfg, shardings)
  _, shapes, _ = models.abstract(model_cfg)
  return checkpoint.load_params(path, checkpoint.abstract_like(shapes, shardings))


def _host(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _target(cfg, tb, ref_XxY, potential_XxY):
  """The run's explicit target distribution, if it has one (cfg.testbed.target)."""
  kind = cfg.testbed.target
  if kind == "chain":
    return jnp.asarray(tb.chain_logp_XxY, jnp.float32)
  if kind == "bon":  # Best-of-N of the reference, ties included (exact).
    return bond.bon_logp(ref_XxY, jnp.asarray(tb.reward_XxY), cfg.testbed.target_n)
  if kind in ("", "rlhf", "pointwise", "distributional", "hybrid"):
    return None if potential_XxY is None else exact.normalize(ref_XxY + potential_XxY)
  raise ValueError(f"testbed.target {kind!r} is unknown; use '', chain, rlhf, bon, pointwise, "
                   "distributional or hybrid")


def _target_potential(cfg, tb, ref_XxY) -> jax.Array | None:
  """log P − log π_ref of the run's energy-based target on every (prompt, response), or None.

  rlhf: r/β. pointwise: log max(b, ε) with b = the response contains testbed.constraint_token
  (GDC's hard constraint; ε > 0 smooths it). distributional: λ·φ with φ = [the response's first
  token is e or f] and λ fitted exactly (enumeration) so that E_p[φ] = testbed.moment (GDC's
  I-projection; λ shared by all prompts). hybrid: both, λ fitted on a·b.
  """
  kind, t = cfg.testbed.target, cfg.testbed
  if kind == "rlhf":
    return _training_reward(cfg, tb, ref_XxY) / t.target_beta
  potential = None
  if kind in ("pointwise", "hybrid"):
    b_XxY = np.broadcast_to(language.contains(tb.responses_YxT, t.constraint_token),
                            tb.reward_XxY.shape)
    potential = targets.pointwise(jnp.zeros(b_XxY.shape, jnp.float32), b_XxY, epsilon=t.epsilon)
  if kind in ("distributional", "hybrid"):  # λ fitted on the base a (hybrid: on a·b).
    phi_XxYx1 = _moment_features(tb)
    base_XxY = ref_XxY if potential is None else ref_XxY + potential
    lam, achieved, converged = targets.fit_lambda(
        phi_XxYx1, base_XxY, jnp.array([t.moment]), lr=1.0, tol=1e-6, max_iter=10_000,
        prompt_logw_X=jnp.asarray(tb.prompt_logw_X))
    if not bool(converged):
      raise ValueError(f"testbed.moment={t.moment}: moment matching did not converge (reached "
                       f"{float(achieved[0]):.4f})")
    potential = targets.exponential(jnp.zeros(phi_XxYx1.shape[:2], jnp.float32) if potential
                                    is None else potential, phi_XxYx1, lam)
  return potential


def _training_reward(cfg, tb, ref_XxY) -> jax.Array:
  """The reward on-policy objectives train on: the gold reward r, or with testbed.reward_transform
  = lsc its log-sigmoid-centred utility log σ(r − r_ref(x)), r_ref(x) = E_π_ref[r | x] (ALGORITHMS.md
  §5.11; the paper's r_ref statistic is unconfirmed). Exact metrics always report the gold r."""
  reward_XxY = jnp.asarray(tb.reward_XxY, jnp.float32)
  if cfg.testbed.reward_transform == "lsc":
    r_ref_X = jnp.sum(jnp.exp(ref_XxY) * reward_XxY, axis=1)
    return targets.lsc(reward_XxY, r_ref_X[:, None])
  if cfg.testbed.reward_transform:
    raise ValueError(f"testbed.reward_transform {cfg.testbed.reward_transform!r} is unknown; use "
                     "'' or lsc")
  return reward_XxY


def _moment_features(tb) -> jax.Array:
  """φ(y) = 1[y_0 ∈ moment tokens {e, f}] on every (prompt, response): [X, Y, 1]."""
  phi_Y = np.isin(tb.responses_YxT[:, 0], (4, 5)).astype(np.float32)
  return jnp.asarray(np.broadcast_to(phi_Y[None, :, None], (*tb.reward_XxY.shape, 1)))


def _read_file(cfg, objective, model_cfg) -> tuple[dict, dict, tokenize.Text | None] | None:
  """A file source's records, counts and text format, read before any model work (bad data
  fails fast)."""
  fmt, d = objective.data, cfg.data
  if d.source == "testbed":
    return None
  if (d.chat_template or d.system_prompt) and not d.tokenizer:
    raise ValueError("data.chat_template and data.system_prompt format text: set data.tokenizer")
  text = (tokenize.Text(tokenize.load(d.tokenizer), d.chat_template, d.system_prompt)
          if d.tokenizer else None)
  if fmt == "prompts":  # On-policy from prompt-only records (align_jax/data/prompts.py).
    if not cfg.reward_model:
      raise ValueError(f"objective {cfg.objective!r} on data.source={d.source!r} needs "
                       "reward_model (a reward-model run's workdir): only the testbed has a rule "
                       "reward")
    return (*prompts.read(d.source, prompt_len=d.prompt_len, text=text, limit=d.num_examples,
                          vocab_size=model_cfg.vocab_size), text)
  if fmt not in preference.FORMATS:
    raise ValueError(f"objective {cfg.objective!r} trains on {fmt!r} records, which only the "
                     "testbed provides; set data.source=testbed")
  return (*preference.read(d.source, fmt, max_len=d.max_len,
                           list_size=d.list_size if fmt == "lists" else 0,
                           vocab_size=model_cfg.vocab_size, text=text), text)


def _sampling(cfg, file_data) -> sampling.SamplingConfig:
  """cfg.sampling; with text data and sampling.eos_id = -1, responses stop at the chat template's
  end-of-turn token (else the tokenizer's EOS, if it has one)."""
  settings = cfg.sampling.to_dict()
  text = file_data[2] if file_data else None
  if settings["eos_id"] < 0 and text is not None and text.stop_id is not None:
    settings["eos_id"] = text.stop_id
  return sampling.SamplingConfig(**settings)


def _file_scorer(cfg, reward_fn):
  """score_fn of the rollout on file prompts: the learned reward r, and the target log P =
  log π_ref + r/β for testbed.target = rlhf (β = testbed.target_beta), else log π_ref."""
  if cfg.testbed.target in ("pointwise", "distributional", "hybrid") or \
      cfg.testbed.reward_transform:
    raise ValueError(f"testbed.target={cfg.testbed.target!r} / testbed.reward_transform="
                     f"{cfg.testbed.reward_transform!r} are defined on the testbed; with "
                     f"data.source={cfg.data.source!r} use target rlhf (or none) and no transform")
  beta = cfg.testbed.target_beta if cfg.testbed.target == "rlhf" else None

  def score(tokens_BxKxL, loss_mask_BxKxL, prompt_index_B, ref_logp_BxK, reward_params):
    del prompt_index_B
    reward_BxK = reward_fn(reward_params, tokens_BxKxL, loss_mask_BxKxL)
    return {"reward_BxK": reward_BxK,
            "target_logp_BxK": ref_logp_BxK if beta is None else ref_logp_BxK + reward_BxK / beta}
  return score


def _records(cfg, objective, tb, base_logp_XxY, file_data, graphdef, ref_params,
             mesh) -> tuple[dict, dict]:
  """(record arrays, data counts) for the objective's record format, from the testbed or a file."""
  fmt, d = objective.data, cfg.data
  if tb is not None:
    base = None if base_logp_XxY is None else np.asarray(base_logp_XxY)
    T = cfg.testbed.bt_temperature
    make = {
        "corpus": lambda: task.corpus(tb, d.num_examples, cfg.seed),
        "pairs": lambda: task.pairs(tb, base, d.num_examples, cfg.seed, T),
        "lists": lambda: task.lists(tb, base, d.num_examples, cfg.seed, T, d.list_size),
        "binary": lambda: task.binary(tb, base, d.num_examples, cfg.seed, T),
        "ternary": lambda: task.ternary(tb, base, d.num_examples, cfg.seed, T,
                                        cfg.testbed.tie_alpha),
        "negatives": lambda: task.negatives(tb, base, d.num_examples, cfg.seed, d.num_samples),
        "prompts": lambda: task.prompt_records(tb, d.num_examples, cfg.seed),
        "distribution": lambda: task.distribution(tb, base, d.num_examples, cfg.seed, T,
                                                  cfg.testbed.categories, cfg.testbed.voters),
    }[fmt]
    return {k: v for k, v in make().items() if k in BATCH_FIELDS}, {}
  arrays, counts, _ = file_data
  if fmt == "binary":
    arrays = preference.with_mismatched(arrays)
  if fmt == "negatives":  # The model's own samples beside each negative, drawn from π_ref.
    arrays = reference.append_samples(
        arrays, graphdef=graphdef, ref_params=ref_params, mesh=mesh,
        sampling_cfg=_sampling(cfg, file_data), num_samples=d.num_samples,
        rows_per_call=d.batch_size * d.num_samples, seed=cfg.seed)
  return arrays, counts


def _reward_model(cfg, mesh, table):
  """(reward_fn, params, shardings) of the learned reward model named by cfg.reward_model, or
  (None, None, None) for the task's own reward.

  cfg.reward_model is the workdir of a reward-model run (configs/bt_reward.py, dprm.py): its
  config.json gives the architecture and objective, its `params` the trained parameters.
  """
  if not cfg.reward_model:
    return None, None, None
  config_path = os.path.join(cfg.reward_model, "config.json")
  if not os.path.isfile(config_path) or not os.path.isdir(os.path.join(cfg.reward_model, "params")):
    raise FileNotFoundError(f"reward_model {cfg.reward_model!r}: no finished reward-model run "
                            "there (config.json and params/)")
  with open(config_path) as f:
    rm_cfg = json.load(f)
  objective = objectives.get(rm_cfg["objective"])
  if not objective.scores:
    raise ValueError(f"reward_model {cfg.reward_model!r} was trained with {rm_cfg['objective']!r}, "
                     "which is not a reward model")
  model_cfg = models.ModelConfig(**rm_cfg["model"])
  graphdef, shapes, names = models.abstract(model_cfg)
  shardings = sharding.tree_shardings(names, mesh, table)
  params = checkpoint.load_params(os.path.join(cfg.reward_model, "params"),
                                  checkpoint.abstract_like(shapes, shardings))

  def reward_fn(reward_params, tokens_BxKxL, loss_mask_BxKxL):
    scores = logps.sequence_scores(graphdef, reward_params, tokens_BxKxL, loss_mask_BxKxL)
    return jax.lax.stop_gradient(objective.reward(scores))
  return reward_fn, params, shardings


def _reward_model_eval(cfg, objective, tb, graphdef, mesh):
  """params -> held-out accuracy of a reward model: on BT-labelled pairs and on gold orderings.

  The held-out pairs are drawn from the testbed's chain conditional (no policy is involved).
  """
  held = task.pairs(tb, tb.chain_logp_XxY, cfg.testbed.eval_pairs, seed=cfg.seed + 7919,
                    bt_temperature=cfg.testbed.bt_temperature)
  batch = sharding.batch_sharding(mesh, 3)
  tokens, mask = (sharding.global_array(held[k], batch) for k in ("tokens_KxL", "loss_mask_KxL"))
  gold_Nx2 = tb.reward_XxY[held["prompt_index_K"], held["response_index_K"]]
  gold_sign_N = jnp.asarray(np.sign(gold_Nx2[:, 0] - gold_Nx2[:, 1]), jnp.float32)

  def metrics(params):
    reward_Nx2 = objective.reward(logps.sequence_scores(graphdef, params, tokens, mask))
    diff_N = reward_Nx2[:, 0] - reward_Nx2[:, 1]
    gold_ok_N = jnp.where(gold_sign_N > 0, diff_N > 0, diff_N < 0)
    return {"exact/pair_accuracy": jnp.mean(diff_N > 0),
            "exact/gold_pair_accuracy": jnp.sum(jnp.where(gold_sign_N != 0, gold_ok_N, False))
                                        / jnp.maximum(jnp.sum(gold_sign_N != 0), 1.0)}
  return jax.jit(metrics, out_shardings=sharding.replicated(mesh))


def _reference_id(cfg) -> str:
  """What the frozen reference is, for the reference log-prob cache key."""
  if cfg.init_checkpoint == "testbed":
    return task.base_key(cfg.testbed, cfg.model)
  if cfg.init_checkpoint:
    return os.path.abspath(cfg.init_checkpoint)
  return f"random-init-seed-{cfg.seed}"


def _held_out_pairs(cfg, objective, tb, base_logp_XxY):
  """(prompt, chosen, rejected) indices of BT-labelled pairs the run never trains on, or None."""
  if objective.data == "corpus" or not cfg.testbed.eval_pairs:
    return None
  held = task.pairs(tb, np.asarray(base_logp_XxY), cfg.testbed.eval_pairs, seed=cfg.seed + 7919,
                    bt_temperature=cfg.testbed.bt_temperature)
  return tuple(jnp.asarray(a) for a in (held["prompt_index_K"][:, 0],
                                        *held["response_index_K"].T))


def _initial_eval(workdir, evaluate, params, is_main) -> dict | None:
  """Exact metrics of the starting policy, stored so a resumed run reports the same ones."""
  path = os.path.join(workdir, "initial_eval.json")
  if evaluate is None:
    return None
  if params is None and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  initial = _host(evaluate(params))
  if is_main:
    with open(path, "w") as f:
      json.dump(initial, f, indent=1)
  return initial


def _testbed_base(cfg) -> str:
  """The cached base LM for these testbed/model settings; pretrains it on first use."""
  lm = mlc.ConfigDict(cfg.model.to_dict())
  lm.num_scores = 0  # Reward models start from the language model's body.
  path = task.base_dir(cfg.testbed, lm)
  if os.path.isdir(os.path.join(path, "params")):
    return path
  if jax.process_count() == 1:  # Other runs on this host (e.g. parallel tests) wait, then reuse.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if os.path.isdir(os.path.join(path, "params")):
        return path
      return _pretrain_base(cfg, lm, path)
  return _pretrain_base(cfg, lm, path)


def _pretrain_base(cfg, lm, path) -> str:
  """Trains the base LM (configs/pretrain_testbed.py) and publishes it into the cache at `path`."""
  print(f"pretraining the testbed base LM ({cfg.testbed.pretrain_steps} steps), cached in {path}",
        flush=True)
  pcfg = task.pretrain_config(cfg.testbed, lm)
  pcfg.mesh, pcfg.rules = cfg.mesh, cfg.rules
  result = run(pcfg, path + ".run")
  staging = task.staging_dir(pcfg.testbed, pcfg.model)
  if jax.process_index() == 0 and os.path.isdir(staging):
    shutil.rmtree(staging)
  multihost_utils.sync_global_devices("testbed_base_staging")
  checkpoint.save_params(os.path.join(staging, "params"), result.state.params)
  if jax.process_index() == 0:
    task.publish_base(pcfg.testbed, pcfg.model, result.summary)
  multihost_utils.sync_global_devices("testbed_base_published")
  return path


def _print_table(initial: dict, final: dict) -> None:
  print(f"\n{'exact metric':<36}{'initial':>12}{'final':>12}")
  for k in final:
    print(f"{k:<36}{initial.get(k, float('nan')):>12.5f}{final[k]:>12.5f}")


def _commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() or None
  except OSError:
    return None
