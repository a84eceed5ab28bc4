"""The run's target and training reward on the testbed, enumerated over every (prompt, response).

`target.kind` (the config's `target` section) names the target; its testbed-only settings
(constraint token, moment, Best-of-N's n) are in `testbed.*`. Everything here is [X, Y]: prompts ×
responses, float32, from the reference's exact log-probs `ref_XxY`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from align_jax import targets
from align_jax.errors import ConfigError
from align_jax.testbed import bon, exact, language

KINDS = ("", "chain", "rlhf", "bon", "pointwise", "distributional", "hybrid")


def check(cfg) -> None:
  if cfg.target.kind not in KINDS:
    raise ConfigError(
      f"target.kind {cfg.target.kind!r} is unknown; use one of {', '.join(repr(k) for k in KINDS)}"
    )
  if cfg.testbed.reward_transform not in ("", "lsc"):
    raise ConfigError(
      f"testbed.reward_transform {cfg.testbed.reward_transform!r} is unknown; use '' or lsc"
    )


def potential(cfg, tb, ref_XxY) -> jax.Array | None:
  """log P − log π_ref of the run's energy-based target on every (prompt, response), or None.

  rlhf: r/β. pointwise: log max(b, ε) with b = the response contains testbed.constraint_token
  (GDC's hard constraint; ε > 0 smooths it). distributional: λ·φ with φ = [the response's first
  token is e or f] and λ fitted exactly (enumeration) so that E_p[φ] = testbed.moment (GDC's
  I-projection; λ shared by all prompts). hybrid: both, λ fitted on a·b.
  """
  kind, t = cfg.target.kind, cfg.testbed
  if kind == "rlhf":
    return training_reward(cfg, tb, ref_XxY) / cfg.target.beta
  log_b = None
  if kind in ("pointwise", "hybrid"):
    b_XxY = np.broadcast_to(
      language.contains(tb.responses_YxT, t.constraint_token), tb.reward_XxY.shape
    )
    log_b = targets.pointwise(jnp.zeros(b_XxY.shape, jnp.float32), b_XxY, epsilon=t.epsilon)
  if kind not in ("distributional", "hybrid"):
    return log_b
  phi_XxYx1 = moment_features(tb)  # λ fitted on the base a (hybrid: on a·b).
  base_XxY = ref_XxY if log_b is None else ref_XxY + log_b
  lam, achieved, converged = targets.fit_lambda(
    phi_XxYx1,
    base_XxY,
    jnp.array([t.moment]),
    lr=1.0,
    tol=1e-6,
    max_iter=10_000,
    prompt_logw_X=jnp.asarray(tb.prompt_logw_X),
  )
  if not bool(converged):
    raise ConfigError(
      f"testbed.moment={t.moment}: moment matching did not converge (reached "
      f"{float(achieved[0]):.4f})"
    )
  zeros_XxY = jnp.zeros(phi_XxYx1.shape[:2], jnp.float32)
  return targets.exponential(zeros_XxY if log_b is None else log_b, phi_XxYx1, lam)


def target_logp(cfg, tb, ref_XxY, potential_XxY) -> jax.Array | None:
  """log of the run's explicit target distribution, normalised per prompt, or None."""
  kind = cfg.target.kind
  if kind == "chain":
    return jnp.asarray(tb.chain_logp_XxY, jnp.float32)
  if kind == "bon":  # Best-of-N of the reference, ties included (exact).
    return bon.bon_logp(ref_XxY, jnp.asarray(tb.reward_XxY), cfg.testbed.target_n)
  return None if potential_XxY is None else exact.normalize(ref_XxY + potential_XxY)


def training_reward(cfg, tb, ref_XxY) -> jax.Array:
  """The reward on-policy objectives train on: the gold reward r, or with testbed.reward_transform
  = lsc its log-sigmoid-centred utility log σ(r − r_ref(x)), r_ref(x) = E_π_ref[r | x] (ALGORITHMS.md
  §5.11; the paper's r_ref statistic is unconfirmed). Exact metrics always report the gold r."""
  reward_XxY = jnp.asarray(tb.reward_XxY, jnp.float32)
  if cfg.testbed.reward_transform == "lsc":
    r_ref_X = jnp.sum(jnp.exp(ref_XxY) * reward_XxY, axis=1)
    return targets.lsc(reward_XxY, r_ref_X[:, None])
  return reward_XxY


def moment_features(tb) -> jax.Array:
  """φ(y) = 1[y_0 ∈ moment tokens {e, f}] on every (prompt, response): [X, Y, 1]."""
  phi_Y = language.female_feature(tb.responses_YxT).astype(np.float32)
  return jnp.asarray(np.broadcast_to(phi_Y[None, :, None], (*tb.reward_XxY.shape, 1)))
