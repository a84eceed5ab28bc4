"""On-policy rollouts: prompts -> samples of the policy and an anchor -> one [B, K] batch for the step.

For every prompt the rollout draws `num_policy` responses from the current policy and `num_anchor`
from the anchor (the frozen reference for plain BOND, the moving anchor of the train state
otherwise, e.g. f-DPG's offline proposal q) with the jitted sampler, and stacks them on K: indices [0, num_policy) are the policy's,
[num_policy, K) the anchor's. It scores every response once: sequence log-probs under the
reference (and the anchor), the log-prob of the distribution each was actually drawn from, and the
task's reward and target log P through `score_fn`. The randomness is `fold_in(state.rng, step)`,
so a resumed run draws exactly the samples it would have drawn. Pure and jit-able; batch rows
follow the sharding of `prompts_BxP`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from align_jax import sampling
from align_jax.errors import ConfigError
from align_jax.logps import next_token_logprobs_BxK, sequence_logps


def _draw(graphdef, params, prompts_BxP, count, key, cfg):
  """count samples per prompt: tokens [B, count, L], their scored mask [B, count, L], the sampler's
  log-prob of each sample [B, count] and of each of its tokens [B, count, T] (T = L - 1, the layout
  of `logps.token_logps_BxK`: position t holds token t + 1's log-prob, 0 where the mask is 0)."""
  B, P = prompts_BxP.shape
  out = sampling.sample(graphdef, params, prompts_BxP, key, cfg, samples=count)  # One prefill.
  tokens = out["tokens_RxL"].reshape(B, count, -1)
  mask = jnp.concatenate([jnp.zeros((B * count, P), jnp.float32), out["mask_RxN"]], axis=1)
  logp_RxN = out["logp_RxN"] * out["mask_RxN"]
  logp = jnp.sum(logp_RxN, axis=1).reshape(B, count)
  # Generated token n is token P + n of the row: position P - 1 + n of the [T] layout.
  token_logp = jnp.concatenate([jnp.zeros((B * count, P - 1), logp_RxN.dtype), logp_RxN], axis=1)
  return tokens, mask.reshape(B, count, -1), logp, token_logp.reshape(B, count, -1)


def rollout(
  state,
  prompts_BxP: jax.Array,
  prompt_index_B: jax.Array,
  ref_params: dict,
  reward_params: dict | None = None,
  teacher_params: dict | None = None,
  *,
  graphdef,
  sampling_cfg: sampling.SamplingConfig,
  num_policy: int,
  num_anchor: int,
  anchor_is_ref: bool,
  score_fn,
  greedy: bool = False,
  merge=None,
  informative_prompts: int = 0,
  teacher_graphdef=None,
  anchor_is_teacher: bool = False,
  teacher_distributions: bool = False,
  shared_prompt: int = 0,
) -> dict[str, jax.Array]:
  """The batch of one on-policy step.

  Args:
    state: the train state (params, anchor, rng, step).
    prompts_BxP: prompt tokens, all of length P.
    prompt_index_B: each prompt's id (its row of per-prompt statistics and tables).
    ref_params: the frozen reference.
    reward_params: a learned reward model's parameters, passed to `score_fn` (None: a rule reward).
    teacher_params: a teacher LM (distillation), or None.
    graphdef: the model's graph definition.
    sampling_cfg: how to sample (temperature 1 without truncation for unbiased estimators).
    num_policy: samples per prompt from the policy.
    num_anchor: samples per prompt from the anchor (0 for none).
    anchor_is_ref: the anchor is the frozen reference (else `state.anchor["params"]`).
    score_fn: (tokens_BxKxL, loss_mask_BxKxL, prompt_index_B, ref_logp_BxK, reward_params) ->
      {"reward_BxK", "target_logp_BxK"}: the reward and unnormalised target log P of every
      response.
    greedy: also decode each prompt greedily with the policy (ReMax's baseline) and return its
      reward greedy_reward_B and log-ratio to the reference greedy_log_ratio_B.
    merge: (ref_params, trainable) -> a model's params when the state's params and anchor are
      LoRA adapters of the frozen base `ref_params` (see step.train_step); None: whole models.
    informative_prompts: 0, or return only this many prompts: `keep_informative`'s choice.
    teacher_graphdef: the teacher's graph definition (its architecture may differ).
    anchor_is_teacher: the anchor's samples are the teacher's (GKD's mixture of samples).
    teacher_distributions: add the teacher's next-token distributions (distillation objectives).
    shared_prompt: P to score a prompt's samples in one shared-prompt row (the reference's and
      the anchor's log-probs; `logps.token_logps_BxK`), 0 for a row each.

  Returns:
    tokens_BxKxL, loss_mask_BxKxL, example_mask_B, prompt_index_B, sample_logp_BxK (log-prob of
    the distribution each response was drawn from), sample_token_logp_BxKxT (the same per token,
    T = L - 1, in the layout of `logps.token_logps_BxK`: position t is the log-prob of token
    t + 1, 0 where loss_mask_BxKxL[..., 1:] is 0; for token ratios π / π_behaviour),
    from_policy_BxK (1 for the policy's samples, 0 for the anchor's), ref_logp_BxK,
    anchor_logp_BxK (with an anchor), reward_BxK and target_logp_BxK; with
    teacher_distributions, teacher_logp_BxKxTxV (`logps.next_token_logprobs_BxK`).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  model = (lambda p: p) if merge is None else (lambda p: merge(ref_params, p))
  policy = model(state.params)
  parts = []
  if num_policy:
    parts.append(
      _draw(graphdef, policy, prompts_BxP, num_policy, jax.random.fold_in(key, 0), sampling_cfg)
    )
  anchor = ref_params if anchor_is_ref else model(state.anchor.get("params"))
  anchor_graphdef = graphdef
  if anchor_is_teacher:
    anchor, anchor_graphdef = teacher_params, teacher_graphdef
  if num_anchor:
    key_1 = jax.random.fold_in(key, 1)
    parts.append(_draw(anchor_graphdef, anchor, prompts_BxP, num_anchor, key_1, sampling_cfg))
  tokens, mask, sample_logp, sample_token_logp = (jnp.concatenate(x, axis=1) for x in zip(*parts))
  logps = functools.partial(sequence_logps, shared_prompt=shared_prompt)
  ref_logp = jax.lax.stop_gradient(logps(graphdef, ref_params, tokens, mask))
  from_policy = jnp.arange(tokens.shape[1]) < num_policy
  batch = {
    "tokens_BxKxL": tokens,
    "loss_mask_BxKxL": mask,
    "sample_logp_BxK": sample_logp,
    "sample_token_logp_BxKxT": sample_token_logp,
    "from_policy_BxK": jnp.broadcast_to(from_policy, sample_logp.shape).astype(jnp.float32),
    "ref_logp_BxK": ref_logp,
    "prompt_index_B": prompt_index_B,
    "example_mask_B": jnp.ones(prompts_BxP.shape[:1], jnp.float32),
  }
  if num_anchor:
    batch["anchor_logp_BxK"] = (
      ref_logp if anchor_is_ref else logps(anchor_graphdef, anchor, tokens, mask)
    )
  if teacher_distributions:
    batch["teacher_logp_BxKxTxV"] = jax.lax.stop_gradient(
      next_token_logprobs_BxK(teacher_graphdef, teacher_params, tokens)
    )
  batch |= score_fn(tokens, mask, prompt_index_B, ref_logp, reward_params)
  if greedy:  # Temperature 0: the first argmax at every step, no randomness.
    argmax_cfg = dataclasses.replace(sampling_cfg, temperature=0.0)
    g_tokens, g_mask, _, _ = _draw(graphdef, policy, prompts_BxP, 1, key, argmax_cfg)
    g_ref = sequence_logps(graphdef, ref_params, g_tokens, g_mask)
    g_logp = sequence_logps(graphdef, policy, g_tokens, g_mask)
    g_score = score_fn(g_tokens, g_mask, prompt_index_B, g_ref, reward_params)
    batch |= {
      "greedy_reward_B": g_score["reward_BxK"][:, 0],
      "greedy_log_ratio_B": jax.lax.stop_gradient(g_logp - g_ref)[:, 0],
    }
  return keep_informative(batch, informative_prompts) if informative_prompts else batch


def keep_informative(batch: dict, num: int) -> dict:
  """DAPO's dynamic sampling with fixed shapes: `num` of the batch's B prompts, those whose K
  rewards are not all equal first (in their order), then the others with example_mask_B = 0.

  Every field has the prompt axis first. The paper samples until the batch holds `num` prompts
  with a reward signal; here one oversampled rollout (B > num) is filtered, and a shortfall is
  padding that the step's weighted mean ignores.

  Examples:
    >>> b = keep_informative({"reward_BxK": jnp.array([[1., 1.], [0., 1.], [2., 2.], [3., 0.]]),
    ...                       "example_mask_B": jnp.ones(4)}, 3)
    >>> print(b["reward_BxK"].tolist(), b["example_mask_B"].tolist())
    [[0.0, 1.0], [3.0, 0.0], [1.0, 1.0]] [1.0, 1.0, 0.0]
  """
  reward_BxK = batch["reward_BxK"]
  if not 0 < num <= reward_BxK.shape[0]:
    raise ConfigError(
      f"rollout.informative_prompts={num} must be in [1, data.batch_size={reward_BxK.shape[0]}]"
    )
  informative_B = jnp.any(reward_BxK != reward_BxK[:, :1], axis=1)
  order = jnp.argsort(~informative_B, stable=True)[:num]
  kept = {k: v[order] for k, v in batch.items()}
  kept["example_mask_B"] = kept["example_mask_B"] * informative_B[order].astype(jnp.float32)
  return kept


# -------------------------------------------------------------------------------------------------
# The anchor the rollout samples from: how it follows the policy after each update.


def ema(anchor_params, params, eta):
  r"""Moving anchor: θ_anchor ← (1 − η)·θ_anchor + η·θ, leaf by leaf (J-BOND, eq. 18 per [3P]).

  Args:
    anchor_params: the anchor pytree.
    params: the policy pytree (same structure).
    eta: EMA rate η ∈ [0, 1] (≈ 0.02 in the paper [3P]); 1 is a hard anchor copy.

  Returns:
    The new anchor pytree.

  Examples:
    >>> print(ema({"w": jnp.array([1., 0.])}, {"w": jnp.array([3., 4.])}, 0.25)["w"])
    [1.5 1. ]
  """
  return jax.tree.map(
    lambda a, p: (1.0 - eta) * a + eta * p, anchor_params, jax.lax.stop_gradient(params)
  )


def anchor_update(mode: str, *, ema_rate: float, every: int):
  """How the anchor follows the policy after each update, (anchor, params, step, stats) -> anchor:
  None for a fixed anchor (the reference, or a teacher LM), an EMA θ_a ← (1 − η)θ_a + ηθ
  (J-BOND), a hard copy every `every` steps (iterative BOND), or f-DPG's offline proposal q ← π
  every `every` steps when the objective's statistics say the policy is closer to the target
  (stats["q_update"])."""
  if mode in ("reference", "teacher"):  # Fixed anchors.
    return None
  if mode == "ema":
    return lambda anchor, params, step, stats: ema(anchor, params, ema_rate)
  if every < 1:
    raise ConfigError(f"rollout.anchor_every={every} must be >= 1 for a {mode} anchor")
  if mode == "periodic":
    return lambda anchor, params, step, stats: jax.tree.map(
      lambda a, p: jnp.where(step % every == 0, p, a), anchor, params
    )
  if mode == "proposal":
    return lambda anchor, params, step, stats: jax.tree.map(
      lambda a, p: jnp.where((step % every == 0) & stats["q_update"], p, a), anchor, params
    )
  raise ConfigError(
    f"rollout.anchor {mode!r} is unknown; use reference, teacher, ema, periodic or proposal"
  )


# -------------------------------------------------------------------------------------------------
# Several updates per rollout: the loop's schedule.


def minibatch_rows(
  num_prompts: int, *, updates_per_batch: int, minibatches: int, on_policy: bool, shards: int
) -> int:
  """Prompts in each update's mini-batch when one rollout of `num_prompts` prompts feeds
  `updates_per_batch` passes of `minibatches` updates (mini-batch m of every pass is the m-th
  consecutive slice); a ConfigError for a schedule that cannot run, e.g. mini-batches that do not
  divide the rollout, or that the `shards` devices of the batch axes cannot split evenly."""
  if updates_per_batch < 1 or minibatches < 1:
    raise ConfigError(
      f"rollout.updates_per_batch={updates_per_batch} and rollout.minibatches={minibatches} "
      "must both be >= 1"
    )
  if updates_per_batch * minibatches > 1 and not on_policy:
    raise ConfigError(
      "rollout.updates_per_batch / rollout.minibatches reuse an on-policy rollout; this objective "
      "trains on records (set both to 1)"
    )
  if num_prompts % minibatches:
    raise ConfigError(
      f"rollout.minibatches={minibatches} does not divide the rollout's {num_prompts} prompts"
    )
  rows = num_prompts // minibatches
  if rows % shards:
    raise ConfigError(
      f"a mini-batch of {rows} prompts (rollout.minibatches={minibatches}) does not split over "
      f"the {shards} devices of the mesh's batch axes"
    )
  return rows
