"""The testbed task: enumeration under a real model, preference pairs, corpus records."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from align_jax import config_lib, logps, models
from align_jax.testbed import language, task

CFG = models.ModelConfig(**models.preset("tiny"))


@pytest.fixture(scope="module")
def testbed():
  tb_cfg = config_lib.base().testbed
  tb_cfg.response_len = 3
  return task.make(tb_cfg)


@pytest.fixture(scope="module")
def model():
  graphdef, _, _ = models.abstract(CFG)
  return graphdef, models.init_params(CFG, jax.random.key(7))


def test_enumerated_responses_sum_to_one_and_match_teacher_forcing(testbed, model):
  graphdef, params = model
  logp_XxY = jax.jit(task.exact_logp_fn(graphdef, testbed, chunk=1000))(params)
  assert logp_XxY.shape == (64, 8**3)
  np.testing.assert_allclose(jax.nn.logsumexp(logp_XxY, axis=1), 0.0, atol=1e-5)
  # Brute force for three prompts: score every full sequence [x, y] by teacher forcing.
  for x in (0, 17, 63):
    seqs = np.concatenate([np.repeat(testbed.prompts_XxP[x][None], 512, 0),
                           testbed.responses_YxT], 1)[:, None]
    mask = np.zeros(seqs.shape, np.float32)
    mask[..., 2:] = 1.0
    brute = logps.sequence_logps(graphdef, params, jnp.asarray(seqs), jnp.asarray(mask))[:, 0]
    np.testing.assert_allclose(logp_XxY[x], brute, atol=1e-5)


def test_pairs_are_deterministic_and_follow_bradley_terry(testbed):
  base = testbed.chain_logp_XxY
  a = task.pairs(testbed, base, 20_000, seed=3, bt_temperature=0.5)
  b = task.pairs(testbed, base, 20_000, seed=3, bt_temperature=0.5)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["tokens_KxL"], task.pairs(testbed, base, 20_000, 4, 0.5)["tokens_KxL"])
  r = testbed.reward_XxY[a["prompt_index"][:, None], a["response_index_K"]].astype(np.float64)
  np.testing.assert_array_equal(a["tokens_KxL"][:, :, 2:], testbed.responses_YxT[a["response_index_K"]])
  distinct = r[:, 0] != r[:, 1]
  higher_won = (r[:, 0] > r[:, 1])[distinct]
  expected = (1 / (1 + np.exp(-np.abs(r[:, 0] - r[:, 1]) / 0.5)))[distinct]
  # Mean of n Bernoulli labels: standard error ≤ 0.5/sqrt(n); allow 4 of them.
  assert abs(higher_won.mean() - expected.mean()) < 4 * 0.5 / np.sqrt(distinct.sum())
  assert np.all(a["loss_mask_KxL"][:, :, :2] == 0) and np.all(a["loss_mask_KxL"][:, :, 2:] == 1)


def test_corpus_scores_every_token_after_the_first(testbed):
  rec = task.corpus(testbed, 1000, seed=0)
  assert rec["tokens_KxL"].shape == (1000, 1, 5)
  np.testing.assert_array_equal(rec["loss_mask_KxL"][0, 0], [0, 1, 1, 1, 1])
  assert rec["tokens_KxL"].max() < language.V


def test_base_key_changes_with_settings():
  tb = config_lib.base().testbed
  model = models.preset("testbed")
  key = task.base_key(tb, model)
  tb2 = mlc.ConfigDict(tb.to_dict())
  tb2.pretrain_steps += 1
  assert task.base_key(tb2, model) != key
  tb3 = mlc.ConfigDict(tb.to_dict())
  tb3.bt_temperature = 3.0  # does not affect the base LM
  assert task.base_key(tb3, model) == key
