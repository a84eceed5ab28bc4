"""Which KL penalties of the GRPO family estimate ∇KL(π‖π_ref)? Exactly, on the testbed.

Every response of 8 prompts (response length 2: 64 responses each) and every ordered pair of them
(K = 2 samples per prompt) are enumerated; the expected gradient of a configuration is
Σ_x w_x Σ_{y1,y2} π(y1|x) π(y2|x) ∇_θ ℓ(θ; y1, y2) with the weights held fixed (on-policy:
π_old = π), ℓ being `objectives.grpo.dr_grpo`'s surrogate with zero task reward, β = 1 and the
per-sequence token sum (so a sample's loss is Σ_t of its tokens' terms). Each is compared in
parameter space (float64, one tiny LM for π and another for π_ref) with the exact gradient it is
claimed to be (c = (K − 1)/K from the group-mean baseline; ρ = log π(y|x) − log π_ref(y|x);
π_t = π(·|x, y_<t); "prefixes fixed": E_{y<t} with the prefix's probability not differentiated):

| KL placement         | estimator        | expected gradient                             |
|----------------------|------------------|-----------------------------------------------|
| reward               | k1               | c·∇KL(π‖π_ref): unbiased (Σ_t k1_t = k1)      |
| reward, sequence     | k2               | c·(∇E_π[½ρ²] − ∇KL): biased                   |
| reward, sequence     | k3               | c·(∇KL(π‖π_ref) − ∇KL(π_ref‖π)): biased       |
| reward, token        | k2, k3           | biased                                        |
| loss, sequence       | k1               | 0                                             |
| loss, sequence       | k2               | ∇KL(π‖π_ref): unbiased                        |
| loss, sequence       | k3               | ∇KL(π_ref‖π), the forward KL: biased          |
| loss, seq., × ratio  | k1, k3           | ∇E_π[k] = ∇KL(π‖π_ref): unbiased (DeepSeek)   |
| loss, seq., × ratio  | k2               | ∇E_π[½ρ²]: biased                             |
| loss, token          | k1               | 0                                             |
| loss, token          | k2; k1, k3 ×ratio | Σ_t E[∇KL(π_t‖π_ref,t)], prefixes fixed      |
| loss, token          | k3               | Σ_t E[∇KL(π_ref,t‖π_t)], prefixes fixed       |
| loss, token, × ratio | k2               | biased                                        |

GRPO's default (k3 per token in the loss) is the row "loss, token, k3": on-policy it follows the
forward KL of each next-token distribution, not ∇KL(π‖π_ref). Per-token placements in the loss
miss Σ_t E[KL_t·∇log π(y_<t)], the term that flows through the probability of the prefix.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import config_lib, logps, models
from align_jax.objectives import grpo
from align_jax.testbed import exact, language, task

CFG = dataclasses.replace(
  models.ModelConfig(**models.preset("tiny")), n_layers=1, dtype="float64", param_dtype="float64"
)
K = 2


@pytest.fixture(scope="module")
def setting():
  """(token log-prob table of π as a function of θ, θ, π_ref's table, prompt weights)."""
  tb_cfg = config_lib.base().testbed
  tb_cfg.prompt_len, tb_cfg.response_len = 1, 2  # 8 prompts x 64 responses.
  tb = task.make(tb_cfg)
  with jax.enable_x64(True):
    graphdef, _, _ = models.abstract(CFG)
    X, Y = len(tb.prompts_XxP), len(tb.responses_YxT)
    tokens_XxYxL = jnp.concatenate(
      [
        jnp.broadcast_to(tb.prompts_XxP[:, None, :], (X, Y, 1)),
        jnp.broadcast_to(tb.responses_YxT[None], (X, Y, 2)),
      ],
      axis=-1,
    ).astype(jnp.int32)
    mask_XxYxL = jnp.broadcast_to(jnp.array([0.0, 1.0, 1.0]), tokens_XxYxL.shape)

    def table(params):  # log π(y_t | x, y_<t): [X, Y, T = 2].
      return logps.token_logps_BxK(graphdef, params, tokens_XxYxL, mask_XxYxL)[0]

    params = models.init_params(CFG, jax.random.key(0))
    ref_XxYxT = table(models.init_params(CFG, jax.random.key(1)))  # KL(π‖π_ref) ≈ 1.36 nats.
    yield table, params, ref_XxYxT, jnp.asarray(tb.prompt_logw_X)


def _pairs(a_XxYx):
  """[X, Y, ...] -> the K = 2 samples of every ordered pair (y1, y2): [X·Y·Y, 2, ...]."""
  X, Y = a_XxYx.shape[:2]
  first = jnp.repeat(a_XxYx, Y, axis=1)
  second = jnp.tile(a_XxYx, (1, Y) + (1,) * (a_XxYx.ndim - 2))
  return jnp.stack([first, second], axis=2).reshape(X * Y * Y, 2, *a_XxYx.shape[2:])


def _expected_surrogate(tok_XxYxT, ref_XxYxT, logw_X, **kl):
  """Σ_x w_x Σ_{y1,y2} π(y1)π(y2) ℓ(y1, y2), the weights held fixed: its gradient is the
  configuration's expected gradient."""
  X, Y, T = tok_XxYxT.shape
  prob_XxY = jax.lax.stop_gradient(jnp.exp(jnp.sum(tok_XxYxT, axis=-1)))
  pair_prob_N = jnp.prod(_pairs(prob_XxY[..., None])[..., 0], axis=1)  # π(y1|x)·π(y2|x).
  pair_weight_N = jnp.repeat(jnp.exp(logw_X), Y * Y) * pair_prob_N
  logp_NxKxT = _pairs(tok_XxYxT)
  loss_N, _ = grpo.dr_grpo(
    logp_NxKxT,
    jax.lax.stop_gradient(logp_NxKxT),
    _pairs(ref_XxYxT),
    jnp.ones_like(logp_NxKxT),
    jnp.zeros(logp_NxKxT.shape[:2]),
    jnp.ones(logp_NxKxT.shape[:1]),
    norm_len=1.0,
    aggregation="seq-mean-token-sum",
    beta=1.0,
    **kl,
  )
  return jnp.sum(pair_weight_N * loss_N)


def _prefix_fixed(tok_XxYxT, ref_XxYxT, logw_X, forward: bool):
  """Σ_x w_x Σ_t E_{y<t ∼ π}[KL_t] with the prefix probabilities held fixed, KL_t the KL between
  the next-token distributions π(·|x, y_<t) and π_ref(·|x, y_<t) (π_ref's first if `forward`)."""
  V = language.V
  X = tok_XxYxT.shape[0]
  tok, ref = (a.reshape(X, V, V, 2) for a in (tok_XxYxT, ref_XxYxT))
  first, first_ref = tok[:, :, 0, 0], ref[:, :, 0, 0]  # log π(y0|x): [X, V].
  second, second_ref = tok[..., 1], ref[..., 1]  # log π(y1|x, y0): [X, V, V].
  p, q = (first_ref, first) if forward else (first, first_ref)
  kl_first_X = jnp.sum(jnp.exp(p) * (p - q), axis=-1)
  p, q = (second_ref, second) if forward else (second, second_ref)
  kl_second_XxV = jnp.sum(jnp.exp(p) * (p - q), axis=-1)
  prefix_XxV = jax.lax.stop_gradient(jnp.exp(first))
  return jnp.sum(jnp.exp(logw_X) * (kl_first_X + jnp.sum(prefix_XxV * kl_second_XxV, axis=-1)))


def _exact(tok_XxYxT, ref_XxYxT, logw_X, which):
  seq, ref = jnp.sum(tok_XxYxT, axis=-1), jnp.sum(ref_XxYxT, axis=-1)
  if which == "kl":
    return exact.kl(seq, ref, logw_X)
  if which == "forward_kl":
    return exact.kl(ref, seq, logw_X)
  if which == "half_rho_squared":  # E_π[½ρ²], π's weights differentiated too.
    return exact.expectation(seq, 0.5 * (seq - ref) ** 2, logw_X)
  if which == "prefix_fixed_kl":
    return _prefix_fixed(tok_XxYxT, ref_XxYxT, logw_X, forward=False)
  if which == "prefix_fixed_forward_kl":
    return _prefix_fixed(tok_XxYxT, ref_XxYxT, logw_X, forward=True)
  raise ValueError(which)


C = (K - 1) / K
# (kl_in, kl_level, kl_estimator, kl_ratio) -> the exact gradient as Σ coefficient · ∇(quantity);
# None: biased, no closed form claimed (only that it is not c·∇KL).
CLAIMS = {
  ("reward", "token", "k1", False): {"kl": C},
  ("reward", "sequence", "k1", False): {"kl": C},
  ("reward", "sequence", "k2", False): {"half_rho_squared": C, "kl": -C},
  ("reward", "sequence", "k3", False): {"kl": C, "forward_kl": -C},
  ("reward", "token", "k2", False): None,
  ("reward", "token", "k3", False): None,
  ("loss", "sequence", "k1", False): {},
  ("loss", "sequence", "k2", False): {"kl": 1.0},
  ("loss", "sequence", "k3", False): {"forward_kl": 1.0},
  ("loss", "sequence", "k1", True): {"kl": 1.0},
  ("loss", "sequence", "k2", True): {"half_rho_squared": 1.0},
  ("loss", "sequence", "k3", True): {"kl": 1.0},
  ("loss", "token", "k1", False): {},
  ("loss", "token", "k2", False): {"prefix_fixed_kl": 1.0},
  ("loss", "token", "k3", False): {"prefix_fixed_forward_kl": 1.0},
  ("loss", "token", "k1", True): {"prefix_fixed_kl": 1.0},
  ("loss", "token", "k2", True): None,
  ("loss", "token", "k3", True): {"prefix_fixed_kl": 1.0},
}
UNBIASED = {
  ("reward", "token", "k1", False),
  ("reward", "sequence", "k1", False),
  ("loss", "sequence", "k2", False),
  ("loss", "sequence", "k1", True),
  ("loss", "sequence", "k3", True),
}


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_each_kl_configuration_has_its_stated_exact_expected_gradient(setting):
  table, params, ref_XxYxT, logw_X = setting
  with jax.enable_x64(True):
    tok_XxYxT, vjp = jax.vjp(table, params)
    grad = lambda f: _flat(vjp(jax.grad(f)(tok_XxYxT))[0])
    exact_grads = {
      which: grad(lambda t, w=which: _exact(t, ref_XxYxT, logw_X, w))
      for which in ("kl", "forward_kl", "half_rho_squared", "prefix_fixed_kl")
      + ("prefix_fixed_forward_kl",)
    }
    kl_grad = exact_grads["kl"]
    scale = np.max(np.abs(kl_grad))
    assert scale > 1e-2  # π and π_ref differ enough for the comparison to mean something.
    assert float(_exact(tok_XxYxT, ref_XxYxT, logw_X, "kl")) > 0.5
    for (kl_in, level, estimator, ratio), claim in CLAIMS.items():
      config = dict(kl_in=kl_in, kl_level=level, kl_estimator=estimator, kl_ratio=ratio)
      got = grad(lambda t, c=config: _expected_surrogate(t, ref_XxYxT, logw_X, **c))
      label = f"{config}"
      if claim is not None:
        want = sum((coef * exact_grads[w] for w, coef in claim.items()), np.zeros_like(got))
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * scale, err_msg=label)
      c = C if kl_in == "reward" else 1.0
      distance = np.max(np.abs(got - c * kl_grad)) / scale
      if (kl_in, level, estimator, ratio) in UNBIASED:
        assert distance < 1e-9, label
      else:
        assert distance > 0.05, (label, distance)  # Biased by at least 5 % of the gradient.
