r"""Validation on file data: a run's held-out records evaluated with the metrics TRL reports.

The held-out split is `data.eval_fraction` of the source's records (drawn with the seed, never
trained on) or the records of `data.eval_source` (align_jax/data/records.py). `make(cfg, parts)`
gives the run's `evaluate_fn(params) -> metrics`, called like the testbed's exact evaluation: at
the start (summary.json "initial"), every `eval_every` steps (metrics.jsonl, TensorBoard) and at
the end ("final"). Every name starts with "eval/"; the rest are TRL's:

Offline objectives, over the held-out records in batches of data.batch_size:
- eval/loss and eval/objective/<metric>: the objective's loss and metrics (objectives with running
  statistics, BCO's δ and f-DPG's Ẑ, report no loss: it depends on the run's state);
- the implicit reward r = β·(log π(y|x) − log π_ref(y|x)) of each response (β = loss.beta, 1
  without one; β·log π for reference-free objectives; a reward model's own reward), and
  eval/rewards/chosen, eval/rewards/rejected (means over chosen / rejected responses),
  eval/rewards/margins (their difference), eval/rewards/accuracies (share of records whose chosen
  reward is above the rejected one), eval/logps/chosen, eval/logps/rejected (mean summed log π).
  Chosen / rejected: pairs and ternary records' first / second response (ties count in no
  accuracy), a list's best / worst scored one, KTO's desirable / undesirable completions (no
  accuracy: they are unpaired), D2O's negatives (rejected only). SFT corpora and label
  distributions report the loss and objective metrics (e.g. eval/objective/nll_per_token).

On-policy objectives, on the held-out prompts, one sample each from the policy (data.sampling,
the same key at every evaluation, so evaluations differ only by the policy):
- eval/reward: the reward model's mean reward;
- eval/kl: mean of log π(y|x) − log π_ref(y|x), the KL(π ‖ π_ref) estimate;
- eval/entropy: mean of −log π(y|x), the sequence entropy estimate (log-probs at temperature 1);
- eval/completions/mean_length: mean number of generated tokens.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import logps, rewards, rollout, sharding
from align_jax.data import pipeline, records

EVAL_KEY_OFFSET = 104_729  # The on-policy evaluation key: fold_in(key(seed), this), never trained.


def make(cfg, parts):
  """The run's validation `evaluate_fn(params) -> {name: float}`, or None without held-out data.

  `parts` is train.py's assembled run (its objective, model, file data, mesh and rules)."""
  held = records.held_out(cfg, parts.objective.data, parts.file_data, parts.model, parts.mesh)
  if held is None:
    return None
  if parts.objective.data == "prompts":
    return _on_policy(cfg, parts, held)
  return _offline(cfg, parts, held)


# ---- Offline objectives -------------------------------------------------------------------------


def _chosen_rejected(fmt: str, arrays: dict) -> dict[str, np.ndarray]:
  """Per record: one-hot chosen_K and rejected_K (0 rows where there is none) and pair (1 where
  the record's chosen and rejected rewards are compared for the accuracy)."""
  n, K = arrays["tokens_KxL"].shape[:2]
  chosen, rejected, pair = np.zeros((n, K)), np.zeros((n, K)), np.zeros((n,))
  rows = np.arange(n)
  if fmt in ("pairs", "ternary"):
    chosen[:, 0], rejected[:, 1] = 1.0, 1.0
    pair[:] = 1.0 - arrays.get("is_tie", np.zeros(n))
  elif fmt == "lists":
    valid, score = arrays["response_mask_K"] > 0, arrays["score_K"]
    best = np.argmax(np.where(valid, score, -np.inf), axis=1)
    worst = np.argmin(np.where(valid, score, np.inf), axis=1)
    chosen[rows, best], rejected[rows, worst] = 1.0, 1.0
    pair[:] = score[rows, best] > score[rows, worst]
  elif fmt == "binary":
    chosen[:, 0], rejected[:, 0] = arrays["desirable"], 1.0 - arrays["desirable"]
  elif fmt == "negatives":
    rejected[:, 0] = 1.0
  return {"eval_chosen_K": chosen, "eval_rejected_K": rejected, "eval_pair": pair}


def _batches(arrays: dict, batch_size: int, mesh) -> list[dict]:
  """Global batches of `batch_size` rows (the last one padded by repeating rows, masked out by
  example_mask_B), keyed as the step's batches are."""
  n = len(next(iter(arrays.values())))
  out = []
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size) % n
    batch = {pipeline.batch_key(k): np.asarray(v)[index] for k, v in arrays.items()}
    batch["example_mask_B"] = (np.arange(start, start + batch_size) < n).astype(np.float32)
    out.append(
      {
        k: sharding.global_array(v, sharding.batch_sharding(mesh, np.ndim(v)))
        for k, v in batch.items()
      }
    )
  return out


def _offline_sums(params, batch, ref_params, *, graphdef, objective, loss_cfg, beta, merge, loss):
  """{name: (Σ value · weight, Σ weight)} over one batch (module docstring)."""
  policy = params if merge is None else merge(ref_params, params)
  tokens, mask = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"]
  w_B = batch["example_mask_B"]
  if objective.scores:
    out = logps.sequence_scores(graphdef, policy, tokens, mask)
    logp_BxK, reward_BxK = None, objective.reward(out)
  else:
    out = logp_BxK = logps.sequence_logps(graphdef, policy, tokens, mask)
    if objective.needs_ref:
      batch = {**batch, "ref_logp_BxK": logps.sequence_logps(graphdef, ref_params, tokens, mask)}
      reward_BxK = beta * (logp_BxK - batch["ref_logp_BxK"])
    else:
      reward_BxK = beta * logp_BxK
  sums = {}
  if loss:
    fields = {k: v for k, v in batch.items() if not k.startswith("eval_")}
    loss_B, metrics_B, _ = objective.fn(out, fields, {}, **loss_cfg)
    sums["eval/loss"] = (jnp.sum(loss_B * w_B), jnp.sum(w_B))
    for k, v in metrics_B.items():
      sums[f"eval/objective/{k}"] = (jnp.sum(v * w_B), jnp.sum(w_B))
  chosen_BxK = batch["eval_chosen_BxK"] * w_B[:, None]
  rejected_BxK = batch["eval_rejected_BxK"] * w_B[:, None]
  for name, pick_BxK in (("chosen", chosen_BxK), ("rejected", rejected_BxK)):
    sums[f"eval/rewards/{name}"] = (jnp.sum(pick_BxK * reward_BxK), jnp.sum(pick_BxK))
    if logp_BxK is not None:
      sums[f"eval/logps/{name}"] = (jnp.sum(pick_BxK * logp_BxK), jnp.sum(pick_BxK))
  pair_B = batch["eval_pair_B"] * w_B
  wins_B = jnp.sum(chosen_BxK * reward_BxK, -1) > jnp.sum(rejected_BxK * reward_BxK, -1)
  sums["eval/rewards/accuracies"] = (jnp.sum(pair_B * wins_B), jnp.sum(pair_B))
  return sums


def _offline(cfg, parts, held: dict):
  objective, model, mesh = parts.objective, parts.model, parts.mesh
  arrays = {**held, **_chosen_rejected(objective.data, held)}
  batches = _batches(arrays, cfg.data.batch_size, mesh)
  loss_cfg = cfg.loss.to_dict()
  no_stats = not objective.init_stats(len(next(iter(held.values()))), loss_cfg)
  fn = jax.jit(
    functools.partial(
      _offline_sums,
      graphdef=model.graphdef,
      objective=objective,
      loss_cfg=loss_cfg,
      beta=float(loss_cfg.get("beta", 1.0)),
      merge=model.merge,
      loss=no_stats and objective.granularity == "sequence",
    ),
    out_shardings=sharding.replicated(mesh),
  )

  def evaluate(params) -> dict:
    totals = {}
    for batch in batches:
      for k, (num, den) in jax.device_get(fn(params, batch, model.ref_params)).items():
        a, b = totals.get(k, (0.0, 0.0))
        totals[k] = (a + float(num), b + float(den))
    out = {k: num / den for k, (num, den) in totals.items() if den > 0}
    if "eval/rewards/chosen" in out and "eval/rewards/rejected" in out:
      out["eval/rewards/margins"] = out["eval/rewards/chosen"] - out["eval/rewards/rejected"]
    return out

  return evaluate


# ---- On-policy objectives -----------------------------------------------------------------------


def _on_policy_sums(
  params, prompts_BxP, w_B, ref_params, reward_params, key, *, roll, graphdef, merge
):
  """{name: (Σ value · weight, Σ weight)} of one sample per prompt (module docstring)."""
  state = types.SimpleNamespace(params=params, rng=jax.random.key_data(key), step=0, anchor={})
  index_B = jnp.zeros(prompts_BxP.shape[:1], jnp.int32)
  batch = roll(state, prompts_BxP, index_B, ref_params, reward_params)
  tokens, mask = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"]
  policy = params if merge is None else merge(ref_params, params)
  logp_B = logps.sequence_logps(graphdef, policy, tokens, mask)[:, 0]
  values = {
    "eval/reward": batch["reward_BxK"][:, 0],
    "eval/kl": logp_B - batch["ref_logp_BxK"][:, 0],
    "eval/entropy": -logp_B,
    "eval/completions/mean_length": jnp.sum(mask[:, 0], -1),
  }
  return {k: (jnp.sum(v * w_B), jnp.sum(w_B)) for k, v in values.items()}


def _on_policy(cfg, parts, held: dict):
  model, mesh = parts.model, parts.mesh
  reward_fn, reward_params, _ = rewards.learned(cfg.reward_model, mesh, parts.table)
  sampling_cfg = records.sampling_config(cfg, parts.file_data)
  roll = functools.partial(
    rollout.rollout,
    graphdef=model.graphdef,
    sampling_cfg=sampling_cfg,
    num_policy=1,
    num_anchor=0,
    anchor_is_ref=True,
    score_fn=rewards.file_scorer(cfg, reward_fn),
    merge=model.merge,
  )
  fn = jax.jit(
    functools.partial(_on_policy_sums, roll=roll, graphdef=model.graphdef, merge=model.merge),
    out_shardings=sharding.replicated(mesh),
  )
  batches = _batches({"prompt_P": held["prompt_P"]}, cfg.data.batch_size, mesh)
  key = jax.random.fold_in(jax.random.key(cfg.seed), EVAL_KEY_OFFSET)

  def evaluate(params) -> dict:
    totals = {}
    for i, batch in enumerate(batches):
      sums = fn(
        params,
        batch["prompt_BxP"],
        batch["example_mask_B"],
        model.ref_params,
        reward_params,
        jax.random.fold_in(key, i),
      )
      for k, (num, den) in jax.device_get(sums).items():
        a, b = totals.get(k, (0.0, 0.0))
        totals[k] = (a + float(num), b + float(den))
    return {k: num / den for k, (num, den) in totals.items() if den > 0}

  return evaluate
