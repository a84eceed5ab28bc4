"""The GRPO family: losses against a loop-by-loop numpy transcription of the papers' formulas,
gradients against closed forms, the batch-wide aggregations, and bad settings."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import rollout
from align_jax.errors import ConfigError
from align_jax.objectives import grpo

B, K, T = 3, 4, 5


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _batch(seed=0, spread=0.3):
  """Ragged responses (lengths 1..T), policy a little off the sampler, rewards with a tie group."""
  rng = np.random.default_rng(seed)
  old = np.log(rng.uniform(0.05, 0.9, size=(B, K, T)))
  logp = old + spread * rng.normal(size=(B, K, T))
  ref = np.log(rng.uniform(0.05, 0.9, size=(B, K, T)))
  length = rng.integers(1, T + 1, size=(B, K))
  mask = (np.arange(T) < length[..., None]).astype(np.float64)
  reward = rng.normal(size=(B, K))
  reward[1] = 0.7  # A group without signal.
  example = np.array([1.0, 1.0, 0.0])  # The last prompt is padding.
  return logp, old, ref, mask, reward, example


# -------------------------------------------------------------------------------------------------
# numpy: every sum written out, from the papers' equations.


def np_k(logp, ref, estimator):
  d = ref - logp
  return {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - 1 - d}[estimator]


def np_advantage(r, scale):
  out = np.zeros_like(r)
  for b in range(r.shape[0]):
    mean = sum(r[b]) / len(r[b])
    std = np.sqrt(sum((x - mean) ** 2 for x in r[b]) / (len(r[b]) - 1))
    for k in range(r.shape[1]):
      out[b, k] = (r[b, k] - mean) / (std + 1e-4) if scale else r[b, k] - mean
  return out


def np_token_loss(ratio, a, lo, hi):
  return -min(ratio * a, min(max(ratio, 1 - lo), 1 + hi) * a)


def np_family(
  logp,
  old,
  ref,
  mask,
  reward,
  example,
  *,
  scale,
  lo,
  hi,
  agg,
  norm_len=0,
  beta=0.0,
  est="k3",
  kl_in="loss",
  kl_ratio=False,
  kl_level="token",
  seq_ratio=False,
  drop_equal=False,
  shaping=None,
):
  """The step's loss: Σ_b e_b loss_b / Σ_b e_b, as the papers define it over the batch."""
  r = reward + (0 if shaping is None else shaping)
  kl_seq = np.zeros((B, K))
  for b in range(B):
    for k in range(K):
      on = mask[b, k] > 0
      if kl_level == "token":
        kl_seq[b, k] = np_k(logp[b, k][on], ref[b, k][on], est).sum()
      else:
        kl_seq[b, k] = np_k(logp[b, k][on].sum(), ref[b, k][on].sum(), est)
  if beta and kl_in == "reward":
    r = r - beta * kl_seq
  a = np_advantage(r, scale)
  w = example * np.array([len(set(row)) > 1 for row in reward]) if drop_equal else example.copy()
  per_seq = np.zeros((B, K))
  token_sum, token_count = 0.0, 0.0
  for b in range(B):
    for k in range(K):
      n = int(mask[b, k].sum())
      if seq_ratio:
        s = np.exp(sum(logp[b, k, t] - old[b, k, t] for t in range(n)) / n)
        per_seq[b, k] = np_token_loss(s, a[b, k], lo, hi)
      else:
        terms = []
        for t in range(n):
          ratio = np.exp(logp[b, k, t] - old[b, k, t])
          term = np_token_loss(ratio, a[b, k], lo, hi)
          if beta and kl_in == "loss" and kl_level == "token":
            term += beta * np_k(logp[b, k, t], ref[b, k, t], est) * (ratio if kl_ratio else 1.0)
          terms.append(term)
        token_sum += w[b] * sum(terms)
        token_count += w[b] * n
        per_seq[b, k] = {
          "seq-mean-token-mean": sum(terms) / n,
          "seq-mean-token-sum": sum(terms),
          "seq-mean-token-sum-norm": sum(terms) / max(norm_len, 1e-30),
          "token-mean": 0.0,  # Summed over the batch below.
        }[agg]
      if beta and kl_in == "loss" and kl_level == "sequence":
        seq_ratio_value = np.exp(sum(logp[b, k, t] - old[b, k, t] for t in range(n)))
        per_seq[b, k] += beta * kl_seq[b, k] * (seq_ratio_value if kl_ratio else 1.0)
  if agg == "token-mean" and not seq_ratio:
    total = token_sum / token_count
    if beta and kl_in == "loss" and kl_level == "sequence":
      total += sum(w[b] * np.mean(per_seq[b]) for b in range(B)) / sum(w)
    return total
  return sum(w[b] * np.mean(per_seq[b]) for b in range(B)) / sum(w)


def _step_loss(fn, batch, **cfg):
  """What the step optimises: the example-weighted mean of loss_B."""
  logp, old, ref, mask, reward, example = map(jnp.asarray, batch)
  loss_B, metrics = fn(logp, old, ref, mask, reward, example, **cfg)
  return float(jnp.sum(example * loss_B) / jnp.sum(example)), metrics


CASES = [
  # (objective, its settings, the numpy transcription's settings)
  ("grpo", {}, dict(scale=True, lo=0.2, hi=0.2, agg="seq-mean-token-mean", beta=0.04)),
  (
    "grpo",
    dict(aggregation="token-mean", kl_estimator="k2", beta=0.1),
    dict(scale=True, lo=0.2, hi=0.2, agg="token-mean", beta=0.1, est="k2"),
  ),
  (
    "grpo",
    dict(aggregation="seq-mean-token-sum", kl_ratio=True, epsilon=0.1),
    dict(scale=True, lo=0.1, hi=0.1, agg="seq-mean-token-sum", beta=0.04, kl_ratio=True),
  ),
  (
    "grpo",
    dict(kl_in="reward", kl_estimator="k1", beta=0.3),
    dict(scale=True, lo=0.2, hi=0.2, agg="seq-mean-token-mean", beta=0.3, est="k1", kl_in="reward"),
  ),
  (
    "grpo",
    dict(kl_level="sequence", kl_ratio=True, beta=0.2),
    dict(scale=True, lo=0.2, hi=0.2, agg="seq-mean-token-mean", beta=0.2, kl_level="sequence")
    | dict(kl_ratio=True),
  ),
  (
    "grpo",
    dict(kl_level="sequence", aggregation="token-mean", kl_estimator="k2", beta=0.2),
    dict(scale=True, lo=0.2, hi=0.2, agg="token-mean", beta=0.2, kl_level="sequence", est="k2"),
  ),
  ("dr_grpo", dict(norm_len=7), dict(scale=False, lo=0.2, hi=0.2, agg="seq-mean-token-sum-norm")),
  (
    "dr_grpo",
    dict(norm_len=7, beta=0.5),
    dict(scale=False, lo=0.2, hi=0.2, agg="seq-mean-token-sum-norm", beta=0.5, est="k1")
    | dict(kl_in="reward"),
  ),
  ("dapo", {}, dict(scale=True, lo=0.2, hi=0.28, agg="token-mean", drop_equal=True)),
  (
    "dapo",
    dict(epsilon_low=0.1, epsilon_high=0.35, aggregation="seq-mean-token-mean"),
    dict(scale=True, lo=0.1, hi=0.35, agg="seq-mean-token-mean", drop_equal=True),
  ),
  ("gspo", {}, dict(scale=True, lo=3e-4, hi=4e-4, agg="seq-mean-token-sum", seq_ratio=True)),
  (
    "gspo",
    dict(epsilon_low=0.01, epsilon_high=0.02, beta=0.1, kl_in="loss", kl_estimator="k3"),
    dict(scale=True, lo=0.01, hi=0.02, agg="seq-mean-token-sum", seq_ratio=True, beta=0.1)
    | dict(kl_level="sequence", kl_in="loss", est="k3"),
  ),
]


@pytest.mark.parametrize("name, cfg, ref_cfg", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_equal_the_numpy_transcription_of_the_formulas(name, cfg, ref_cfg, seed):
  batch = _batch(seed)
  cfg = {"norm_len": 7, **cfg} if name == "dr_grpo" else cfg
  got, metrics = _step_loss(getattr(grpo, name), batch, **cfg)
  want = np_family(*batch, norm_len=cfg.get("norm_len", 0), **ref_cfg)
  assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
  assert all(m.shape == (B,) for m in metrics.values())
  clipped = float(jnp.sum(batch[5] * metrics["clip_fraction"]))
  if name in ("grpo", "dr_grpo", "dapo"):  # ρ deviates by ~30 %: some tokens are clipped.
    assert clipped > 0


def test_dapo_overlong_shaping_enters_the_reward():
  batch = _batch(2)
  mask = batch[3]
  length = mask.sum(-1)
  shaping = np.where(length <= 3, 0.0, np.where(length <= 4, (3 - length) / 1.0, -1.0))
  got, _ = _step_loss(grpo.dapo, batch, overlong_max_len=4, overlong_buffer=1)
  want = np_family(
    *batch, scale=True, lo=0.2, hi=0.28, agg="token-mean", drop_equal=True, shaping=shaping
  )
  assert got == pytest.approx(want, rel=1e-10)
  assert got != pytest.approx(_step_loss(grpo.dapo, batch)[0], rel=1e-6)  # The shaping matters.


def test_on_policy_gradients_are_the_closed_forms():
  """At π = π_old (ratio 1, nothing clipped) the step loss's gradient is ∂/∂log π_{b,k,t} =
  −A_{b,k}·c: c = 1/(B·K·|y|) for GRPO's sequence-mean of token-means, 1/(B·K·n) for Dr. GRPO,
  w_b/Σ_b w_b·|y_b| for DAPO's token mean over the informative groups (w), and for GSPO
  1/(B·K·|y|) as well (∂s/∂log π_t = s/|y| with s = 1)."""
  logp, _, ref, mask, reward, _ = _batch(3)
  example = np.ones(B)
  length = mask.sum(-1)
  scaled, centred = np_advantage(reward, True), np_advantage(reward, False)
  informative = np.array([len(set(row)) > 1 for row in reward], np.float64)[:, None]
  cases = {
    "grpo": (dict(beta=0.0), -scaled / (B * K * length)),
    "dr_grpo": (dict(norm_len=6), -centred / (B * K * 6)),
    "dapo": ({}, -scaled * informative / (informative * length).sum()),
    "gspo": ({}, -scaled / (B * K * length)),
  }
  for name, (cfg, coef_BxK) in cases.items():

    def loss(lp, fn=getattr(grpo, name), cfg=cfg):
      loss_B, _ = fn(lp, jax.lax.stop_gradient(lp), ref, mask, reward, example, **cfg)
      return jnp.sum(example * loss_B) / jnp.sum(example)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(logp)))
    np.testing.assert_allclose(
      grad, coef_BxK[..., None] * mask, rtol=1e-9, atol=1e-12, err_msg=name
    )
  assert informative.sum() == B - 1  # The tie group is dropped by DAPO.


def test_clipped_tokens_carry_no_gradient():
  """ρ = 1.5 > 1 + ε_high with A > 0 and ρ = 0.5 < 1 − ε_low with A < 0: clipped, zero
  gradient; the other two signs keep −A·ρ's gradient."""
  log_ratio = jnp.log(jnp.array([1.5, 0.5, 1.5, 0.5]))
  adv = jnp.array([1.0, -1.0, -1.0, 1.0])
  grad = jax.grad(
    lambda x: jnp.sum(grpo.clipped_surrogate(x, adv, epsilon_low=0.2, epsilon_high=0.28)[0])
  )(log_ratio)
  np.testing.assert_allclose(grad, [0.0, 0.0, 1.5, -0.5], atol=1e-12)


def test_token_mean_is_one_mean_over_the_batch_tokens():
  """Σ_b e_b·loss_B / Σ_b e_b of `aggregate` = Σ w·m·ℓ / Σ w·m for any prompt weights w."""
  rng = np.random.default_rng(4)
  loss = rng.normal(size=(B, K, T))
  mask = (rng.random((B, K, T)) < 0.6).astype(np.float64)
  example, weight = np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])
  loss_B = grpo.aggregate(*map(jnp.asarray, (loss, mask, weight, example)), "token-mean")
  got = float(jnp.sum(example * loss_B) / example.sum())
  assert got == pytest.approx((loss[0] * mask[0]).sum() / mask[0].sum(), rel=1e-12)


def test_doctests():
  for module in (grpo, rollout):
    result = doctest.testmod(module, extraglobs={"jnp": jnp}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda b: grpo.grpo(*(x[:, :1] for x in b[:5]), b[5]), "at least 2 samples per prompt"),
    (lambda b: grpo.dapo(*b, epsilon_low=1.0), r"epsilon_low=1.0 must be in \[0, 1\)"),
    (lambda b: grpo.grpo(*b, epsilon=1.5), r"epsilon_low=1.5 must be in \[0, 1\)"),
    (lambda b: grpo.grpo(*b, aggregation="mean"), "aggregation 'mean' is unknown"),
    (lambda b: grpo.dr_grpo(*b, norm_len=0), "needs norm_len > 0"),
    (lambda b: grpo.grpo(*b, kl_estimator="k4"), "kl_estimator 'k4' is unknown"),
    (lambda b: grpo.grpo(*b, kl_in="advantage"), "kl_in 'advantage' is unknown"),
    (lambda b: grpo.gspo(*b, beta=0.1, kl_in="loss", kl_level="token"), "needs kl_level=sequence"),
    (lambda b: grpo.dapo(*b, overlong_max_len=8, overlong_buffer=0), "overlong_buffer=0"),
  ],
)
def test_bad_settings_are_one_line_config_errors(call, message):
  batch = tuple(map(jnp.asarray, _batch()))
  with pytest.raises(ConfigError, match=message):
    call(batch)
