"""The testbed as a task: prompts × responses, its datasets, the rollout scorer, the enumeration pass.

The cached base LM is in `testbed/base.py`, the run's exact evaluation in `testbed/evaluate.py`.

Tokens: ToyLang ids 0..7, no BOS: a sequence is [prompt (P ≥ 1 tokens), response (T tokens)], and
π(y|x) is the model's conditional of the response given the prompt. Without an input-only token the
model's next-token distribution lives on the language's tokens, so Σ_y π(y|x) = 1 exactly.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.testbed import exact, language
from align_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Testbed:
  prompts_XxP: np.ndarray  # Every prompt, lexicographic.
  responses_YxT: np.ndarray  # Every response, lexicographic.
  prompt_logw_X: np.ndarray  # log of the prompt distribution (the chain's marginal).
  reward_XxY: np.ndarray  # The gold rule reward r(x, y).
  chain_logp_XxY: np.ndarray  # The oracle conditional of the chain.

  @property
  def seq_len(self) -> int:
    return self.prompts_XxP.shape[1] + self.responses_YxT.shape[1]


def make(tb_cfg) -> Testbed:
  P, T = tb_cfg.prompt_len, tb_cfg.response_len
  if P < 1 or T < 1:
    raise ConfigError(f"testbed: prompt_len={P} and response_len={T} must both be >= 1")
  prompts, responses = language.all_sequences(P), language.all_sequences(T)
  reward_Y = language.response_reward(responses)
  return Testbed(
    prompts_XxP=prompts,
    responses_YxT=responses,
    prompt_logw_X=language.prompt_log_weights(P),
    reward_XxY=np.broadcast_to(reward_Y, (len(prompts), len(responses))).astype(np.float32),
    chain_logp_XxY=language.chain_conditional_logp(P, T),
  )


def corpus(tb: Testbed, n: int, seed: int) -> dict[str, np.ndarray]:
  """MLE records: whole chain samples, every token after the first scored (K = 1)."""
  tokens = language.sample_sequences(np.random.default_rng(seed), n, tb.seq_len).astype(np.int32)
  mask = np.ones_like(tokens, np.float32)
  mask[:, 0] = 0.0
  return {"tokens_KxL": tokens[:, None], "loss_mask_KxL": mask[:, None]}


def demonstrations(tb: Testbed, target_logp_XxY, n: int, seed: int) -> dict[str, np.ndarray]:
  """SFT records drawn from a target: prompts from the prompt distribution, one response each
  from the target's exact conditional (Best-of-N of the base: rejection-sampling fine-tuning),
  the response scored (K = 1)."""
  rng = np.random.default_rng(seed)
  x_N = _prompt_draws(tb, rng, n)
  y_Nx1 = sample_responses(rng, np.asarray(target_logp_XxY, np.float64), x_N, 1)
  return _records(tb, x_N[:, None], y_Nx1, np.ones((n, 1)))


def sample_responses(
  rng: np.random.Generator, logp_XxY: np.ndarray, prompt_idx_N: np.ndarray, k: int
) -> np.ndarray:
  """k independent response indices per drawn prompt from the exact conditional: int [N, k]."""
  cdf_XxY = np.cumsum(np.exp(logp_XxY.astype(np.float64)), axis=1)
  cdf_NxY = cdf_XxY[prompt_idx_N]
  u_Nxk = rng.random((len(prompt_idx_N), k)) * cdf_NxY[:, -1:]
  idx = np.stack(
    [np.searchsorted(cdf_NxY[n], u_Nxk[n], side="right") for n in range(len(prompt_idx_N))]
  )
  return np.minimum(idx, logp_XxY.shape[1] - 1)


def _prompt_draws(tb: Testbed, rng: np.random.Generator, n: int) -> np.ndarray:
  """n prompt indices from the chain's prompt distribution."""
  return rng.choice(len(tb.prompts_XxP), size=n, p=np.exp(tb.prompt_logw_X))


def _records(
  tb: Testbed, x_NxK: np.ndarray, y_NxK: np.ndarray, score_NxK: np.ndarray, **extra: np.ndarray
) -> dict[str, np.ndarray]:
  """The shared record layout: [prompt, response] per list entry, responses scored.

  Fields: tokens_KxL, loss_mask_KxL, score_K (higher = preferred), response_mask_K (all 1 here),
  prompt_index_K and response_index_K (testbed indices, for evaluation), plus `extra`.
  """
  tokens = np.concatenate([tb.prompts_XxP[x_NxK], tb.responses_YxT[y_NxK]], axis=2)
  mask = np.zeros(tokens.shape, np.float32)
  mask[:, :, tb.prompts_XxP.shape[1] :] = 1.0
  return {
    "tokens_KxL": tokens.astype(np.int32),
    "loss_mask_KxL": mask,
    "score_K": score_NxK.astype(np.float32),
    "response_mask_K": np.ones(x_NxK.shape, np.float32),
    "prompt_index_K": x_NxK.astype(np.int32),
    "response_index_K": y_NxK.astype(np.int32),
    **{k: v.astype(np.float32) for k, v in extra.items()},
  }


def _bt_prob(r_a, r_b, temperature: float):
  """Bradley–Terry P(a ≻ b) = σ((r_a − r_b)/T), float64."""
  return 1.0 / (1.0 + np.exp(-(np.asarray(r_a, np.float64) - r_b) / temperature))


def pairs(
  tb: Testbed, base_logp_XxY: np.ndarray, n: int, seed: int, bt_temperature: float
) -> dict[str, np.ndarray]:
  """Preference pairs: prompts from the prompt distribution, two base samples, BT-noisy labels.

  P(a ≻ b) = σ((r_a − r_b) / bt_temperature); K index 0 is the chosen response (score 1).
  """
  rng = np.random.default_rng(seed)
  x_N = _prompt_draws(tb, rng, n)
  ab_Nx2 = sample_responses(rng, base_logp_XxY, x_N, 2)
  r_Nx2 = tb.reward_XxY[x_N[:, None], ab_Nx2]
  a_wins = rng.random(n) < _bt_prob(r_Nx2[:, 0], r_Nx2[:, 1], bt_temperature)
  chosen_Nx2 = np.where(a_wins[:, None], ab_Nx2, ab_Nx2[:, ::-1])
  return _records(
    tb, np.repeat(x_N[:, None], 2, 1), chosen_Nx2, np.broadcast_to(np.array([1.0, 0.0]), (n, 2))
  )


def lists(
  tb: Testbed, base_logp_XxY: np.ndarray, n: int, seed: int, bt_temperature: float, k: int
) -> dict[str, np.ndarray]:
  """Ranked lists (LiPO, ListMLE, PRO): k base samples per prompt, labelled by BT win rates.

  Every ordered pair (i, j) of a list is compared once by a Bradley–Terry draw on the gold reward;
  the label ψ_i ∈ [0, 1] is response i's share of wins against the other k − 1 (the average
  win-probability aggregation of LiPO, made noisy by the draws).
  """
  if k < 2:
    raise ConfigError(f"testbed lists need k >= 2 responses; got {k}")
  rng = np.random.default_rng(seed)
  x_N = _prompt_draws(tb, rng, n)
  y_NxK = sample_responses(rng, base_logp_XxY, x_N, k)
  r_NxK = tb.reward_XxY[x_N[:, None], y_NxK]
  i_wins_NxKxK = rng.random((n, k, k)) < _bt_prob(
    r_NxK[:, :, None], r_NxK[:, None, :], bt_temperature
  )
  upper = np.triu(np.ones((k, k), bool), 1)  # One draw per unordered pair, i < j.
  wins_NxKxK = np.where(upper, i_wins_NxKxK, ~np.swapaxes(i_wins_NxKxK, 1, 2) & upper.T)
  score_NxK = wins_NxKxK.sum(-1) / (k - 1)
  return _records(tb, np.repeat(x_N[:, None], k, 1), y_NxK, score_NxK)


def binary(
  tb: Testbed, base_logp_XxY: np.ndarray, n: int, seed: int, bt_temperature: float
) -> dict[str, np.ndarray]:
  """Thumbs up/down (KTO, BCO): one base sample per record, desirable by a BT draw.

  P(desirable) = σ((r(x, y) − E_base[r | x]) / T): the response is compared with the base policy's
  mean reward for its prompt. K index 1 holds a mismatched completion (another record's response
  after this record's prompt): KTO's reference point z0 is estimated from such pairs.
  """
  rng = np.random.default_rng(seed)
  x_N = _prompt_draws(tb, rng, n)
  y_N = sample_responses(rng, base_logp_XxY, x_N, 1)[:, 0]
  base_mean_X = np.sum(np.exp(base_logp_XxY.astype(np.float64)) * tb.reward_XxY, axis=1)
  desirable = rng.random(n) < _bt_prob(tb.reward_XxY[x_N, y_N], base_mean_X[x_N], bt_temperature)
  y_Nx2 = np.stack([y_N, np.roll(y_N, 1)], axis=1)
  return _records(
    tb,
    np.repeat(x_N[:, None], 2, 1),
    y_Nx2,
    np.stack([desirable, np.zeros(n, bool)], 1),
    desirable=desirable,
  )


def ternary(
  tb: Testbed, base_logp_XxY: np.ndarray, n: int, seed: int, bt_temperature: float, tie_alpha: float
) -> dict[str, np.ndarray]:
  """Pairs with ties (objective `todo`): labels from the Rao–Kupper model with tie parameter α.

  With d = (r_a − r_b)/T: P(a ≻ b) = σ(d − α), P(b ≻ a) = σ(−d − α), P(tie) = the rest. The winner
  is K index 0; a tie keeps the drawn order and has is_tie = 1 (score [0.5, 0.5]).
  """
  rng = np.random.default_rng(seed)
  x_N = _prompt_draws(tb, rng, n)
  ab_Nx2 = sample_responses(rng, base_logp_XxY, x_N, 2)
  r_Nx2 = tb.reward_XxY[x_N[:, None], ab_Nx2].astype(np.float64)
  d_N = (r_Nx2[:, 0] - r_Nx2[:, 1]) / bt_temperature
  p_a = 1.0 / (1.0 + np.exp(-(d_N - tie_alpha)))
  p_b = 1.0 / (1.0 + np.exp(-(-d_N - tie_alpha)))
  u_N = rng.random(n)
  b_wins, tie = (u_N >= p_a) & (u_N < p_a + p_b), u_N >= p_a + p_b
  ordered_Nx2 = np.where(b_wins[:, None], ab_Nx2[:, ::-1], ab_Nx2)
  score_Nx2 = np.where(tie[:, None], 0.5, np.array([1.0, 0.0]))
  return _records(tb, np.repeat(x_N[:, None], 2, 1), ordered_Nx2, score_Nx2, is_tie=tie)


def distribution(
  tb: Testbed,
  base_logp_XxY: np.ndarray,
  n: int,
  seed: int,
  bt_temperature: float,
  categories: int,
  voters: int,
) -> dict[str, np.ndarray]:
  """Distributional labels (DPRM): one base sample per record, rated by a simulated population.

  Each of `voters` annotators sees the response's advantage d = r(x, y) − E_base[r | x] plus
  logistic noise of scale T and votes the number of cut points below it; the C − 1 cut points are
  the base distribution's quantiles of d at 1/C, …, (C−1)/C, so categories are ordered worst
  first. The label is the posterior mean (1 + n_c)/Σ(1 + n) of a uniform Dirichlet prior
  (ALGORITHMS.md §4.3, §7.6); score_K is the label's mean category / (C − 1).
  """
  if categories < 2 or voters < 1:
    raise ConfigError(
      f"testbed distribution labels need categories >= 2 and voters >= 1; got "
      f"{categories} and {voters}"
    )
  rng = np.random.default_rng(seed)
  x_N = _prompt_draws(tb, rng, n)
  y_N = sample_responses(rng, base_logp_XxY, x_N, 1)[:, 0]
  p_XxY = np.exp(base_logp_XxY.astype(np.float64))
  d_XxY = tb.reward_XxY - np.sum(p_XxY * tb.reward_XxY, axis=1, keepdims=True)
  mass = (np.exp(tb.prompt_logw_X)[:, None] * p_XxY).ravel()
  order = np.argsort(d_XxY.ravel(), kind="stable")
  cdf = np.cumsum(mass[order])
  cuts_C1 = d_XxY.ravel()[order][np.searchsorted(cdf, np.arange(1, categories) / categories)]
  seen_NxV = d_XxY[x_N, y_N][:, None] + bt_temperature * rng.logistic(size=(n, voters))
  votes_NxC = np.stack(
    [np.sum(np.searchsorted(cuts_C1, seen_NxV) == c, axis=1) for c in range(categories)], axis=1
  )
  label_NxC = (1.0 + votes_NxC) / (categories + voters)
  mean_N = label_NxC @ np.arange(categories) / (categories - 1)
  return _records(tb, x_N[:, None], y_N[:, None], mean_N[:, None], label_dist_C=label_NxC)


def negatives(
  tb: Testbed, base_logp_XxY: np.ndarray, n: int, seed: int, num_samples: int
) -> dict[str, np.ndarray]:
  """Negatives only (D2O): K index 0 a harmful response, 1..num_samples the model's own samples.

  The negative is a base sample conditioned on harm (the response contains token h, ABLATIONS.md
  §6.2); prompts whose base conditional puts no mass on harm are not drawn. The self-samples are
  unconditioned base samples (the offline variant: drawn once from π_ref).
  """
  rng = np.random.default_rng(seed)
  harm_Y = language.harm(tb.responses_YxT)
  harmful_logp_XxY = np.where(harm_Y[None], base_logp_XxY.astype(np.float64), -np.inf)
  log_mass_X = np.logaddexp.reduce(harmful_logp_XxY, axis=1)
  logw_X = np.where(np.isfinite(log_mass_X), tb.prompt_logw_X, -np.inf)
  x_N = rng.choice(len(tb.prompts_XxP), size=n, p=np.exp(logw_X - np.logaddexp.reduce(logw_X)))
  neg_N = sample_responses(rng, harmful_logp_XxY - log_mass_X[:, None], x_N, 1)[:, 0]
  own_NxS = sample_responses(rng, base_logp_XxY, x_N, num_samples)
  y_NxK = np.concatenate([neg_N[:, None], own_NxS], axis=1)
  score_NxK = np.concatenate([np.zeros((n, 1)), np.ones((n, num_samples))], axis=1)
  return _records(tb, np.repeat(x_N[:, None], num_samples + 1, 1), y_NxK, score_NxK)


def prompt_records(tb: Testbed, n: int, seed: int) -> dict[str, np.ndarray]:
  """On-policy training prompts drawn from the prompt distribution: prompt_P and prompt_index."""
  x_N = _prompt_draws(tb, np.random.default_rng(seed), n)
  return {"prompt_P": tb.prompts_XxP[x_N].astype(np.int32), "prompt_index": x_N.astype(np.int32)}


def response_index(tokens_BxKxL: jax.Array, prompt_len: int) -> jax.Array:
  """The lexicographic index y of each [prompt, response] row's response (base-V digits)."""
  response_BxKxT = tokens_BxKxL[..., prompt_len:].astype(jnp.int32)
  T = response_BxKxT.shape[-1]
  return jnp.sum(response_BxKxT * language.V ** jnp.arange(T - 1, -1, -1, dtype=jnp.int32), -1)


def scorer(
  tb: Testbed,
  extra_logp_XxY: np.ndarray | None = None,
  reward_fn=None,
  reward_XxY: jax.Array | None = None,
):
  """score_fn of `rollout.rollout` on the testbed: the reward, and the target log P.

  The reward is `reward_XxY` (default: the gold rule reward) looked up by response, or
  `reward_fn(reward_params, tokens_BxKxL, loss_mask_BxKxL)` (a learned reward model). The target is log π_ref + extra(x, y) with `extra_logp_XxY` the task's
  log-potential (r/β, log b, λ·φ, ...); without one, target_logp_BxK is the reference's log-prob.
  """
  reward_XxY = jnp.asarray(tb.reward_XxY if reward_XxY is None else reward_XxY, jnp.float32)
  extra_XxY = None if extra_logp_XxY is None else jnp.asarray(extra_logp_XxY, jnp.float32)
  prompt_len = tb.prompts_XxP.shape[1]

  def score(tokens_BxKxL, loss_mask_BxKxL, prompt_index_B, ref_logp_BxK, reward_params):
    y_BxK = response_index(tokens_BxKxL, prompt_len)
    x_Bx1 = prompt_index_B[:, None]
    target = ref_logp_BxK if extra_XxY is None else ref_logp_BxK + extra_XxY[x_Bx1, y_BxK]
    reward = (
      reward_XxY[x_Bx1, y_BxK]
      if reward_fn is None
      else reward_fn(reward_params, tokens_BxKxL, loss_mask_BxKxL)
    )
    return {"reward_BxK": reward, "target_logp_BxK": target}

  return score


def exact_logp_fn(graphdef, tb: Testbed, chunk: int):
  """params -> log π(y|x) for every prompt and response [X, Y] (one enumeration pass)."""
  from align_jax import logps  # Imported here: align_jax.logps imports the model stack.

  def logp_XxY(params):
    fn = lambda tokens: logps.next_token_logprobs(graphdef, params, tokens)
    return exact.prefix_logps(
      fn, jnp.asarray(tb.prompts_XxP), tb.responses_YxT.shape[1], language.V, chunk=chunk
    )

  return logp_XxY
