"""Shared-prompt rows (`logps.shared_token_logps_BxK`): an example's K responses scored in one row
`[prompt | r_1 | … | r_K]` give the unshared rows' token log-probs and gradients, in every model
family, with scanned layers, chunked log-probs and attention, under LoRA, and through the step."""

import logging

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from align_jax import logps, models, objectives, step
from align_jax.models import lora
from conftest import FAMILIES, dpo_update, lora_adapters

TINY = dict(models.preset("tiny"))
B, K, L, LO = 3, 3, 10, 2
INIT = jax.jit(models.init_params, static_argnums=0)


def _batch(vocab: int, K: int = K):
  """Prompts of 2, 3 and 4 tokens (identical in the K rows), ragged responses, padding after."""
  rng = np.random.default_rng(0)
  prompt_B, length_BxK = np.array([2, 3, 4]), np.array([[5, 3, 6], [1, 7, 2], [6, 6, 4]])[:, :K]
  tokens = rng.integers(1, vocab, (B, K, L))
  tokens[:, 1:, :4] = tokens[:, :1, :4]  # The prompts (at most 4 tokens) are shared...
  for b in range(B):
    tokens[b, :, prompt_B[b] : prompt_B[b] + 1] = rng.integers(1, vocab, (K, 1))  # ...not after.
  position_L = np.arange(L)
  start = prompt_B[:, None, None]
  mask = (position_L >= start) & (position_L < start + length_BxK[..., None])
  tokens = np.where(position_L < start + length_BxK[..., None], tokens, 0)  # Padding: 0.
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.float32)


def _weighted_sum(cfg, shared, params, tokens, mask, w):
  logp, m = logps.token_logps_BxK(models.abstract(cfg)[0], params, tokens, mask, shared)
  return jnp.sum(logp * m * w)


def _rel_close(a, b, tol):
  """max |a − b| ≤ tol · max |b| over the whole tree (a leaf whose gradient is ~0 everywhere,
  e.g. unused position rows, is held to the tree's scale, not its own)."""
  scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) <= tol * scale


CASES = {
  **{name: options for name, options in FAMILIES.items()},
  "scanned_chunked": dict(scan_layers=True, logits_chunk=4, attention_chunk=4, remat=True),
  "gemma2_chunked": dict(FAMILIES["gemma2"], logits_chunk=5, attention_chunk=3),
}


@pytest.mark.parametrize("case", CASES)
def test_shared_rows_equal_the_unshared_rows_and_their_gradients(case):
  cfg = models.ModelConfig(**{**TINY, **CASES[case]})
  params = INIT(cfg, jax.random.key(0))
  tokens, mask = _batch(cfg.vocab_size)
  w = jax.random.normal(jax.random.key(3), mask[..., 1:].shape)
  graphdef = models.abstract(cfg)[0]

  @jax.jit
  def both(params):  # One program: (log-probs, gradient) shared, then unshared.
    def weighted(params, shared):
      logp, m = logps.token_logps_BxK(graphdef, params, tokens, mask, shared)
      return jnp.sum(logp * m * w), logp

    return [jax.grad(weighted, has_aux=True)(params, shared)[::-1] for shared in (LO, 0)]

  (shared, g_shared), (unshared, g_plain) = both(params)
  # Every entry, scored or not: each slot sees exactly what it sees in its own row.
  np.testing.assert_allclose(shared, unshared, atol=1e-5, rtol=0)
  _rel_close(g_shared, g_plain, 1e-5)


def test_shared_rows_under_lora_give_the_adapters_the_same_gradients():
  cfg = models.ModelConfig(**TINY)
  graphdef, shapes, names = models.abstract(cfg)
  rank = mlc.ConfigDict(dict(rank=2, alpha=4.0, targets=("attn", "mlp")))
  base = INIT(cfg, jax.random.key(0))
  adapters = lora_adapters(shapes, names, rank)
  tokens, mask = _batch(cfg.vocab_size)
  w = jax.random.normal(jax.random.key(4), mask[..., 1:].shape)

  def loss(adapters, shared):
    return _weighted_sum(cfg, shared, lora.merge(base, adapters, rank), tokens, mask, w)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (v_shared, g_shared), (v_plain, g_plain) = grad(adapters, LO), grad(adapters, 0)
  np.testing.assert_allclose(v_shared, v_plain, rtol=1e-5)
  _rel_close(g_shared, g_plain, 1e-5)


def test_the_row_layout():
  """Example 0 (prompt 2, K = 2, L = 5, lo = 2): row [p p a a a | b b b] with b continuing
  from the prompt's end."""
  tokens = jnp.array([[[7, 8, 1, 2, 0], [7, 8, 4, 5, 6]]], jnp.int32)
  mask = jnp.array([[[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]], jnp.float32)
  row, positions, layout = logps.shared_rows(tokens, mask, 2)
  np.testing.assert_array_equal(row, [[7, 8, 1, 2, 0, 4, 5, 6]])
  np.testing.assert_array_equal(positions, [[0, 1, 2, 3, 4, 2, 3, 4]])
  np.testing.assert_array_equal(layout.start_R, [2])
  assert (layout.length, layout.width) == (5, 3)


def test_a_response_never_sees_another():
  """Changing response 2's tokens leaves response 1's log-probs as they were, and the converse;
  changing the prompt changes both."""
  cfg = models.ModelConfig(**TINY)
  params = INIT(cfg, jax.random.key(0))
  graphdef = models.abstract(cfg)[0]
  tokens, mask = _batch(cfg.vocab_size)
  fn = jax.jit(logps.token_logps_BxK, static_argnums=(0, 4))
  base = np.asarray(fn(graphdef, params, tokens, mask, LO)[0])
  after = np.arange(L) >= 5  # Past every example's prompt (2, 3, 4 tokens) and first token.
  for k in range(K):
    other = tokens.at[:, k].set(jnp.where(after, (tokens[:, k] + 1) % cfg.vocab_size, tokens[:, k]))
    moved = np.asarray(fn(graphdef, params, other, mask, LO)[0])
    for j in range(K):
      same = np.allclose(moved[:, j, 4:], base[:, j, 4:], atol=1e-6)
      assert same == (j != k), (k, j)
  prompt = tokens.at[:, :, 0].set((tokens[:, :, 0] + 1) % cfg.vocab_size)
  moved = np.asarray(fn(graphdef, params, prompt, mask, LO)[0])
  assert not np.any(np.all(np.isclose(moved[..., 4:], base[..., 4:], atol=1e-6), axis=-1))


def test_a_shared_prompt_step_is_the_unshared_step():
  """One DPO update from the same state, shared and unshared: equal loss, metrics and params."""
  cfg = models.ModelConfig(**TINY)
  graphdef = models.abstract(cfg)[0]
  params = INIT(cfg, jax.random.key(0))
  ref = INIT(cfg, jax.random.key(1))
  tokens, mask = _batch(cfg.vocab_size, K=2)
  batch = {"tokens_BxKxL": tokens, "loss_mask_BxKxL": mask, "example_mask_B": jnp.ones(B)}
  updates = {shared: dpo_update(graphdef, ref, shared_prompt=shared) for shared in (LO, 0)}
  state = step.init_state(params, updates[0][1], seed=0)

  def update(shared):
    return updates[shared][0](state, batch)

  (s_shared, m_shared), (s_plain, m_plain) = update(LO), update(0)
  for key in ("loss", "grad_norm", "objective/margin", "objective/reward_chosen"):
    np.testing.assert_allclose(m_shared[key], m_plain[key], rtol=1e-5, err_msg=key)
  _rel_close(s_shared.params, s_plain.params, 1e-5)


def test_which_runs_share_their_prompts():
  """auto shares prompts of >= 16 tokens that save >= 10 % of the positions, on any, off none;
  records whose K rows differ before their responses, reward models and whole distributions are
  never shared."""
  from align_jax.data import records

  cfg = mlc.ConfigDict(
    {
      "data": {"share_prompt": "auto"},
      "rollout": {"num_policy": 2, "num_anchor": 0},
      "sampling": {"max_new_tokens": 8},
    }
  )
  dpo, bt, gkd = objectives.get("dpo"), objectives.get("bt_reward"), objectives.get("gkd")
  tokens = np.tile(np.arange(40, dtype=np.int32), (3, 2, 1))
  mask = np.zeros((3, 2, 40), np.float32)
  mask[0, :, 20:], mask[1, :, 17:30], mask[2, 0, 25:] = 1, 1, 1  # Prompts 20, 17, 25.
  fixed = {"tokens_KxL": tokens, "loss_mask_KxL": mask}
  prompts = {"prompt_P": np.zeros((5, 16), np.int32)}
  assert records.shared_prompt(cfg, dpo, fixed) == 17  # The shortest prompt.
  assert records.shared_prompt(cfg, dpo, prompts) == 16
  assert records.shared_prompt(cfg, bt, fixed) == records.shared_prompt(cfg, gkd, prompts) == 0
  # 16 of 2 × 40 positions (20 %) is enough; 16 of 2 × 200 (4 %) is not, unless on.
  assert records.prompt_shared(cfg, 16, 2, 40) == 16 and records.prompt_shared(cfg, 16, 2, 200) == 0
  assert records.prompt_shared(cfg, 15, 2, 16) == 0  # Too short a prompt.
  cfg.rollout.num_anchor = 30  # 32 samples of 16 + 200 tokens: 16·31 of 32·216 positions, 7 %.
  cfg.sampling.max_new_tokens = 200
  assert records.shared_prompt(cfg, dpo, prompts) == 0
  cfg.rollout.num_anchor, cfg.sampling.max_new_tokens = 0, 8
  short = {"prompt_P": np.zeros((5, 3), np.int32)}
  assert records.shared_prompt(cfg, dpo, short) == 0
  cfg.data.share_prompt = "on"
  assert records.shared_prompt(cfg, dpo, short) == 3
  cfg.rollout.num_policy = 1  # One sample per prompt: nothing to share.
  assert records.shared_prompt(cfg, dpo, short) == 0
  different = {**fixed, "tokens_KxL": tokens.copy()}
  different["tokens_KxL"][1, 1, 5] += 1  # Record 1's second row has another prompt.
  assert records.shared_prompt(cfg, dpo, different) == 0
  cfg.data.share_prompt = "off"
  assert records.shared_prompt(cfg, dpo, fixed) == 0


@pytest.mark.parametrize("name", ["dpo", "bond"])
def test_a_run_with_shared_prompts_trains_as_the_unshared_run(tmp_path, name, caplog):
  """`--config.data.share_prompt=on` through train.run (what `align_jax.main` calls): the same
  losses as `off`, offline (pairs) and on-policy (a prompt's 2 + 16 samples in one row)."""
  from align_jax import train
  from conftest import load_config, read_jsonl

  losses = {}
  for mode in ("on", "off"):
    cfg = load_config(name, "smoke")
    with cfg.unlocked():
      cfg.data.share_prompt, cfg.mesh.shape = mode, (1, 1, 1)
      cfg.total_steps, cfg.log_every, cfg.testbed.exact_eval = 3, 1, False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
      train.run(cfg, str(tmp_path / mode))
    assert ("share one row" in caplog.text) == (mode == "on")  # The run did (not) share.
    losses[mode] = [r["loss"] for r in read_jsonl(tmp_path / mode / "metrics.jsonl") if "loss" in r]
  assert len(losses["off"]) == 3 and len(set(losses["off"])) == 3
  np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-5, atol=1e-6)
