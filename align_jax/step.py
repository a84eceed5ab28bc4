"""The train state and the one update step. Pure; jitted once per run in train.py."""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from align_jax import objectives as objectives_lib
from align_jax.logps import agreement, next_token_logprobs_BxK, sequence_logps, sequence_scores
from align_jax.logps import PACKED, sum_tokens, token_logps_BxK


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far.
  params: dict  # Trainable policy parameters.
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] raw key; the step folds in `step`.
  anchor: dict  # Moving anchor (J-BOND EMA / iterative BOND); {} when unused.
  stats: dict  # Objective running statistics (Ẑ, baselines, ...); {} when unused.
  # The batch of the current rollout when one rollout feeds several updates (train.py); {} else.
  rollout: dict = dataclasses.field(default_factory=dict)


def learning_rate(optim) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then constant or cosine decay to 0 at `total_steps`."""
  warmup = optax.linear_schedule(0.0, optim.lr, optim.warmup_steps) if optim.warmup_steps else None
  decay_steps = max(optim.total_steps - optim.warmup_steps, 1)
  if optim.schedule == "constant":
    main = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(optim.lr, decay_steps)
  else:
    raise ValueError(f"optim.schedule {optim.schedule!r} is unknown; use constant or cosine")
  if warmup is None:
    return main
  return optax.join_schedules([warmup, main], [optim.warmup_steps])


def optimizer(optim) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; `optim` needs lr, schedule, warmup_steps, total_steps, ..."""
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  parts.append(
    optax.adamw(
      learning_rate(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
    )
  )
  return optax.chain(*parts)


def init_state(
  params: dict,
  tx: optax.GradientTransformation,
  seed: int,
  stats: dict | None = None,
  moving_anchor: bool = False,
) -> TrainState:
  """Step 0; `stats` are the objective's initial running statistics ({} for most). A moving
  anchor starts as a copy of the policy."""
  anchor = {"params": jax.tree.map(jnp.copy, params)} if moving_anchor else {}
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(seed)),
    anchor=anchor,
    stats=stats or {},
  )


def _all_finite(tree) -> jax.Array:
  """1.0 when every float in `tree` is finite, else 0.0: one reduction per leaf, no host sync."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])).astype(jnp.float32)


def _weighted_mean(x_B: jax.Array, w_B: jax.Array) -> jax.Array:
  return jnp.sum(x_B.astype(jnp.float32) * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)


def train_step(
  state: TrainState,
  batch: dict,
  ref_params: dict | None,
  *,
  graphdef,
  objective: objectives_lib.Objective,
  loss_cfg: dict,
  tx: optax.GradientTransformation,
  lr_fn: optax.Schedule,
  move_anchor=None,
  merge=None,
  shared_prompt: int = 0,
  log_steps: tuple[int, int] | None = None,
):
  """One optimizer update: (state, batch, frozen reference) -> (state, scalar metrics).

  Batch fields: tokens_BxKxL (int32), loss_mask_BxKxL (1 where a token is scored),
  example_mask_B (0 for padding prompts), and optionally precomputed ref_logp_BxK.
  `merge(ref_params, state.params)` gives the policy's params when the trainable params are not
  the whole model (LoRA: ref_params are the frozen base, the reference with adapters off).

  The objective's granularity picks what its first argument is: "sequence", the policy's sequence
  log-probs [B, K]; "token", its token log-probs logp_BxKxT (T = L - 1, `logps.token_logps_BxK`),
  or "distribution", the next-token distributions logp_BxKxTxV at those positions;
  with the step adding token_mask_BxKxT (float32, loss_mask_BxKxL[..., 1:]) to the batch and,
  when the objective needs the reference, ref_token_logp_BxKxT next to ref_logp_BxK (their sum
  under the mask, unless the batch has it).

  On a rollout's batch (it carries the sampler's sample_token_logp_BxKxT) the metrics add
  `agreement/*` (`logps.agreement`) between the trainer's token log-probs of the policy's samples
  and the sampler's: their numerical agreement on the first update of a rollout, the policy's
  movement since on later ones.

  `log_steps` = (log_every, total_steps): `update_norm` and `param_norm` (two more passes over
  the parameters) are computed on the steps the metric writer logs, multiples of log_every and
  the last, and are NaN on the others; None: every step. `grad_norm` and `finite_state` are
  every step's (the writer stops on a non-finite one; checkpoints hold finite states only).

  `shared_prompt` > 0 (a lower bound on every example's prompt length) scores the K responses of
  an example in one shared-prompt row, for the policy and the reference (`logps.token_logps_BxK`):
  the same log-probs, less work. A packed batch (`logps.PACKED` fields beside the records' own
  layout, align_jax/data/packing.py) runs the model on its packed rows instead, for both.
  """
  tokens_BxKxL, mask_BxKxL = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"]
  packed = {k: batch[k] for k in PACKED if k in batch} or None  # Records packed in rows.
  if packed and (objective.scores or objective.granularity == "distribution"):
    raise ValueError(
      "packed rows give log-probs; a reward model's scores or whole next-token distributions "
      "need the records' own rows"
    )
  if objective.granularity != "sequence":  # Token log-probs [B, K, T] or distributions.
    if objective.scores:
      raise ValueError("a reward model's objective takes its scores [B, K, O], not token log-probs")
    batch = {**batch, "token_mask_BxKxT": mask_BxKxL[..., 1:].astype(jnp.float32)}
    if objective.needs_ref and "ref_token_logp_BxKxT" not in batch:
      ref_BxKxT, ref_mask_BxKxT = jax.lax.stop_gradient(
        token_logps_BxK(graphdef, ref_params, tokens_BxKxL, mask_BxKxL, shared_prompt, packed)
      )
      batch["ref_token_logp_BxKxT"] = ref_BxKxT
      batch.setdefault("ref_logp_BxK", sum_tokens(ref_BxKxT, ref_mask_BxKxT))  # Keep a cached one.
  else:
    if objective.needs_ref and "ref_logp_BxK" not in batch:
      ref_logp_BxK = jax.lax.stop_gradient(
        sequence_logps(graphdef, ref_params, tokens_BxKxL, mask_BxKxL, shared_prompt, packed)
      )
      batch = {**batch, "ref_logp_BxK": ref_logp_BxK}
  w_B = batch["example_mask_B"].astype(jnp.float32)
  sampled = "sample_token_logp_BxKxT" in batch and not objective.scores  # A rollout's batch.

  def loss_fn(params):
    params = params if merge is None else merge(ref_params, params)
    if objective.granularity == "distribution":  # The token log-probs are entries of these.
      out = next_token_logprobs_BxK(graphdef, params, tokens_BxKxL)
      picked_BxKxTx1 = jnp.take_along_axis(out, tokens_BxKxL[..., 1:, None], axis=-1)
      token_logp_BxKxT = picked_BxKxTx1[..., 0]
    elif objective.granularity == "token" or sampled:  # sequence_logps is their masked sum.
      token_logp_BxKxT, token_mask_BxKxT = token_logps_BxK(
        graphdef, params, tokens_BxKxL, mask_BxKxL, shared_prompt, packed
      )
      out = token_logp_BxKxT
      if objective.granularity == "sequence":
        out = sum_tokens(token_logp_BxKxT, token_mask_BxKxT)
    elif objective.scores:  # Reward models: head outputs [B, K, O].
      out = sequence_scores(graphdef, params, tokens_BxKxL, mask_BxKxL)
    else:  # Sequence log-probs [B, K].
      out = sequence_logps(graphdef, params, tokens_BxKxL, mask_BxKxL, shared_prompt, packed)
    loss_B, metrics_B, stats = objective.fn(out, batch, state.stats, **loss_cfg)
    metrics = {f"objective/{k}": _weighted_mean(v, w_B) for k, v in metrics_B.items()}
    if sampled:  # The policy's samples of real prompts.
      policy_BxK = batch.get("from_policy_BxK", jnp.ones(w_B.shape + tokens_BxKxL.shape[1:2]))
      on_BxKxT = mask_BxKxL[..., 1:] * (policy_BxK * w_B[:, None])[..., None]
      agree = agreement(token_logp_BxKxT, batch["sample_token_logp_BxKxT"], on_BxKxT)
      metrics |= {f"agreement/{k}": v for k, v in agree.items()}
    if packed:  # What the packed rows hold.
      segment_RxS = packed["pack_segment_BxS"]
      metrics["data/padding_packed"] = jnp.mean((segment_RxS == 0).astype(jnp.float32))
      metrics["data/records_per_row"] = jnp.sum(w_B) / segment_RxS.shape[0]
    return _weighted_mean(loss_B, w_B), (metrics, stats)

  (loss, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  anchor = state.anchor
  if move_anchor is not None:  # After the update, so the anchor sees this step's policy.
    anchor = {"params": move_anchor(state.anchor["params"], params, state.step + 1, stats)}
  new_state = dataclasses.replace(
    state, step=state.step + 1, params=params, opt_state=opt_state, anchor=anchor, stats=stats
  )

  def norms():
    return optax.tree.norm(updates), optax.tree.norm(state.params)

  if log_steps is None:
    update_norm, param_norm = norms()
  else:
    every, last = log_steps
    at = state.step + 1
    nan = jnp.full((), jnp.nan, jnp.float32)
    update_norm, param_norm = jax.lax.cond(
      (at % every == 0) | (at == last),
      lambda: jax.tree.map(jnp.float32, norms()),
      lambda: (nan, nan),
    )
  return new_state, {
    "loss": loss,
    "grad_norm": optax.tree.norm(grads),
    "update_norm": update_norm,
    "param_norm": param_norm,
    "lr": lr_fn(state.step),
    "finite_state": _all_finite((params, opt_state)),  # Checked before any checkpoint is saved.
    **metrics,
  }
