"""On-policy distillation (GKD) on the testbed: expected surrogate gradients = exact divergences'.

Every response of 8 prompts (length 2, 64 responses each) is enumerated; the student π (a tiny
float64 LM) and the teacher p (a float64 LM of another architecture: two layers) give their
whole next-token distributions at both positions. The expected gradient of `distill.gkd`'s
surrogate is Σ_x w_x Σ_y q(y|x) ∇_θ ℓ(θ; y) with the sampling weights q (the student's or the
teacher's) held fixed, compared in parameter space with the autodiff gradient of the exact
divergence it is claimed to follow, within 1e-5 (float64: the agreement is ~1e-12):

- teacher samples, forward KL: ∇KL(p‖π) of the sequence distributions;
- student samples with the sequence-level term, reverse KL: ∇KL(π‖p) of the sequence
  distributions; any divergence D: ∇E_{y∼π}[Σ_t D(p_t‖π_t)];
- student samples without it (GKD as published): the prefix-fixed gradient Σ_t E_{y<t}[∇D_t],
  which is not ∇KL(π‖p) (it misses the prefix's score-function term);
- GKD's mixture (one student and one teacher sample per prompt): the mean of the two.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax import config_lib, logps, models
from align_jax.errors import ConfigError
from align_jax.models import loading
from align_jax.objectives import distill
from align_jax.testbed import exact, language, task

STUDENT = dataclasses.replace(
  models.ModelConfig(**models.preset("tiny")), n_layers=1, dtype="float64", param_dtype="float64"
)
TEACHER = dataclasses.replace(STUDENT, n_layers=2, d_model=48)
V = language.V


@pytest.fixture(scope="module")
def setting():
  """(the student's distribution table [X, Y, 2, V] as a function of θ, θ, the teacher's table,
  the responses [Y, 2], prompt weights)."""
  tb_cfg = config_lib.base().testbed
  tb_cfg.prompt_len, tb_cfg.response_len = 1, 2
  tb = task.make(tb_cfg)
  with jax.enable_x64(True):
    X, Y = len(tb.prompts_XxP), len(tb.responses_YxT)
    tokens_XxYxL = jnp.concatenate(
      [
        jnp.broadcast_to(tb.prompts_XxP[:, None, :], (X, Y, 1)),
        jnp.broadcast_to(tb.responses_YxT[None], (X, Y, 2)),
      ],
      axis=-1,
    ).astype(jnp.int32)
    student, _, _ = models.abstract(STUDENT)
    teacher, _, _ = models.abstract(TEACHER)
    table = jax.jit(  # Compiled once each: run eagerly in float64 they take most of the time.
      lambda graphdef, params: logps.next_token_logprobs_BxK(graphdef, params, tokens_XxYxL),
      static_argnums=0,
    )
    init = jax.jit(models.init_params, static_argnums=0)
    teacher_XxYxTxV = table(teacher, init(TEACHER, jax.random.key(1)))
    yield (
      lambda params: table(student, params),
      init(STUDENT, jax.random.key(0)),
      teacher_XxYxTxV,
      jnp.asarray(tb.responses_YxT),
      jnp.asarray(tb.prompt_logw_X),
    )


def _sequence(d_XxYxTxV, responses_YxT):
  """log q(y|x) = Σ_t log q(y_t | x, y_<t): [X, Y]."""
  picked = jnp.take_along_axis(d_XxYxTxV, responses_YxT[None, :, :, None], axis=-1)[..., 0]
  return jnp.sum(picked, axis=-1)


def _expected_surrogate(d_XxYxTxV, teacher_XxYxTxV, responses_YxT, logw_X, sources, **cfg):
  """Σ_x w_x Σ_{y_1..y_K} Π_k q_k(y_k|x) ℓ(y_1..y_K), q_k the student (sources[k] = 1) or the
  teacher (0), the weights held fixed."""
  X, Y = d_XxYxTxV.shape[:2]
  logq = {
    1: jax.lax.stop_gradient(_sequence(d_XxYxTxV, responses_YxT)),
    0: _sequence(teacher_XxYxTxV, responses_YxT),
  }
  # Every K-tuple of responses per prompt: index arrays [X, Y**K] per column.
  grids = jnp.meshgrid(*[jnp.arange(Y)] * len(sources), indexing="ij")
  cols = [g.reshape(-1) for g in grids]
  weight = jnp.exp(logw_X)[:, None] * jnp.exp(
    sum(logq[s][:, c] for s, c in zip(sources, cols))
  )  # [X, Y**K]
  pick = lambda a: jnp.stack([a[:, c] for c in cols], axis=2).reshape(
    X * len(cols[0]), len(cols), *a.shape[2:]
  )
  tokens_NxKxT = pick(jnp.broadcast_to(responses_YxT[None], (X, Y, 2)))
  loss_N, _ = distill.gkd(
    pick(d_XxYxTxV),
    pick(teacher_XxYxTxV),
    tokens_NxKxT,
    jnp.ones(tokens_NxKxT.shape),
    jnp.broadcast_to(jnp.asarray(sources, jnp.float64), tokens_NxKxT.shape[:2]),
    jnp.ones(tokens_NxKxT.shape[:1]),
    aggregation="seq-mean-token-sum",
    **cfg,
  )
  return jnp.sum(weight.reshape(-1) * loss_N)


def _expected_token_divergence(d_XxYxTxV, teacher_XxYxTxV, logw_X, prefix_fixed, **div):
  """E_{y∼π}[Σ_t D(p_t‖π_t)] = Σ_x w_x [D_0(x) + Σ_{y0} π(y0|x) D_1(x, y0)] from the tables,
  π(y0|x) held fixed if `prefix_fixed`."""
  X = d_XxYxTxV.shape[0]
  s, t = (a.reshape(X, V, V, 2, V) for a in (d_XxYxTxV, teacher_XxYxTxV))
  first = distill.token_divergence(s[:, 0, 0, 0], t[:, 0, 0, 0], **div)  # [X]
  second = distill.token_divergence(s[:, :, 0, 1], t[:, :, 0, 1], **div)  # [X, y0]
  prefix = jnp.exp(s[:, :, 0, 0, :].diagonal(axis1=1, axis2=2))  # π(y0|x): [X, y0].
  prefix = jax.lax.stop_gradient(prefix) if prefix_fixed else prefix
  return jnp.sum(jnp.exp(logw_X) * (first + jnp.sum(prefix * second, axis=-1)))


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_expected_distillation_gradients_are_the_exact_divergences_gradients(setting):
  table, params, teacher, responses, logw = setting
  with jax.enable_x64(True):
    d_XxYxTxV, vjp = jax.vjp(table, params)
    vjp = jax.jit(vjp)  # One compiled backward pass through the model for every gradient below.
    grad = lambda f: _flat(vjp(jax.grad(f)(d_XxYxTxV))[0])
    sequence = lambda d: _sequence(d, responses)
    p_XxY = _sequence(teacher, responses)
    kl_forward = grad(lambda d: exact.kl(p_XxY, sequence(d), logw))
    kl_reverse = grad(lambda d: exact.kl(sequence(d), p_XxY, logw))
    assert float(exact.kl(sequence(d_XxYxTxV), p_XxY, logw)) > 0.3  # π and p differ.
    scale = np.max(np.abs(kl_reverse))

    def surrogate(sources, **cfg):
      return grad(lambda d: _expected_surrogate(d, teacher, responses, logw, sources, **cfg))

    def on_policy(prefix_fixed, **div):
      return grad(lambda d: _expected_token_divergence(d, teacher, logw, prefix_fixed, **div))

    close = lambda got, want, msg: np.testing.assert_allclose(
      got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=msg
    )
    for sequence_level in (False, True):  # Teacher samples: no score term either way.
      got = surrogate((0,), divergence="forward_kl", sequence_level=sequence_level)
      close(got, kl_forward, f"forward KL on teacher samples, sequence_level={sequence_level}")
    close(surrogate((1,), divergence="reverse_kl", sequence_level=True), kl_reverse, "reverse KL")
    for div in (dict(divergence="forward_kl"), dict(divergence="jsd", beta=0.3)):
      close(surrogate((1,), sequence_level=True, **div), on_policy(False, **div), f"{div}")
    for div in (dict(divergence="reverse_kl"), dict(divergence="jsd", beta=0.7)):
      gkd = surrogate((1,), sequence_level=False, **div)
      close(gkd, on_policy(True, **div), f"GKD {div}, prefixes fixed")
    gkd_reverse = surrogate((1,), divergence="reverse_kl", sequence_level=False)
    assert np.max(np.abs(gkd_reverse - kl_reverse)) > 0.05 * scale  # GKD's is not ∇KL(π‖p).
    mixture = surrogate((1, 0), divergence="forward_kl", sequence_level=True)
    close(mixture, 0.5 * (on_policy(False, divergence="forward_kl") + kl_forward), "mixture")


def test_a_teacher_of_another_vocabulary_is_a_config_error():
  cfg = config_lib.base()
  cfg.model = models.preset("tiny")
  cfg.teacher.path, cfg.teacher.model = "testbed", "gpt2"
  with pytest.raises(ConfigError, match="of 50257 tokens, the student 8: distillation needs one"):
    loading.teacher_model(cfg, cfg.teacher.path)
