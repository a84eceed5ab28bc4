"""A run's exact evaluation on the testbed: `make_evaluator` → params -> {"exact/...": scalar}.

Every run gets the policy metrics (`exact.policy_metrics`: KL to the reference, reward, win rate,
entropy, and the divergences to the run's target when it has one) and the expected Distinct-n.
Each paper's extra metrics are chosen by what the run is — its target and its data format —
through the table `EXTRAS` below, not by the objective's name. A reward model (a scoring objective)
is evaluated by its held-out pair accuracy instead.

The enumeration runs once per call over every (prompt, response) of the testbed, jitted; the
reference, target and reward tables are arguments of the jitted function (XLA does not fold them).
"""

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import logps, sharding
from align_jax.testbed import bon, exact, language, target, task

HELD_OUT_SEED = 7919  # Added to the run's seed: held-out pairs are never the training records.


@dataclasses.dataclass(frozen=True)
class Tables:
  """What the extra metrics read besides their arguments (the policy's log-probs logp_XxY and the
  jitted function's tables ref_XxY, target_XxY, reward_XxY)."""

  tb: task.Testbed
  cfg: object
  ref_XxY: jax.Array  # The evaluation reference (the starting policy).
  target_XxY: jax.Array | None  # The run's target distribution, if it has one.
  held_out: tuple | None  # (prompt_N, chosen_N, rejected_N) of held-out pairs.


def _bon(t: Tables, logp_XxY, ref_XxY, target_XxY, reward_XxY):
  """BOND: Jeffreys divergence to the Best-of-N target and the policy's BoN quantile."""
  w_X = t.tb.prompt_logw_X
  return {
    "exact/jeffreys_bon": bon.jeffreys(logp_XxY, target_XxY, w_X, t.cfg.testbed.target_jeffreys),
    "exact/bon_quantile": bon.bon_quantile(logp_XxY, ref_XxY, reward_XxY, w_X),
  }


def _constraint_rate(t: Tables, logp_XxY, ref_XxY, target_XxY, reward_XxY):
  """GDC's pointwise constraint: the probability that a response contains the constraint token."""
  b_Y = language.contains(t.tb.responses_YxT, t.cfg.testbed.constraint_token)
  return {
    "exact/constraint_rate": exact.expectation(
      logp_XxY, b_Y[None].astype(np.float32), t.tb.prompt_logw_X
    )
  }


def _moments(t: Tables, logp_XxY, ref_XxY, target_XxY, reward_XxY):
  """GDC's distributional constraint: the policy's moment E_π[φ]."""
  return {
    "exact/moments": exact.expectation(
      logp_XxY, target.moment_features(t.tb)[..., 0], t.tb.prompt_logw_X
    )
  }


def _harm(t: Tables, logp_XxY, ref_XxY, target_XxY, reward_XxY):
  """D2O: the probability of a harmful response (one containing h, the negatives' token)."""
  harm_Y = language.harm(t.tb.responses_YxT)
  return {
    "exact/harm": exact.expectation(logp_XxY, harm_Y[None].astype(np.float32), t.tb.prompt_logw_X)
  }


def _held_out(t: Tables, logp_XxY, ref_XxY, target_XxY, reward_XxY):
  """Ranking accuracy on held-out pairs, and AOT's first-order dominance of chosen over rejected
  log π/π_ref (and the idealized accuracy of the target, when there is one)."""
  prompt_N, chosen_N, rejected_N = t.held_out
  metrics = {"exact/ranking_accuracy": exact.ranking_accuracy(logp_XxY, *t.held_out)}
  rho_XxY = logp_XxY - ref_XxY
  metrics |= {
    f"exact/fsd_{k}": v
    for k, v in exact.dominance(rho_XxY[prompt_N, chosen_N], rho_XxY[prompt_N, rejected_N]).items()
  }
  if target_XxY is not None:
    metrics["exact/idealized_ranking_accuracy"] = exact.ranking_accuracy(target_XxY, *t.held_out)
  return metrics


def _distinct(t: Tables, logp_XxY, ref_XxY, target_XxY, reward_XxY):
  """Diversity: expected Distinct-1/2 and distinct responses among n samples per prompt."""
  return exact.expected_distinct(
    logp_XxY,
    t.tb.responses_YxT,
    t.tb.prompt_logw_X,
    num_samples=t.cfg.testbed.distinct_samples,
    vocab=language.V,
  )


# (when it applies: (cfg, data format, Tables) -> bool, the metrics), in output order.
EXTRAS: tuple[tuple[Callable, Callable], ...] = (
  (lambda cfg, data, t: bool(cfg.testbed.distinct_samples), _distinct),
  (lambda cfg, data, t: cfg.target.kind == "bon", _bon),
  (lambda cfg, data, t: cfg.target.kind in ("pointwise", "hybrid"), _constraint_rate),
  (lambda cfg, data, t: cfg.target.kind in ("distributional", "hybrid"), _moments),
  (lambda cfg, data, t: data == "negatives", _harm),
  (lambda cfg, data, t: t.held_out is not None, _held_out),
)


def held_out_pairs(cfg, tb: task.Testbed, logp_XxY) -> dict[str, np.ndarray]:
  """Bradley–Terry pairs sampled from `logp_XxY` with a seed the training data never uses."""
  return task.pairs(
    tb,
    np.asarray(logp_XxY),
    cfg.testbed.eval_pairs,
    seed=cfg.seed + HELD_OUT_SEED,
    bt_temperature=cfg.testbed.bt_temperature,
  )


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """The exact evaluation of a run and the tables other parts of the run share with it."""

  tb: task.Testbed
  evaluate: Callable | None  # params -> metrics (None when testbed.exact_eval is off).
  ref_XxY: jax.Array  # Exact log-probs of the evaluation reference.
  potential_XxY: jax.Array | None  # log P − log π_ref of the run's energy-based target, or None.


def make_evaluator(
  cfg,
  data: str,
  tb: task.Testbed,
  graphdef,
  start_params,
  mesh,
  *,
  to_model: Callable = lambda p: p,
) -> Evaluator:
  """The exact evaluation of a policy run with record format `data` starting at `start_params`.

  The reference of the metrics is the starting policy (the base LM of testbed configs; the same
  as the frozen reference where there is one), or the chain itself for pretraining (`corpus`
  records from a fresh init).
  `to_model` maps the trained parameters to the model's (LoRA: merges adapters into the base).
  """
  replicated = sharding.replicated(mesh)
  logp_fn = jax.jit(
    task.exact_logp_fn(graphdef, tb, cfg.testbed.eval_chunk), out_shardings=replicated
  )
  pretraining = data == "corpus" and not cfg.init_checkpoint
  ref_XxY = jnp.asarray(tb.chain_logp_XxY, jnp.float32) if pretraining else logp_fn(start_params)
  potential_XxY = target.potential(cfg, tb, ref_XxY)
  if not cfg.testbed.exact_eval:
    return Evaluator(tb, None, ref_XxY, potential_XxY)
  held = held_out_pairs(cfg, tb, ref_XxY) if not pretraining and cfg.testbed.eval_pairs else None
  tables = Tables(
    tb,
    cfg,
    ref_XxY,
    target.target_logp(cfg, tb, ref_XxY, potential_XxY),
    held_out=None
    if held is None
    else tuple(jnp.asarray(a) for a in (held["prompt_index_K"][:, 0], *held["response_index_K"].T)),
  )
  extras = [fn for applies, fn in EXTRAS if applies(cfg, data, tables)]

  def metrics(params, ref_XxY, target_XxY, reward_XxY):  # Arguments: not folded by XLA.
    logp_XxY = logp_fn(params)
    out = exact.policy_metrics(logp_XxY, ref_XxY, reward_XxY, tb.prompt_logw_X, target_XxY)
    for fn in extras:
      out |= fn(tables, logp_XxY, ref_XxY, target_XxY, reward_XxY)
    return out

  metrics_jit = jax.jit(metrics, out_shardings=replicated)
  reward_XxY = jnp.asarray(tb.reward_XxY)
  return Evaluator(
    tb,
    lambda p: metrics_jit(to_model(p), tables.ref_XxY, tables.target_XxY, reward_XxY),
    ref_XxY,
    potential_XxY,
  )


def make_reward_model_evaluator(
  cfg, reward: Callable, tb: task.Testbed, graphdef, mesh
) -> Evaluator:
  """params -> held-out accuracy of a reward model (`reward` maps its outputs to scalar rewards):
  on Bradley–Terry-labelled pairs and on the gold orderings. The pairs are drawn from the chain's
  conditional (no policy is involved)."""
  ref_XxY = jnp.asarray(tb.chain_logp_XxY, jnp.float32)
  if not cfg.testbed.exact_eval:
    return Evaluator(tb, None, ref_XxY, None)
  held = held_out_pairs(cfg, tb, tb.chain_logp_XxY)
  batch = sharding.batch_sharding(mesh, 3)
  tokens, mask = (sharding.global_array(held[k], batch) for k in ("tokens_KxL", "loss_mask_KxL"))
  gold_Nx2 = tb.reward_XxY[held["prompt_index_K"], held["response_index_K"]]
  gold_sign_N = jnp.asarray(np.sign(gold_Nx2[:, 0] - gold_Nx2[:, 1]), jnp.float32)

  def metrics(params):
    reward_Nx2 = reward(logps.sequence_scores(graphdef, params, tokens, mask))
    diff_N = reward_Nx2[:, 0] - reward_Nx2[:, 1]
    gold_ok_N = jnp.where(gold_sign_N > 0, diff_N > 0, diff_N < 0)
    return {
      "exact/pair_accuracy": jnp.mean(diff_N > 0),
      "exact/gold_pair_accuracy": jnp.sum(jnp.where(gold_sign_N != 0, gold_ok_N, False))
      / jnp.maximum(jnp.sum(gold_sign_N != 0), 1.0),
    }

  return Evaluator(tb, jax.jit(metrics, out_shardings=sharding.replicated(mesh)), ref_XxY, None)


def initial_metrics(workdir: str, evaluate_fn, params, *, write: bool) -> dict | None:
  """Exact metrics of the starting policy `params`, stored in <workdir>/initial_eval.json so that
  a resumed run (params None) reports the same ones."""
  path = os.path.join(workdir, "initial_eval.json")
  if evaluate_fn is None:
    return None
  if params is None and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  initial = {k: float(v) for k, v in jax.device_get(evaluate_fn(params)).items()}
  if write:
    with open(path, "w") as f:
      json.dump(initial, f, indent=1)
  return initial
