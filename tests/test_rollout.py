"""The on-policy rollout: layout, log-probs of what was sampled, rewards, determinism, greedy decode."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from align_jax import config_lib, logps, models, rollout, sampling, step
from align_jax.testbed import task

CFG = models.ModelConfig(**models.preset("tiny"))


def _setup(greedy=False):
  tb_cfg = config_lib.base().testbed
  tb_cfg.response_len = 3
  tb = task.make(tb_cfg)
  graphdef, _, _ = models.abstract(CFG)
  params = models.init_params(CFG, jax.random.key(0))
  ref = models.init_params(CFG, jax.random.key(1))
  state = step.init_state(params, optax.sgd(0.1), seed=3)
  potential = jnp.asarray(tb.reward_XxY, jnp.float32)  # target log P = log π_ref + r
  fn = jax.jit(
    lambda st, p, x, r: rollout.rollout(
      st,
      p,
      x,
      r,
      graphdef=graphdef,
      sampling_cfg=sampling.SamplingConfig(max_new_tokens=3),
      num_policy=2,
      num_anchor=3,
      anchor_is_ref=True,
      score_fn=task.scorer(tb, potential),
      greedy=greedy,
    )
  )
  x = jnp.array([0, 5, 63, 17])
  return tb, graphdef, params, ref, state, fn, x, jnp.asarray(tb.prompts_XxP)[x]


def test_rollout_layout_log_probs_and_rewards():
  tb, graphdef, params, ref, state, fn, x, prompts = _setup()
  batch = fn(state, prompts, x, ref)
  tokens, mask = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"]
  assert tokens.shape == (4, 5, 5) and mask.shape == (4, 5, 5)
  np.testing.assert_array_equal(tokens[:, :, :2], np.repeat(np.asarray(prompts)[:, None], 5, 1))
  np.testing.assert_array_equal(mask[..., :2], 0.0)
  np.testing.assert_array_equal(mask[..., 2:], 1.0)
  # Columns 0-1 come from the policy, 2-4 from the anchor (= the reference here): each sample's
  # log-prob of the distribution it was drawn from is its teacher-forced log-prob under that model.
  np.testing.assert_allclose(
    batch["sample_logp_BxK"][:, :2],
    logps.sequence_logps(graphdef, params, tokens, mask)[:, :2],
    atol=1e-5,
  )
  np.testing.assert_allclose(
    batch["sample_logp_BxK"][:, 2:],
    logps.sequence_logps(graphdef, ref, tokens, mask)[:, 2:],
    atol=1e-5,
  )
  np.testing.assert_allclose(
    batch["ref_logp_BxK"], logps.sequence_logps(graphdef, ref, tokens, mask), atol=1e-6
  )
  np.testing.assert_array_equal(batch["anchor_logp_BxK"], batch["ref_logp_BxK"])
  y = np.asarray(task.response_index(tokens, 2))
  np.testing.assert_array_equal(tb.responses_YxT[y], np.asarray(tokens)[..., 2:])
  np.testing.assert_allclose(batch["reward_BxK"], tb.reward_XxY[np.asarray(x)[:, None], y])
  np.testing.assert_allclose(
    batch["target_logp_BxK"],
    batch["ref_logp_BxK"] + tb.reward_XxY[np.asarray(x)[:, None], y],
    rtol=1e-6,
  )


def test_sampler_token_log_probs_are_the_teacher_forced_token_log_probs():
  """At temperature 1 without truncation each sampled token's behaviour log-prob is its
  teacher-forced log-prob under the model that drew it, in the [B, K, T] layout of
  logps.token_logps_BxK; 0 at the prompt and after EOS (where the token mask is 0)."""
  _, graphdef, params, ref, state, _, x, prompts = _setup()
  fn = jax.jit(
    lambda st, p, xi, r: rollout.rollout(
      st,
      p,
      xi,
      r,
      graphdef=graphdef,
      anchor_is_ref=True,
      score_fn=lambda *args: {},
      sampling_cfg=sampling.SamplingConfig(max_new_tokens=5, eos_id=3),
      num_policy=2,
      num_anchor=2,
    )
  )
  batch = fn(state, prompts, x, ref)
  tokens, mask = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"]
  got_BxKxT = np.asarray(batch["sample_token_logp_BxKxT"])
  assert got_BxKxT.shape == (4, 4, 6)
  policy_BxKxT, mask_BxKxT = logps.token_logps_BxK(graphdef, params, tokens, mask)
  anchor_BxKxT, _ = logps.token_logps_BxK(graphdef, ref, tokens, mask)
  mask_BxKxT = np.asarray(mask_BxKxT)
  assert 0 < mask_BxKxT[..., 1:].mean() < 1  # Some rows stopped at EOS: padding is tested.
  want_BxKxT = np.concatenate([policy_BxKxT[:, :2], anchor_BxKxT[:, 2:]], axis=1)
  np.testing.assert_allclose(got_BxKxT[mask_BxKxT == 1], want_BxKxT[mask_BxKxT == 1], atol=1e-5)
  np.testing.assert_array_equal(got_BxKxT[mask_BxKxT == 0], 0.0)
  np.testing.assert_allclose(got_BxKxT.sum(-1), batch["sample_logp_BxK"], rtol=1e-6, atol=1e-6)


def test_rollout_samples_are_a_function_of_the_state_step():
  _, _, _, ref, state, fn, x, prompts = _setup()
  a, b = fn(state, prompts, x, ref), fn(state, prompts, x, ref)
  np.testing.assert_array_equal(a["tokens_BxKxL"], b["tokens_BxKxL"])
  moved = fn(dataclasses.replace(state, step=state.step + 1), prompts, x, ref)
  assert not np.array_equal(a["tokens_BxKxL"], moved["tokens_BxKxL"])


def test_greedy_baseline_is_the_reward_of_argmax_decoding():
  """The greedy decode is the sampler at temperature 0, which tests/test_sampling.py checks against
  argmax decoding by full forward passes."""
  tb, graphdef, params, ref, state, fn, x, prompts = _setup(greedy=True)
  batch = fn(state, prompts, x, ref)
  out = sampling.sample(
    graphdef,
    params,
    prompts,
    jax.random.key(0),
    sampling.SamplingConfig(max_new_tokens=3, temperature=0.0),
  )
  greedy = out["tokens_RxL"][:, None]
  y = np.asarray(task.response_index(greedy, 2))[:, 0]
  np.testing.assert_allclose(batch["greedy_reward_B"], tb.reward_XxY[np.asarray(x), y])
  mask = jnp.concatenate([jnp.zeros((4, 1, 2)), jnp.ones((4, 1, 3))], axis=2)
  np.testing.assert_allclose(
    batch["greedy_log_ratio_B"],
    (
      logps.sequence_logps(graphdef, params, greedy, mask)
      - logps.sequence_logps(graphdef, ref, greedy, mask)
    )[:, 0],
    atol=1e-5,
  )


def test_a_learned_reward_model_scores_the_samples():
  """With a reward function (a reward model's head), the batch reward is that function's value
  on the sampled tokens, not the testbed's rule."""
  tb, graphdef, params, ref, state, _, x, prompts = _setup()
  reward_fn = lambda p, tokens, mask: jnp.sum(tokens * mask, axis=-1) * p["scale"]
  fn = jax.jit(
    lambda st, pr, xi, r, rp: rollout.rollout(
      st,
      pr,
      xi,
      r,
      rp,
      graphdef=graphdef,
      sampling_cfg=sampling.SamplingConfig(max_new_tokens=3),
      num_policy=2,
      num_anchor=0,
      anchor_is_ref=True,
      score_fn=task.scorer(tb, None, reward_fn),
    )
  )
  batch = fn(state, prompts, x, ref, {"scale": jnp.float32(0.5)})
  want = 0.5 * np.sum(np.asarray(batch["tokens_BxKxL"]) * np.asarray(batch["loss_mask_BxKxL"]), -1)
  np.testing.assert_allclose(batch["reward_BxK"], want)
  np.testing.assert_allclose(batch["target_logp_BxK"], batch["ref_logp_BxK"])


# -------------------------------------------------------------------------------------------------
# The anchor's update after each step.


def test_ema_is_exact():
  with jax.enable_x64(True):  # float64: the 1e-15 comparison below.
    _check_ema()


def _check_ema():
  anchor = {"a": jnp.array([1.0, -2.0, 3.5]), "b": {"c": jnp.array(0.25)}}
  params = {"a": jnp.array([0.5, 4.0, -1.0]), "b": {"c": jnp.array(-3.0)}}
  eta = 0.02
  new = rollout.ema(anchor, params, eta)
  for key, want in (
    ("a", (1 - eta) * np.asarray(anchor["a"]) + eta * np.asarray(params["a"])),
    ("c", (1 - eta) * 0.25 + eta * -3.0),
  ):
    got = new["a"] if key == "a" else new["b"]["c"]
    np.testing.assert_allclose(got, want, rtol=1e-15)
  jax.tree.map(np.testing.assert_array_equal, rollout.ema(anchor, params, 0.0), anchor)
  jax.tree.map(np.testing.assert_array_equal, rollout.ema(anchor, params, 1.0), params)
  np.testing.assert_array_equal(rollout.ema(anchor, params, 0.25)["a"], [0.875, -0.5, 2.375])


def test_anchor_update_modes():
  anchor, params = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, 5.0])}
  assert rollout.anchor_update("reference", ema_rate=0.5, every=0) is None
  ema = rollout.anchor_update("ema", ema_rate=0.25, every=0)
  np.testing.assert_allclose(ema(anchor, params, 7, {})["w"], [1.5, 2.0])
  periodic = rollout.anchor_update("periodic", ema_rate=0.0, every=3)
  np.testing.assert_array_equal(periodic(anchor, params, 6, {})["w"], [3.0, 5.0])
  np.testing.assert_array_equal(periodic(anchor, params, 7, {})["w"], [1.0, 1.0])
  proposal = rollout.anchor_update("proposal", ema_rate=0.0, every=2)
  for at_step, q_update, want in (
    (4, True, [3.0, 5.0]),
    (4, False, [1.0, 1.0]),
    (5, True, [1.0, 1.0]),
  ):
    got = proposal(anchor, params, at_step, {"q_update": jnp.asarray(q_update)})["w"]
    np.testing.assert_array_equal(got, want)


def test_anchor_update_rejects_bad_settings():
  from align_jax.errors import ConfigError

  with pytest.raises(ConfigError, match="anchor_every=0"):
    rollout.anchor_update("periodic", ema_rate=0.0, every=0)
  with pytest.raises(ConfigError, match="'nope' is unknown"):
    rollout.anchor_update("nope", ema_rate=0.0, every=1)


def test_docstring_examples():
  result = doctest.testmod(rollout, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
