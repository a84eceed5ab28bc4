"""Token log-probs [B, K, T]: their layout, their masked sum is sequence_logps exactly, and a
token-granularity objective trains through the one step exactly as its sequence form does."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from align_jax import logps, models, objectives, step
from align_jax.objectives import pairwise

CFG = models.ModelConfig(**models.preset("tiny"))
B, K, L, PROMPT = 3, 2, 7, 2


@pytest.fixture(scope="module")
def model():
  graphdef, _, _ = models.abstract(CFG)
  init = jax.jit(models.init_params, static_argnums=0)
  return graphdef, init(CFG, jax.random.key(0)), init(CFG, jax.random.key(1))


def _batch():
  """Pairs after a 2-token prompt, with ragged responses (padding at the end is unscored)."""
  tokens_BxKxL = jax.random.randint(jax.random.key(2), (B, K, L), 0, CFG.vocab_size, jnp.int32)
  length_BxK = jnp.array([[5, 3], [2, 5], [4, 4]])  # Scored response tokens.
  position_L = jnp.arange(L)
  mask_BxKxL = (position_L >= PROMPT) & (position_L < PROMPT + length_BxK[..., None])
  return {
    "tokens_BxKxL": tokens_BxKxL,
    "loss_mask_BxKxL": mask_BxKxL.astype(jnp.float32),
    "example_mask_B": jnp.array([1.0, 1.0, 0.0]),
  }  # The last prompt is padding.


def test_token_logps_layout_and_their_masked_sum_is_sequence_logps(model):
  graphdef, params, _ = model
  batch = _batch()
  tokens, mask = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"]
  logp_BxKxT, mask_BxKxT = jax.jit(logps.token_logps_BxK, static_argnums=0)(
    graphdef, params, tokens, mask
  )
  assert logp_BxKxT.shape == mask_BxKxT.shape == (B, K, L - 1)
  assert logp_BxKxT.dtype == mask_BxKxT.dtype == jnp.float32
  np.testing.assert_array_equal(mask_BxKxT, mask[..., 1:])
  # Position t is log π(tokens[t + 1] | tokens[≤t]): the next-token distribution at t, picked.
  next_BxKxLxV = jax.jit(logps.next_token_logprobs, static_argnums=0)(
    graphdef, params, tokens.reshape(B * K, L)
  ).reshape(B, K, L, -1)
  picked_BxKxT = np.take_along_axis(
    np.asarray(next_BxKxLxV[..., :-1, :]), np.asarray(tokens[..., 1:, None]), axis=-1
  )[..., 0]
  np.testing.assert_allclose(logp_BxKxT, picked_BxKxT, rtol=1e-6, atol=1e-6)
  # The masked sum is sequence_logps bit for bit, and both equal the [R, T] formulation.
  seq_BxK = jax.jit(logps.sequence_logps, static_argnums=0)(graphdef, params, tokens, mask)
  np.testing.assert_array_equal(logps.sum_tokens(logp_BxKxT, mask_BxKxT), seq_BxK)
  tok_RxT = jax.jit(logps.token_logps, static_argnums=0)(graphdef, params, tokens.reshape(B * K, L))
  rows_BxK = jnp.sum(tok_RxT * mask.reshape(B * K, L)[:, 1:], axis=-1).reshape(B, K)
  np.testing.assert_array_equal(rows_BxK, seq_BxK)


def _token_dpo(logp_BxKxT, batch, stats, *, beta):
  """DPO from token log-probs: each response's sum under the step's token mask."""
  mask_BxKxT = batch["token_mask_BxKxT"]
  assert mask_BxKxT.dtype == jnp.float32 and logp_BxKxT.shape == mask_BxKxT.shape
  logp_Bx2 = jnp.sum(logp_BxKxT * mask_BxKxT, axis=-1)
  ref_Bx2 = jnp.sum(batch["ref_token_logp_BxKxT"] * mask_BxKxT, axis=-1)
  loss_B, metrics_B = pairwise.dpo(logp_Bx2, ref_Bx2, beta=beta)
  # The step's ref_logp_BxK is the masked sum of its ref_token_logp_BxKxT.
  ref_gap_B = jnp.max(jnp.abs(batch["ref_logp_BxK"] - ref_Bx2), axis=-1)
  return loss_B, {**metrics_B, "ref_gap": ref_gap_B}, stats


def test_a_token_objective_trains_like_its_sequence_form(model):
  graphdef, params, ref = model
  batch = _batch()
  tx = optax.adam(1e-2)
  sequence_dpo = objectives.get("dpo")
  token_dpo = dataclasses.replace(sequence_dpo, fn=_token_dpo, granularity="token")
  runs = {}
  for name, objective in (("sequence", sequence_dpo), ("token", token_dpo)):
    train_step = jax.jit(
      functools.partial(
        step.train_step,
        graphdef=graphdef,
        objective=objective,
        loss_cfg={"beta": 0.5},
        tx=tx,
        lr_fn=optax.constant_schedule(1e-2),
      )
    )
    state = step.init_state(params, tx, seed=0)
    runs[name] = train_step(state, batch, ref)
  (seq_state, seq_metrics), (tok_state, tok_metrics) = runs["sequence"], runs["token"]
  assert float(seq_metrics["grad_norm"]) > 1e-3  # The update is not of zeros.
  assert float(tok_metrics["objective/ref_gap"]) == 0.0
  for key, value in seq_metrics.items():
    np.testing.assert_allclose(tok_metrics[key], value, rtol=1e-6, atol=1e-6, err_msg=key)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
    tok_state.params,
    seq_state.params,
  )


# A vocabulary (61) and lengths no other size here equals, so the [R, T, V] logits are
# recognisable by shape in a jaxpr.
CHUNKED = dict(dataclasses.asdict(CFG), vocab_size=61, final_softcap=3.0)


@pytest.mark.parametrize("chunk,tied", [(4, False), (3, True), (16, False)])
def test_chunked_token_logps_equal_the_unchunked_values_and_gradients(chunk, tied):
  """T = 11 positions in chunks of 4 (3 chunks, the last padded), 3 (tied embeddings) or 16 (one
  chunk: the unchunked code); values within 1e-6, gradients of every parameter within 1e-6 of
  their scale, for token log-probs, sequence log-probs and the public functions built on them."""
  whole = models.ModelConfig(**{**CHUNKED, "tie_embeddings": tied, "logits_chunk": 0})
  chunked = dataclasses.replace(whole, logits_chunk=chunk)
  graphdef, chunk_graphdef = models.abstract(whole)[0], models.abstract(chunked)[0]
  params = models.init_params(whole, jax.random.key(4))
  tokens_BxKxL = jax.random.randint(jax.random.key(5), (2, 3, 12), 0, 61, jnp.int32)
  mask_BxKxL = (jnp.arange(12) >= 2).astype(jnp.float32) * jnp.ones((2, 3, 1))
  weights_BxKxT = jax.random.normal(jax.random.key(6), (2, 3, 11))

  def outputs(g, p):
    logp_BxKxT, _ = logps.token_logps_BxK(g, p, tokens_BxKxL, mask_BxKxL)
    return logp_BxKxT, logps.sequence_logps(g, p, tokens_BxKxL, mask_BxKxL)

  def grads(g):
    loss = lambda p: jnp.sum(outputs(g, p)[0] * weights_BxKxT) + jnp.sum(outputs(g, p)[1])
    return jax.jit(jax.grad(loss))(params)

  run = jax.jit(outputs, static_argnums=0)
  (tok, seq), (want_tok, want_seq) = run(chunk_graphdef, params), run(graphdef, params)
  np.testing.assert_allclose(tok, want_tok, atol=1e-6, rtol=0)  # Each token's log-prob.
  np.testing.assert_allclose(seq, want_seq, atol=0, rtol=1e-6)  # Sums of 10 (about -45).
  want = grads(graphdef)
  for a, b in zip(jax.tree.leaves(grads(chunk_graphdef)), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6 * max(1.0, float(np.max(np.abs(b)))), rtol=0)
  assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want)) > 1e-2  # Not zeros.


def _largest_logits(jaxpr, V) -> int:
  """The largest array with a vocabulary axis (last dim V) the program holds, in elements."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = getattr(var.aval, "shape", ())
      if shape and shape[-1] == V:
        largest = max(largest, int(np.prod(shape)))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          largest = max(largest, _largest_logits(getattr(sub, "jaxpr", sub), V))
  return largest


def test_chunked_gradient_holds_one_chunk_of_logits_not_the_sequence():
  """The forward and backward of the chunked log-probs hold [R, chunk, V] logits at most; the
  unchunked ones hold [R, L, V] (the check can fail)."""
  R, L, c = 6, 40, 8
  tokens = jax.random.randint(jax.random.key(7), (R, L), 0, 61, jnp.int32)
  sizes = {}
  for chunk in (0, c):
    cfg = models.ModelConfig(**{**CHUNKED, "logits_chunk": chunk})
    graphdef, shapes, _ = models.abstract(cfg)
    loss = lambda p: jnp.sum(logps.token_logps(graphdef, p, tokens))
    sizes[chunk] = _largest_logits(jax.make_jaxpr(jax.grad(loss))(shapes).jaxpr, 61)
  assert sizes[c] == R * c * 61
  assert sizes[0] >= R * (L - 1) * 61
