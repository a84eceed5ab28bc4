"""The testbed task: enumeration under a real model, preference pairs, corpus records."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from align_jax import config_lib, logps, models
from align_jax.testbed import base as tb_base, language, task

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
    seqs = np.concatenate(
      [np.repeat(testbed.prompts_XxP[x][None], 512, 0), testbed.responses_YxT], 1
    )[:, None]
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
  assert not np.array_equal(
    a["tokens_KxL"], task.pairs(testbed, base, 20_000, 4, 0.5)["tokens_KxL"]
  )
  r = testbed.reward_XxY[a["prompt_index_K"], a["response_index_K"]].astype(np.float64)
  np.testing.assert_array_equal(
    a["tokens_KxL"][:, :, 2:], testbed.responses_YxT[a["response_index_K"]]
  )
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
  key = tb_base.base_key(tb, model)
  tb2 = mlc.ConfigDict(tb.to_dict())
  tb2.pretrain_steps += 1
  assert tb_base.base_key(tb2, model) != key
  tb3 = mlc.ConfigDict(tb.to_dict())
  tb3.bt_temperature = 3.0  # does not affect the base LM
  assert tb_base.base_key(tb3, model) == key


def _four_se(n):  # Four standard errors of a mean of n Bernoulli draws (≤ 0.5/sqrt(n) each).
  return 4 * 0.5 / np.sqrt(n)


def test_lists_scores_are_bradley_terry_win_shares(testbed):
  base = testbed.chain_logp_XxY
  a = task.lists(testbed, base, 4000, seed=1, bt_temperature=0.5, k=4)
  np.testing.assert_array_equal(a["score_K"], task.lists(testbed, base, 4000, 1, 0.5, 4)["score_K"])
  # One BT draw per unordered pair: the wins of a list add up to k(k−1)/2, so Σ_i ψ_i = k/2.
  np.testing.assert_allclose(a["score_K"].sum(1), 2.0, atol=1e-6)
  assert set(np.unique(a["score_K"] * 3).astype(int)) <= {0, 1, 2, 3}
  x, y = a["prompt_index_K"], a["response_index_K"]
  np.testing.assert_array_equal(a["tokens_KxL"][:, :, 2:], testbed.responses_YxT[y])
  r = testbed.reward_XxY[x, y].astype(np.float64)
  # ψ_i − ψ_j = (w_i − w_j)/(k−1) and E[w_i] = Σ_{m≠i} σ((r_i − r_m)/T): compare on response 0.
  expected = np.sum(1 / (1 + np.exp(-(r[:, :1] - r[:, 1:]) / 0.5)), axis=1) / 3
  assert abs(a["score_K"][:, 0].mean() - expected.mean()) < _four_se(4000 * 3)


def test_binary_labels_compare_with_the_base_mean_reward(testbed):
  base = testbed.chain_logp_XxY
  a = task.binary(testbed, base, 20_000, seed=2, bt_temperature=0.5)
  x, y = a["prompt_index_K"][:, 0], a["response_index_K"][:, 0]
  mean_X = np.sum(np.exp(base) * testbed.reward_XxY, axis=1)
  p = 1 / (1 + np.exp(-(testbed.reward_XxY[x, y] - mean_X[x]) / 0.5))
  assert abs(a["desirable"].mean() - p.mean()) < _four_se(20_000)
  np.testing.assert_array_equal(a["score_K"][:, 0], a["desirable"])
  # K index 1: the same prompt with the previous record's completion.
  np.testing.assert_array_equal(a["response_index_K"][:, 1], np.roll(y, 1))
  np.testing.assert_array_equal(a["prompt_index_K"][:, 1], x)


def test_ternary_labels_follow_rao_kupper(testbed):
  base = testbed.chain_logp_XxY
  a = task.ternary(testbed, base, 20_000, seed=3, bt_temperature=0.5, tie_alpha=0.7)
  x, y = a["prompt_index_K"][:, 0], a["response_index_K"]
  d = (testbed.reward_XxY[x, y[:, 0]] - testbed.reward_XxY[x, y[:, 1]]).astype(np.float64) / 0.5
  # The pair's order is the winner's for non-ties; P(tie) is symmetric in the order.
  p_tie = 1 - 1 / (1 + np.exp(-(d - 0.7))) - 1 / (1 + np.exp(-(-d - 0.7)))
  assert abs(a["is_tie"].mean() - p_tie.mean()) < _four_se(20_000)
  tie = a["is_tie"] > 0
  np.testing.assert_array_equal(a["score_K"][tie], 0.5)
  np.testing.assert_array_equal(
    a["score_K"][~tie], np.broadcast_to([1.0, 0.0], (int((~tie).sum()), 2))
  )
  # Among non-ties the first response won: P(first | not tie) = σ(|d|−α)/(σ(d−α)+σ(−d−α)) on average.
  win = 1 / (1 + np.exp(-(np.abs(d) - 0.7)))
  lose = 1 / (1 + np.exp(-(-np.abs(d) - 0.7)))
  higher_first = (d > 0)[~tie & (d != 0)]
  assert abs(higher_first.mean() - (win / (win + lose))[~tie & (d != 0)].mean()) < _four_se(
    higher_first.size
  )


def test_negatives_are_harmful_and_self_samples_come_from_the_base(testbed):
  base = testbed.chain_logp_XxY
  a = task.negatives(testbed, base, 5000, seed=4, num_samples=3)
  assert a["tokens_KxL"].shape[1] == 4
  assert np.all(language.harm(testbed.responses_YxT[a["response_index_K"][:, 0]]))
  np.testing.assert_array_equal(a["score_K"][:, 0], 0.0)
  # Self-samples are unconditioned: their harm rate matches the base's on the drawn prompts.
  x = a["prompt_index_K"][:, 0]
  harm_Y = language.harm(testbed.responses_YxT)
  base_rate = (np.exp(base) * harm_Y).sum(1)[x].mean()
  own = harm_Y[a["response_index_K"][:, 1:]]
  assert abs(own.mean() - base_rate) < _four_se(own.size)


def test_distribution_labels_are_posterior_means_of_ordered_votes(testbed):
  base = testbed.chain_logp_XxY
  a = task.distribution(testbed, base, 20_000, seed=5, bt_temperature=1e-6, categories=4, voters=3)
  label = a["label_dist_C"]
  np.testing.assert_allclose(label.sum(1), 1.0, atol=1e-6)
  votes = np.rint(label * (4 + 3) - 1).astype(int)  # (1 + n_c)/(C + voters) inverted.
  np.testing.assert_allclose(label, (1 + votes) / 7, atol=1e-6)
  assert np.all(votes.sum(1) == 3)
  # Nearly noise-free voters agree (all but responses sitting exactly on a cut point, measured
  # 0.4 %): each response falls in one base-quantile bin, holding 1/4 of the base mass each
  # (up to the mass of the response at a cut, which cannot be split).
  unanimous = votes.max(1) == 3
  assert unanimous.mean() > 0.98
  share = np.bincount(votes[unanimous].argmax(1), minlength=4) / unanimous.sum()
  np.testing.assert_allclose(share, 0.25, atol=_four_se(20_000) + 0.01)
  votes = votes[unanimous]
  a = {k: v[unanimous] for k, v in a.items()}
  # The bin order follows the advantage r − E_base[r|x]: higher bins have higher reward on average.
  x, y = a["prompt_index_K"][:, 0], a["response_index_K"][:, 0]
  adv = testbed.reward_XxY[x, y] - (np.exp(base) * testbed.reward_XxY).sum(1)[x]
  means = [adv[votes.argmax(1) == c].mean() for c in range(4)]
  assert means == sorted(means)
