"""f-DPG (ALGORITHMS.md §1): §7.1 vectors, exact expected gradients, Ẑ, baselines, support rules."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import targets
from align_jax.objectives import fdpg
from align_jax.testbed import exact

# ALGORITHMS.md §7.1: base a, reward r (β = 1), policy logits θ, the batch x ~ q = a, pointwise b.
A = [0.4, 0.3, 0.2, 0.1]
REWARD = [1.0, 0.0, 2.0, -1.0]
THETA = [0.0, 0.5, -0.5, 1.0]
BATCH = [0, 2, 2, 3, 1]
B_POINTWISE = [1.0, 0.0, 1.0, 1.0]
Z = 2.901912

# Every divergence of the table in §1.4, with the Amari order where it has one.
CONFIGS = {
  "forward_kl": {"divergence": "forward_kl"},
  "reverse_kl": {"divergence": "reverse_kl"},
  "tv": {"divergence": "tv"},
  "js": {"divergence": "js"},
  "amari_0.5": {"divergence": "amari", "alpha": 0.5},
  "amari_-0.7": {"divergence": "amari", "alpha": -0.7},
  "amari_2.5": {"divergence": "amari", "alpha": 2.5},
  "pearson": {"divergence": "pearson"},
  "neyman": {"divergence": "neyman"},
}
# The same divergences as NumPy f(t) and lim_{t→∞} f(t)/t (the perspective's value where p = 0 < π).


def _f_numpy(t, divergence, alpha=None):
  with np.errstate(divide="ignore", invalid="ignore"):
    if divergence == "forward_kl":
      return -np.log(t), 0.0
    if divergence == "reverse_kl":
      return t * np.log(t), np.inf
    if divergence == "tv":
      return 0.5 * np.abs(t - 1.0), 0.5
    if divergence == "js":
      return 0.5 * (t * np.log(2 * t / (1 + t)) + np.log(2 / (1 + t))), 0.5 * np.log(2.0)
    if divergence == "amari":
      f = (t**alpha - alpha * t - (1 - alpha)) / (alpha * (alpha - 1))
      return f, (1.0 / (1.0 - alpha) if alpha < 1 else np.inf)
    if divergence == "pearson":
      return (t - 1.0) ** 2, np.inf
    return (t - 1.0) ** 2 / t, 1.0  # neyman


def _f_at_zero(divergence, alpha=None):
  """f(0) (where 0·log 0 = 0)."""
  if divergence == "amari":
    return 1.0 / alpha if alpha > 0 else np.inf
  return {
    "forward_kl": np.inf,
    "reverse_kl": 0.0,
    "tv": 0.5,
    "js": 0.5 * np.log(2.0),
    "pearson": 1.0,
    "neyman": np.inf,
  }[divergence]


def _f_divergence_numpy(logpi_XxY, logp_XxY, prompt_logw_X, divergence, alpha=None):
  """Σ_x w_x Σ_y p f(π/p), with p·f(π/p) → π·lim f(t)/t where p = 0 and 0 where both are 0."""
  pi, p, w = np.exp(logpi_XxY), np.exp(logp_XxY), np.exp(prompt_logw_X)
  total = 0.0
  for x in range(pi.shape[0]):
    for y in range(pi.shape[1]):
      if p[x, y] > 0:
        f = (
          _f_numpy(pi[x, y] / p[x, y], divergence, alpha)[0]
          if pi[x, y] > 0
          else _f_at_zero(divergence, alpha)
        )
        total += w[x] * p[x, y] * f
      elif pi[x, y] > 0:
        total += w[x] * pi[x, y] * _f_numpy(1.0, divergence, alpha)[1]
  return total


@pytest.fixture(autouse=True)
def _float64():
  """§7.1's 6-decimal values are checked to 1e-6, so every test runs with float64 enabled."""
  with jax.enable_x64(True):
    yield


def _rlhf_7_1():
  """(log a, log P, log Z, log p, log π) of §7.1 in float64."""
  log_a = jnp.log(jnp.asarray(A, jnp.float64))
  log_P = targets.rlhf(log_a, jnp.asarray(REWARD, jnp.float64), 1.0)
  log_z = jax.nn.logsumexp(log_P)
  return log_a, log_P, log_z, log_P - log_z, jax.nn.log_softmax(jnp.asarray(THETA, jnp.float64))


def _random_table(seed, x=4, y=16, zeros=0):
  """θ, an unnormalised log P (its own Z per prompt; `zeros` responses per prompt outside the
  support), a proposal log q and log prompt weights, all [X, Y] / [X] float64."""
  rng = np.random.default_rng(seed)
  theta = rng.normal(size=(x, y))
  log_P = 1.5 * rng.normal(size=(x, y)) + 2.0 * rng.normal(size=(x, 1))
  for row in range(x):
    log_P[row, rng.choice(y, size=zeros, replace=False)] = -np.inf
  log_q = exact.normalize(jnp.asarray(rng.normal(size=(x, y))))
  prompt_logw = jax.nn.log_softmax(jnp.asarray(rng.normal(size=x)))
  return jnp.asarray(theta), jnp.asarray(log_P), log_q, prompt_logw


def _expected_surrogate_grad(
  theta_XxY, log_P_XxY, log_q_XxY, prompt_logw_X, baseline_X, log_z_X=None, **kw
):
  """∇θ Σ_x w_x Σ_y q(y|x) loss(x, y): each (x, y) is one prompt row with K = 1 and exact Z_x."""
  num_y = theta_XxY.shape[1]
  if log_z_X is None:
    log_z_X = jax.nn.logsumexp(log_P_XxY, axis=-1)
  weight_N = (jnp.exp(prompt_logw_X)[:, None] * jnp.exp(log_q_XxY)).reshape(-1)

  def expected_loss(theta):
    logpi_XxY = jax.nn.log_softmax(theta, axis=-1)
    loss_N, _, _ = fdpg.fdpg(
      logpi_XxY.reshape(-1, 1),
      log_q_XxY.reshape(-1, 1),
      log_P_XxY.reshape(-1, 1),
      jnp.repeat(log_z_X, num_y),
      jnp.repeat(jnp.broadcast_to(baseline_X, log_z_X.shape), num_y),
      **kw,
    )
    return jnp.sum(weight_N * loss_N)

  return jax.grad(expected_loss)(theta_XxY)


def _exact_grad(theta_XxY, log_P_XxY, prompt_logw_X, divergence, alpha=None):
  log_p_XxY = exact.normalize(log_P_XxY)
  return jax.grad(
    lambda t: exact.f_divergence(
      jax.nn.log_softmax(t, axis=-1), log_p_XxY, prompt_logw_X, divergence, alpha=alpha
    )
  )(theta_XxY)


def test_docstring_examples():
  with jax.enable_x64(False):  # The examples show float32, the default dtype.
    for module in (fdpg, exact):  # exact: `f_divergence`'s examples.
      result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
      assert result.attempted > 0 and result.failed == 0, module.__name__


# -------------------------------------------------------------------------------------------------
# §7.1 exactly (float64, 1e-6).


def test_section_7_1_target_and_partition_function():
  log_a, log_P, log_z, log_p, logpi = _rlhf_7_1()
  np.testing.assert_allclose(jnp.exp(log_P), [1.087313, 0.3, 1.477811, 0.036788], atol=1e-6)
  np.testing.assert_allclose(jnp.exp(log_z), Z, atol=1e-6)
  np.testing.assert_allclose(jnp.exp(log_p), [0.374688, 0.103380, 0.509254, 0.012677], atol=1e-6)
  np.testing.assert_allclose(jnp.exp(logpi), [0.167405, 0.276004, 0.101536, 0.455054], atol=1e-6)
  np.testing.assert_allclose(
    exact.normalize(targets.rlhf(log_a[None], jnp.asarray([REWARD]), 1.0))[0], log_p, atol=1e-12
  )
  # §1.11.6: E_q[P/q] = Z by enumeration, for q = a.
  np.testing.assert_allclose(jnp.sum(jnp.exp(log_a) * jnp.exp(log_P - log_a)), Z, atol=1e-6)


SECTION_7_1_ROWS = {  # value, pseudo-reward per outcome, closed-form ∇θ D.
  "forward_kl": (
    0.976155,
    [2.238214, 0.374560, 5.015489, 0.027859],
    [-0.207283, 0.172624, -0.407718, 0.442377],
  ),
  "reverse_kl": (
    1.601807,
    [-0.194322, -1.982004, 0.612531, -4.580616],
    [-0.403025, -0.171068, -0.326372, 0.900466],
  ),
  "tv": (0.615001, [0.5, -0.5, 0.5, -0.5], [-0.122383, 0.074229, -0.074229, 0.122383]),
  "js": (
    0.247983,
    [0.240937, -0.187507, 0.550595, -0.332835],
    [-0.058242, 0.022228, -0.066767, 0.102780],
  ),
  "amari_0.5": (
    1.109147,
    [0.992132, -0.775974, 2.479058, -1.666183],
    [-0.258926, 0.061108, -0.308024, 0.505842],
  ),
}


@pytest.mark.parametrize("name", sorted(SECTION_7_1_ROWS))
def test_section_7_1_divergence_rows(name):
  value, reward, grad = SECTION_7_1_ROWS[name]
  cfg = CONFIGS[name]
  _, log_P, _, log_p, logpi = _rlhf_7_1()
  theta = jnp.asarray([THETA], jnp.float64)
  np.testing.assert_allclose(
    exact.f_divergence(logpi[None], log_p[None], jnp.zeros(1), **cfg), value, atol=1e-6
  )
  reward_Y = fdpg.pseudo_reward(logpi - log_p, **cfg)
  np.testing.assert_allclose(reward_Y, reward, atol=1e-6)
  # Autodiff of the exact divergence, the closed form π_k(f'(t_k) − Σ_x π_x f'(t_x)) with f' = −R
  # (§1.11.2), and the expected surrogate gradient under q = a with an arbitrary fixed baseline.
  pi = jnp.exp(logpi)
  closed_form = pi * (-reward_Y + jnp.sum(pi * reward_Y))
  autodiff = _exact_grad(theta, log_P[None], jnp.zeros(1), **cfg)[0]
  surrogate = _expected_surrogate_grad(
    theta, log_P[None], jnp.log(jnp.asarray([A])), jnp.zeros(1), jnp.asarray([0.7]), **cfg
  )[0]
  for g in (closed_form, autodiff, surrogate):
    np.testing.assert_allclose(g, grad, atol=1e-6)


SECTION_7_1_BATCH = {  # baseline B, loss value, ∇θ loss.
  "forward_kl": (2.534322, -1.199439, [-0.343420, -0.209665, -0.727185, 1.280269]),
  "reverse_kl": (-1.106376, -1.762055, [-0.561423, -0.638646, -0.643280, 1.843348]),
  "tv": (0.1, -0.326422, [-0.124174, -0.039125, -0.136237, 0.299536]),
  "js": (0.164357, -0.248754, [-0.078796, -0.054600, -0.122339, 0.255734]),
}
SECTION_7_1_WEIGHTS = [0.418513, 0.507682, 0.507682, 4.550542, 0.920014]


def _section_7_1_batch(theta, log_z=None, **kw):
  """fdpg on §7.1's batch x = [0, 2, 2, 3, 1] from q = a, as one prompt with K = 5."""
  log_a, log_P, exact_log_z, _, _ = _rlhf_7_1()
  x = jnp.asarray(BATCH)
  logpi = jax.nn.log_softmax(theta)[x][None]
  return fdpg.fdpg(
    logpi, log_a[x][None], log_P[x][None], exact_log_z if log_z is None else log_z, **kw
  )


@pytest.mark.parametrize("divergence", sorted(SECTION_7_1_BATCH))
def test_section_7_1_per_batch_estimator(divergence):
  baseline, value, grad = SECTION_7_1_BATCH[divergence]
  theta = jnp.asarray(THETA, jnp.float64)
  loss_fn = lambda t: _section_7_1_batch(t, baseline_B=baseline, divergence=divergence)[0][0]
  np.testing.assert_allclose(loss_fn(theta), value, atol=1e-6)
  np.testing.assert_allclose(jax.grad(loss_fn)(theta), grad, atol=1e-6)
  _, metrics, samples = _section_7_1_batch(theta, baseline_B=baseline, divergence=divergence)
  # The table's B is the batch mean of the pseudo-rewards (exact Z).
  np.testing.assert_allclose(metrics["pseudo_reward"], [baseline], atol=1e-6)
  np.testing.assert_allclose(jnp.mean(samples["pseudo_reward_BxK"]), baseline, atol=1e-6)
  w = np.asarray(SECTION_7_1_WEIGHTS)
  np.testing.assert_allclose(metrics["importance_weight"], [w.mean()], atol=1e-6)
  np.testing.assert_allclose(
    metrics["ess_fraction"], [w.sum() ** 2 / (5 * np.sum(w**2))], atol=1e-6
  )
  np.testing.assert_allclose(metrics["support_fraction"], [1.0], atol=0)


def test_section_7_1_importance_weights_and_formula():
  """w = π/q at the batch, and ∇θ loss = −(1/N) Σ_i w_i A_i (e_{x_i} − π) (§7.1's formula)."""
  log_a, _, _, _, logpi = _rlhf_7_1()
  x = jnp.asarray(BATCH)
  np.testing.assert_allclose(jnp.exp(logpi[x] - log_a[x]), SECTION_7_1_WEIGHTS, atol=1e-6)
  theta = jnp.asarray(THETA, jnp.float64)
  _, _, samples = _section_7_1_batch(theta, baseline_B=0.1, divergence="tv")
  adv = samples["pseudo_reward_BxK"][0] - 0.1
  onehot = jax.nn.one_hot(x, 4, dtype=jnp.float64)
  formula = -jnp.mean(
    (jnp.asarray(SECTION_7_1_WEIGHTS) * adv)[:, None] * (onehot - jnp.exp(logpi)), axis=0
  )
  np.testing.assert_allclose(formula, SECTION_7_1_BATCH["tv"][2], atol=1e-6)


def test_section_7_1_batch_z_and_is_metrics():
  log_a, log_P, _, _, _ = _rlhf_7_1()
  x = jnp.asarray(BATCH)
  log_z, count = fdpg.update_log_z(
    jnp.full(1, -jnp.inf), jnp.zeros(1), jnp.zeros(1, jnp.int32), (log_P - log_a)[x][None]
  )
  np.testing.assert_allclose(log_z, [1.327832], atol=1e-6)
  np.testing.assert_allclose(jnp.exp(log_z), [3.772855], atol=1e-6)
  np.testing.assert_allclose(count, [5.0], atol=0)
  _, m, _ = _section_7_1_batch(
    jnp.asarray(THETA, jnp.float64), log_z=log_z, baseline_B=0.0, divergence="js"
  )
  np.testing.assert_allclose(m["kl_target_policy"], [0.994993], atol=1e-6)
  np.testing.assert_allclose(m["kl_policy_target"], [3.406973], atol=1e-6)
  np.testing.assert_allclose(m["tv"], [0.831156], atol=1e-6)


def test_section_7_1_pointwise_target():
  log_a, _, _, _, logpi = _rlhf_7_1()
  log_P = targets.pointwise(log_a, jnp.asarray(B_POINTWISE))
  log_z = jax.nn.logsumexp(log_P)
  log_p = log_P - log_z
  np.testing.assert_allclose(jnp.exp(log_z), 0.7, atol=1e-12)
  np.testing.assert_allclose(jnp.exp(log_p), [0.571429, 0.0, 0.285714, 0.142857], atol=1e-6)
  d = lambda name: exact.f_divergence(logpi[None], log_p[None], jnp.zeros(1), name)
  np.testing.assert_allclose(
    [d("forward_kl"), d("tv"), d("js")], [0.831639, 0.588201, 0.219689], atol=1e-6
  )
  assert d("reverse_kl") == jnp.inf
  # Excluded outcome x = 1: ℓ = +∞.
  ell = (logpi - log_p)[1]
  assert ell == jnp.inf
  got = [fdpg.pseudo_reward(ell, k) for k in ("forward_kl", "tv", "js", "reverse_kl")]
  np.testing.assert_allclose(got[:3], [0.0, -0.5, -0.346574], atol=1e-6)
  assert got[3] == -jnp.inf
  # The same limits inside the estimator, and the batch's support fraction 4/5.
  theta = jnp.asarray(THETA, jnp.float64)
  x = jnp.asarray(BATCH)
  for name, limit in (("forward_kl", 0.0), ("tv", -0.5), ("js", -0.5 * np.log(2.0))):
    _, m, s = fdpg.fdpg(
      jax.nn.log_softmax(theta)[x][None],
      log_a[x][None],
      log_P[x][None],
      log_z,
      0.0,
      divergence=name,
      outside_support="limit",
    )
    np.testing.assert_allclose(s["pseudo_reward_BxK"][0, 4], limit, atol=1e-12)
    np.testing.assert_allclose(m["support_fraction"], [0.8], atol=1e-12)


# -------------------------------------------------------------------------------------------------
# Exact divergences: closed forms against the definition E_p[f(π/p)], and exact.py for KL / TV / JS.


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_f_divergence_matches_definition(name):
  cfg = CONFIGS[name]
  theta, log_P, _, prompt_logw = _random_table(1, zeros=2)
  logpi = jax.nn.log_softmax(theta, axis=-1)
  log_p = exact.normalize(log_P)
  # One zero of π inside p's support, one zero of both (the 0·f(0/0) = 0 convention).
  off = int(np.argmax(np.isinf(np.asarray(log_p[0]))))
  on = int(np.argmax(np.isfinite(np.asarray(log_p[0]))))
  logpi = exact.normalize(logpi.at[0, on].set(-jnp.inf).at[0, off].set(-jnp.inf))
  for lpi in (jax.nn.log_softmax(theta, axis=-1), logpi):
    expected = _f_divergence_numpy(
      np.asarray(lpi), np.asarray(log_p), np.asarray(prompt_logw), **cfg
    )
    got = exact.f_divergence(lpi, log_p, prompt_logw, **cfg)
    if np.isinf(expected):
      assert got == expected
    else:
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_f_divergence_kl_tv_js_are_exact_py():
  theta, log_P, _, prompt_logw = _random_table(2)
  logpi, log_p = jax.nn.log_softmax(theta, axis=-1), exact.normalize(log_P)
  f = lambda name: exact.f_divergence(logpi, log_p, prompt_logw, name)
  metrics = exact.policy_metrics(logpi, logpi, jnp.zeros_like(logpi), prompt_logw, log_p)
  np.testing.assert_allclose(f("forward_kl"), metrics["exact/kl_target_policy"], atol=1e-14)
  np.testing.assert_allclose(f("reverse_kl"), metrics["exact/kl_policy_target"], atol=1e-14)
  np.testing.assert_allclose(f("tv"), metrics["exact/tv"], atol=1e-14)
  np.testing.assert_allclose(f("js"), metrics["exact/js"], atol=1e-14)
  # Amari α → 1 is reverse KL, α → 0 forward KL; α = ½ is 2 Σ(√π − √p)².
  amari = lambda a: exact.f_divergence(logpi, log_p, prompt_logw, "amari", alpha=a)
  np.testing.assert_allclose(amari(1 - 1e-6), f("reverse_kl"), rtol=1e-5)
  np.testing.assert_allclose(amari(1e-6), f("forward_kl"), rtol=1e-5)
  hellinger_X = 2 * jnp.sum((jnp.exp(0.5 * logpi) - jnp.exp(0.5 * log_p)) ** 2, axis=-1)
  np.testing.assert_allclose(amari(0.5), jnp.sum(jnp.exp(prompt_logw) * hellinger_X), rtol=1e-12)


# -------------------------------------------------------------------------------------------------
# §1.11.1–3: the expected surrogate gradient is the exact gradient, for every divergence.


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_expected_gradient_categorical(name):
  """§7.1's 4-outcome categorical (RLHF target, q = a) for every divergence and several baselines."""
  log_a, log_P, _, _, _ = _rlhf_7_1()
  theta, log_P, log_q, prompt_logw = (
    jnp.asarray([THETA], jnp.float64),
    log_P[None],
    log_a[None],
    jnp.zeros(1),
  )
  exact_grad = _exact_grad(theta, log_P, prompt_logw, **CONFIGS[name])
  assert np.max(np.abs(exact_grad)) > 1e-3
  for baseline in (0.0, 0.37, -2.0):
    got = _expected_surrogate_grad(
      theta, log_P, log_q, prompt_logw, jnp.asarray([baseline]), **CONFIGS[name]
    )
    np.testing.assert_allclose(got, exact_grad, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_expected_gradient_conditional_table(name):
  """X = 4 prompts with their own Z_x and weights, Y = 16, a per-prompt baseline."""
  theta, log_P, log_q, prompt_logw = _random_table(4)
  exact_grad = _exact_grad(theta, log_P, prompt_logw, **CONFIGS[name])
  baseline_X = jnp.asarray([0.3, -1.0, 2.0, 0.0])
  got = _expected_surrogate_grad(theta, log_P, log_q, prompt_logw, baseline_X, **CONFIGS[name])
  np.testing.assert_allclose(got, exact_grad, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_expected_gradient_bxk_layout_with_padding(name):
  """B = X prompts, K = Y + 3: every response once from a uniform q plus 3 garbage padding columns;
  Σ_x w_x loss_x is then the exact expected surrogate and its gradient the exact gradient."""
  theta, log_P, _, prompt_logw = _random_table(5)
  num_x, num_y = theta.shape
  log_z_X = jax.nn.logsumexp(log_P, axis=-1)
  pad = jnp.full((num_x, 3), jnp.nan)
  mask = jnp.concatenate([jnp.ones((num_x, num_y)), jnp.zeros((num_x, 3))], axis=1)
  log_q = jnp.concatenate([jnp.full((num_x, num_y), -np.log(num_y)), pad], axis=1)
  target = jnp.concatenate([log_P, pad], axis=1)

  def loss(t):
    logpi = jax.nn.log_softmax(t, axis=-1)
    logp_BxK = jnp.concatenate([logpi, jnp.full((num_x, 3), -jnp.inf)], axis=1)
    loss_B, metrics, _ = fdpg.fdpg(
      logp_BxK, log_q, target, log_z_X, 0.25, sample_mask_BxK=mask, **CONFIGS[name]
    )
    return jnp.sum(jnp.exp(prompt_logw) * loss_B), metrics

  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(theta)
  assert np.isfinite(value) and all(np.all(np.isfinite(v)) for v in metrics.values())
  np.testing.assert_allclose(
    grad, _exact_grad(theta, log_P, prompt_logw, **CONFIGS[name]), atol=1e-9
  )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_at_the_target_pseudo_reward_is_constant_and_gradient_zero(name):
  cfg = CONFIGS[name]
  theta, _, log_q, prompt_logw = _random_table(6)
  logpi = jax.nn.log_softmax(theta, axis=-1)
  # π = p with ℓ = 0 exactly: log P = log π and Z = 1.
  reward = fdpg.pseudo_reward(jnp.zeros(3), **cfg)
  np.testing.assert_allclose(reward, reward[0], atol=0)
  grad = _expected_surrogate_grad(
    theta, logpi, log_q, prompt_logw, jnp.zeros(4), log_z_X=jnp.zeros(4), **cfg
  )
  np.testing.assert_allclose(grad, 0.0, atol=1e-12)
  exact_grad = jax.grad(
    lambda t: exact.f_divergence(jax.nn.log_softmax(t, axis=-1), logpi, prompt_logw, **cfg)
  )(theta)
  np.testing.assert_allclose(exact_grad, 0.0, atol=1e-12)


def test_forward_kl_exact_baseline_is_the_mean_pseudo_reward():
  """E_q[w (R − 1)] = E_π[p/π] − 1 = 0: B = 1 is forward KL's exact baseline."""
  theta, log_P, log_q, _ = _random_table(7)
  logpi, log_p = jax.nn.log_softmax(theta, axis=-1), exact.normalize(log_P)
  adv = fdpg.pseudo_reward(logpi - log_p, "forward_kl") - fdpg.FORWARD_KL_BASELINE
  np.testing.assert_allclose(
    jnp.sum(jnp.exp(log_q) * jnp.exp(logpi - log_q) * adv, axis=-1), 0.0, atol=1e-12
  )


# -------------------------------------------------------------------------------------------------
# §1.7: RLHF is reverse KL to a·e^{r/β}.


def test_rlhf_identity():
  rng = np.random.default_rng(8)
  beta = 0.7
  log_a = exact.normalize(jnp.asarray(rng.normal(size=(4, 16))))
  reward = jnp.asarray(rng.normal(size=(4, 16)))
  logpi = exact.normalize(jnp.asarray(rng.normal(size=(4, 16))))
  prompt_logw = jax.nn.log_softmax(jnp.asarray(rng.normal(size=4)))
  log_P = targets.rlhf(log_a, reward, beta)
  log_z_X = jax.nn.logsumexp(log_P, axis=-1)
  log_p = log_P - log_z_X[:, None]
  np.testing.assert_allclose(log_p, exact.normalize(targets.rlhf(log_a, reward, beta)), atol=1e-12)
  lhs = exact.f_divergence(logpi, log_p, prompt_logw, "reverse_kl")
  w = jnp.exp(prompt_logw)
  rhs = (
    jnp.sum(w * log_z_X)
    - (exact.expectation(logpi, reward, prompt_logw) - beta * exact.kl(logpi, log_a, prompt_logw))
    / beta
  )
  np.testing.assert_allclose(lhs, rhs, atol=1e-12)
  # The pseudo-reward is the KL-penalised reward / β minus a per-prompt constant.
  np.testing.assert_allclose(
    fdpg.pseudo_reward(logpi - log_p, "reverse_kl"),
    reward / beta - (logpi - log_a) - (log_z_X[:, None] + 1),
    atol=1e-12,
  )
  # §7.1: both sides 1.601807.
  log_a1, _, log_z1, log_p1, logpi1 = _rlhf_7_1()
  r1 = jnp.asarray(REWARD, jnp.float64)
  kl_a = exact.kl(logpi1[None], log_a1[None], jnp.zeros(1))
  rhs1 = log_z1 - (jnp.sum(jnp.exp(logpi1) * r1) - kl_a)
  np.testing.assert_allclose(
    [exact.f_divergence(logpi1[None], log_p1[None], jnp.zeros(1), "reverse_kl"), rhs1],
    1.601807,
    atol=1e-6,
  )


# -------------------------------------------------------------------------------------------------
# IS metrics (§1.8) and the proposal update (§1.6).


def _enumerated_batch(seed):
  """Every response of every prompt once from a uniform q: the IS means are exact expectations."""
  theta, log_P, _, prompt_logw = _random_table(seed)
  logpi = jax.nn.log_softmax(theta, axis=-1)
  log_q = jnp.full(logpi.shape, -np.log(logpi.shape[1]))
  return logpi, log_q, log_P, jax.nn.logsumexp(log_P, axis=-1), prompt_logw


def test_is_metrics_are_exact_under_enumeration():
  logpi, log_q, log_P, log_z_X, prompt_logw = _enumerated_batch(9)
  _, m, _ = fdpg.fdpg(logpi, log_q, log_P, log_z_X, 0.0, divergence="js")
  log_p = log_P - log_z_X[:, None]
  for key, name in (
    ("kl_target_policy", "forward_kl"),
    ("kl_policy_target", "reverse_kl"),
    ("tv", "tv"),
    ("js", "js"),
  ):
    per_prompt = [
      exact.f_divergence(logpi[x : x + 1], log_p[x : x + 1], jnp.zeros(1), name) for x in range(4)
    ]
    np.testing.assert_allclose(m[key], per_prompt, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("criterion", ["kl", "tv"])
def test_proposal_update_rule_is_exact_under_enumeration(criterion):
  """q uniform, every response once: the rule is the exact comparison D(p‖π) < D(p‖q)."""
  exact_fn = exact.kl if criterion == "kl" else exact.tv
  decisions = []
  for seed, mix in ((10, 0.9), (11, 0.3), (12, -0.3), (13, 2.5), (14, 1.8)):
    _, log_P, _, _ = _random_table(seed)
    log_z_X = jax.nn.logsumexp(log_P, axis=-1)
    log_p = log_P - log_z_X[:, None]
    log_q = jnp.full(log_P.shape, -np.log(16.0))
    logpi = exact.normalize(mix * log_p + (1 - mix) * log_q)  # Between q and p, or beyond either.
    w = jnp.full(4, -np.log(4.0))  # The rule averages the prompts uniformly.
    expected = bool(exact_fn(log_p, logpi, w) < exact_fn(log_p, log_q, w))
    got = fdpg.proposal_should_update(logpi, log_q, log_P, log_z_X, criterion=criterion)
    assert got.dtype == jnp.bool_ and got.shape == ()
    assert bool(got) == expected, (seed, mix)
    decisions.append(expected)
    # A padding prompt and a prompt without Ẑ do not change the decision, however far off they are.
    extra = lambda t, v: jnp.concatenate([t, v])
    for log_z_pad, prompt_mask in ((jnp.array([-jnp.inf]), None), (log_z_X[:1], [1, 1, 1, 1, 0])):
      padded = fdpg.proposal_should_update(
        extra(logpi, log_q[:1]),
        extra(log_q, log_q[:1]),
        extra(log_P, log_P[:1] + 50.0),
        extra(log_z_X, log_z_pad),
        criterion=criterion,
        prompt_mask_B=prompt_mask,
      )
      assert bool(padded) == expected
  assert set(decisions) == {True, False}


def test_proposal_update_on_proposal_samples():
  """Samples of a non-uniform q with their own log q: π = p is always closer than q ≠ p."""
  _, log_P, log_q, _ = _random_table(14)
  rng = np.random.default_rng(14)
  idx = np.stack([rng.choice(16, size=16, p=np.exp(np.asarray(log_q[x]))) for x in range(4)])
  take = lambda t: jnp.take_along_axis(t, jnp.asarray(idx), axis=1)
  log_z_X = jax.nn.logsumexp(log_P, axis=-1)
  log_p = log_P - log_z_X[:, None]
  assert fdpg.proposal_should_update(take(log_p), take(log_q), take(log_P), log_z_X)
  assert not fdpg.proposal_should_update(take(log_q), take(log_q), take(log_P), log_z_X)


# -------------------------------------------------------------------------------------------------
# Running statistics: Ẑ (§1.3) and the baseline window (§1.5).


def test_update_log_z_is_the_pooled_count_weighted_mean():
  rng = np.random.default_rng(15)
  ratios1 = rng.normal(size=(3, 4))
  ratios2 = rng.normal(size=(2, 7))
  mask2 = np.ones((2, 7))
  mask2[1, 5:] = 0
  prompt1, prompt2 = np.array([0, 2, 0]), np.array([2, 0])
  ratios1[1, 0] = -np.inf  # A sample outside the support counts as a zero term.
  update = jax.jit(fdpg.update_log_z)
  log_z, count = update(
    jnp.full(4, -jnp.inf), jnp.zeros(4), jnp.asarray(prompt1), jnp.asarray(ratios1)
  )
  log_z, count = update(
    log_z,
    count,
    jnp.asarray(prompt2),
    jnp.asarray(np.where(mask2 > 0, ratios2, np.nan)),
    jnp.asarray(mask2),
  )
  for x in range(4):
    pooled = [np.exp(ratios1[b]) for b in range(3) if prompt1[b] == x]
    pooled += [np.exp(ratios2[b][mask2[b] > 0]) for b in range(2) if prompt2[b] == x]
    values = np.concatenate(pooled) if pooled else np.zeros(0)
    np.testing.assert_allclose(count[x], values.size, atol=0)
    if values.size:
      np.testing.assert_allclose(jnp.exp(log_z[x]), values.mean(), rtol=1e-12)
  assert log_z[1] == -jnp.inf and log_z[3] == -jnp.inf and count[3] == 0


def test_update_log_z_context_without_support_stays_inf_then_counts_its_zeros():
  log_z, count = fdpg.update_log_z(
    jnp.full(1, -jnp.inf), jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.full((1, 2), -jnp.inf)
  )
  assert log_z[0] == -jnp.inf and count[0] == 2
  log_z, count = fdpg.update_log_z(
    log_z, count, jnp.zeros(1, jnp.int32), jnp.log(jnp.array([[3.0]]))
  )
  np.testing.assert_allclose(jnp.exp(log_z), [1.0], rtol=1e-12)  # (0 + 0 + 3) / 3.


def test_update_log_z_converges_to_exact_z():
  """Many batches from q = a of §7.1: Ẑ is within 4 standard errors of Z = 2.901912."""
  log_a, log_P, _, _, _ = _rlhf_7_1()
  rng = np.random.default_rng(16)
  ratio = np.asarray(log_P - log_a)
  log_z, count = jnp.full(1, -jnp.inf), jnp.zeros(1)
  for _ in range(40):
    x = rng.choice(4, size=(2, 250), p=A)
    log_z, count = fdpg.update_log_z(log_z, count, jnp.zeros(2, jnp.int32), jnp.asarray(ratio[x]))
  n = 40 * 500
  std = np.sqrt(np.sum(np.asarray(A) * (np.exp(ratio) - Z) ** 2) / n)
  assert count[0] == n
  assert abs(float(jnp.exp(log_z[0])) - Z) < 4 * std


def test_prompt_without_z_is_skipped():
  logpi, log_q, log_P, log_z_X, _ = _enumerated_batch(17)
  log_z_X = log_z_X.at[1].set(-jnp.inf)
  loss_fn = lambda lp: fdpg.fdpg(lp, log_q, log_P, log_z_X, 0.5, divergence="reverse_kl")
  loss, metrics, samples = loss_fn(logpi)
  grad = jax.grad(lambda lp: jnp.sum(loss_fn(lp)[0]))(logpi)
  assert loss[1] == 0 and np.all(grad[1] == 0) and not np.any(samples["used_BxK"][1])
  np.testing.assert_array_equal(metrics["z_valid"], [1.0, 0.0, 1.0, 1.0])
  assert all(np.all(np.isfinite(v)) for v in metrics.values())
  alone = fdpg.fdpg(logpi[:1], log_q[:1], log_P[:1], log_z_X[:1], 0.5, divergence="reverse_kl")[0]
  np.testing.assert_allclose(loss[0], alone[0], rtol=1e-14)
  assert np.all(np.abs(grad[0]) > 0)


def test_baseline_window_semantics():
  push = jax.jit(fdpg.baseline_window_push)
  window = fdpg.baseline_window_init(4, jnp.float64)
  baseline, has = fdpg.baseline_window_mean(window)
  assert baseline == 0 and not has  # No baseline on the first call.
  window = push(window, jnp.array([[1.0, 2.0, 3.0]]))
  np.testing.assert_allclose(fdpg.baseline_window_mean(window)[0], 2.0, atol=0)
  window = push(window, jnp.array([[4.0, 5.0]]))  # FIFO: 1 drops out.
  np.testing.assert_allclose(fdpg.baseline_window_mean(window)[0], 3.5, atol=0)
  # Masked values are not appended.
  window = push(window, jnp.array([[100.0, 6.0]]), jnp.array([[0, 1]]))
  np.testing.assert_allclose(fdpg.baseline_window_mean(window)[0], 4.5, atol=0)
  assert int(window["count"]) == 6
  # More than W values in one push: only the last W stay.
  window = push(window, jnp.arange(10.0).reshape(2, 5))
  np.testing.assert_allclose(np.sort(window["values_W"]), [6.0, 7.0, 8.0, 9.0], atol=0)
  assert int(window["count"]) == 16
  # The ring keeps overwriting the oldest.
  window = push(window, jnp.array([[20.0]]))
  np.testing.assert_allclose(np.sort(window["values_W"]), [7.0, 8.0, 9.0, 20.0], atol=0)


def test_baseline_window_uses_previous_calls_only():
  """A two-step trainer loop: step 1 has B = 0, step 2 the mean of step 1's used pseudo-rewards."""
  log_a, log_P, log_z, _, logpi = _rlhf_7_1()
  log_P = targets.pointwise(log_P, jnp.asarray(B_POINTWISE))  # Sample x = 1 leaves the support.
  x = jnp.asarray(BATCH)
  args = (logpi[x][None], log_a[x][None], log_P[x][None], log_z)
  window = fdpg.baseline_window_init(8, jnp.float64)
  baselines = []
  for _ in range(2):
    baseline, _ = fdpg.baseline_window_mean(window)
    baselines.append(float(baseline))
    _, _, s = fdpg.fdpg(*args, baseline, divergence="reverse_kl")
    window = fdpg.baseline_window_push(window, s["pseudo_reward_BxK"], s["used_BxK"])
  reward = fdpg.pseudo_reward(logpi[x[:4]] - (log_P[x[:4]] - log_z), "reverse_kl")
  assert baselines[0] == 0.0
  np.testing.assert_allclose(baselines[1], jnp.mean(reward), rtol=1e-12)
  assert int(window["count"]) == 8  # 4 used samples per step; the masked one is never pushed.


# -------------------------------------------------------------------------------------------------
# Samples outside the support (§1.10) and adversarial inputs.


@pytest.mark.parametrize("divergence", ["forward_kl", "tv", "js"])
def test_limit_rule_is_unbiased_outside_the_support(divergence):
  """§7.1's pointwise target: the expected gradient over all 4 outcomes (P(1) = 0) is exact."""
  log_a, _, _, _, _ = _rlhf_7_1()
  log_P = targets.pointwise(log_a, jnp.asarray(B_POINTWISE))[None]
  theta = jnp.asarray([THETA], jnp.float64)
  exact_grad = _exact_grad(theta, log_P, jnp.zeros(1), divergence)
  assert np.all(np.isfinite(exact_grad))
  got = _expected_surrogate_grad(
    theta,
    log_P,
    log_a[None],
    jnp.zeros(1),
    jnp.asarray([0.2]),
    divergence=divergence,
    outside_support="limit",
  )
  np.testing.assert_allclose(got, exact_grad, atol=1e-12)
  # On §7.1's batch (one sample off the support): finite loss and gradient under both rules.
  x = jnp.asarray(BATCH)
  for rule in ("limit", "mask"):
    loss_fn = lambda t: fdpg.fdpg(
      jax.nn.log_softmax(t)[x][None],
      log_a[x][None],
      log_P[0][x][None],
      jnp.log(0.7),
      0.2,
      divergence=divergence,
      outside_support=rule,
    )[0][0]
    value, grad = jax.value_and_grad(loss_fn)(theta[0])
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("divergence", ["tv", "js"])
def test_mask_rule_biases_tv_and_js(divergence):
  """The docstring's warning: dropping the samples off the support loses their finite limit
  pseudo-reward, so the expected surrogate gradient under "mask" is not ∇D_f (under "limit" it is,
  above)."""
  log_a, _, _, _, _ = _rlhf_7_1()
  log_P = targets.pointwise(log_a, jnp.asarray(B_POINTWISE))[None]
  theta = jnp.asarray([THETA], jnp.float64)
  exact_grad = _exact_grad(theta, log_P, jnp.zeros(1), divergence)
  masked = _expected_surrogate_grad(
    theta,
    log_P,
    log_a[None],
    jnp.zeros(1),
    jnp.asarray([0.2]),
    divergence=divergence,
    outside_support="mask",
  )
  assert np.max(np.abs(np.asarray(masked) - np.asarray(exact_grad))) > 1e-2


def test_mask_rule_excludes_samples_outside_the_support():
  log_a, _, _, _, logpi = _rlhf_7_1()
  log_P = targets.pointwise(log_a, jnp.asarray(B_POINTWISE))
  x = jnp.asarray(BATCH)
  for cfg in CONFIGS.values():
    fn = lambda lp, rule: fdpg.fdpg(
      lp, log_a[x][None], log_P[x][None], jnp.log(0.7), 0.3, outside_support=rule, **cfg
    )
    grad_mask = jax.grad(lambda lp: fn(lp, "mask")[0][0])(logpi[x][None])
    assert np.all(np.isfinite(grad_mask)) and grad_mask[0, 4] == 0
    assert np.all(grad_mask[0, :4] != 0)
    if fdpg._limit_outside_support(cfg["divergence"], cfg.get("alpha")) > -np.inf:
      grad_limit = jax.grad(lambda lp: fn(lp, "limit")[0][0])(logpi[x][None])
      np.testing.assert_allclose(grad_mask[0, :4], grad_limit[0, :4], rtol=1e-14)
      assert grad_limit[0, 4] != 0  # −w·B for forward KL, w·(R − B) for the others.
    else:
      with pytest.raises(ValueError, match="outside the target's support"):
        fn(logpi[x][None], "limit")


def test_mask_rule_is_exact_for_forward_kl_without_baseline():
  log_a, _, _, _, _ = _rlhf_7_1()
  log_P = targets.pointwise(log_a, jnp.asarray(B_POINTWISE))[None]
  theta = jnp.asarray([THETA], jnp.float64)
  got = _expected_surrogate_grad(
    theta,
    log_P,
    log_a[None],
    jnp.zeros(1),
    jnp.zeros(1),
    divergence="forward_kl",
    outside_support="mask",
  )
  np.testing.assert_allclose(got, _exact_grad(theta, log_P, jnp.zeros(1), "forward_kl"), atol=1e-12)


def test_smoothed_constraint_makes_reverse_kl_finite_and_exact():
  theta, log_P, log_q, prompt_logw = _random_table(18, zeros=5)
  b = jnp.isfinite(log_P)
  base = exact.normalize(jnp.where(b, log_P, 0.3))
  smoothed = targets.pointwise(base, b, epsilon=1e-3)
  assert np.all(np.isfinite(smoothed))
  np.testing.assert_allclose(smoothed, jnp.where(b, base, base + np.log(1e-3)), atol=1e-12)
  assert (
    exact.f_divergence(
      jax.nn.log_softmax(theta, -1),
      exact.normalize(targets.pointwise(base, b)),
      prompt_logw,
      "reverse_kl",
    )
    == jnp.inf
  )
  exact_grad = _exact_grad(theta, smoothed, prompt_logw, "reverse_kl")
  assert np.all(np.isfinite(exact_grad))
  got = _expected_surrogate_grad(
    theta, smoothed, log_q, prompt_logw, jnp.zeros(4), divergence="reverse_kl"
  )
  np.testing.assert_allclose(got, exact_grad, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adversarial_inputs_stay_finite(name):
  """ℓ = ±1e4 and w = e^{−1e4}, in float32 (exp overflows at 89): the bounded pseudo-rewards are
  finite as they are, every divergence with `clip_log_ratio`. One sample per prompt row."""
  cfg = CONFIGS[name]
  # Rows: ℓ = −1e4 (w = 1), ℓ ≈ +1e4 (w = 1), ℓ = −1e4 with w = e^{−1e4}, an ordinary sample.
  lpi = jnp.array([[-1e4], [-1.0], [-1e4], [-2.0]], jnp.float32)
  lq = jnp.array([[-1e4], [-1.0], [0.0], [-3.0]], jnp.float32)
  lP = jnp.array([[0.0], [-1e4], [0.0], [-2.5]], jnp.float32)

  def finite_rows(clip):
    fn = lambda lp: fdpg.fdpg(lp, lq, lP, 0.0, 0.5, clip_log_ratio=clip, **cfg)[0]
    loss_B, vjp = jax.vjp(fn, lpi)
    grad = vjp(jnp.ones_like(loss_B))[0][:, 0]
    assert loss_B.dtype == jnp.float32
    return list(np.isfinite(loss_B) & np.isfinite(grad))

  assert finite_rows(30.0) == [True] * 4
  if name in ("reverse_kl", "tv", "js"):
    assert finite_rows(None) == [True] * 4
  if name == "forward_kl":  # p/q = e^{1e4} in row 0 is a true overflow; row 2 is not (w·p/π = 1).
    assert finite_rows(None) == [False, True, True, True]
  bounded_above = {"reverse_kl", "tv", "js", "forward_kl", "neyman", "amari_0.5", "amari_-0.7"}
  bounded_below = {"reverse_kl", "tv", "js", "pearson", "amari_2.5"}
  ell = jnp.array([1e4, -1e4], jnp.float32)
  finite = np.isfinite(fdpg.pseudo_reward(ell, **cfg))
  assert list(finite) == [name in bounded_above, name in bounded_below]


def test_forward_kl_weighted_reward_in_log_space():
  """w = e^{−1e4}, p/π = e^{1e4}: the weighted pseudo-reward is p/q = 1 exactly, in float32."""
  loss_fn = lambda lp: fdpg.fdpg(
    lp,
    jnp.zeros((1, 1), jnp.float32),
    jnp.zeros((1, 1), jnp.float32),
    0.0,
    0.0,
    divergence="forward_kl",
  )[0][0]
  grad = jax.grad(loss_fn)(jnp.full((1, 1), -1e4, jnp.float32))
  np.testing.assert_allclose(grad, [[-1.0]], atol=0)


def test_invalid_arguments():
  args = (jnp.zeros((1, 2)),) * 3 + (0.0, 0.0)
  with pytest.raises(ValueError, match="unknown"):
    fdpg.fdpg(*args, divergence="hellinger")
  with pytest.raises(ValueError, match="alpha"):
    fdpg.pseudo_reward(jnp.zeros(1), "amari", alpha=1.0)
  with pytest.raises(ValueError, match="alpha"):
    fdpg.pseudo_reward(jnp.zeros(1), "js", alpha=0.5)
  with pytest.raises(ValueError, match="outside_support"):
    fdpg.fdpg(*args, divergence="js", outside_support="drop")
  with pytest.raises(ValueError, match="criterion"):
    fdpg.proposal_should_update(*args[:4], criterion="js")
