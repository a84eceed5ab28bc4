"""Packed rows (align_jax/data/packing.py): records packed several to a row by Grain's packer give
the unpacked rows' token log-probs and gradients in every model family, with and without a shared
prompt, under LoRA and through the step; the unpacked layout is rebuilt exactly; bad records are
refused with one line naming them."""

import json

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from align_jax import logps, models, step, train
from align_jax.data import packing
from align_jax.errors import ConfigError
from align_jax.models import lora
from conftest import (
  FAMILIES,
  dpo_update,
  load_config,
  lora_adapters,
  packed_batch,
  packed_stream,
  read_jsonl,
)

TINY = dict(models.preset("tiny"))
N, K, L = 7, 3, 10
PACK_LEN, PACK_RECORDS, ROWS = 30, 3, 2
INIT = jax.jit(models.init_params, static_argnums=0)


def _records(vocab: int, seed: int = 0) -> dict:
  """N records of K rows: prompts of 1-4 tokens (the same in a record's rows), ragged responses
  of 1-6 tokens, padding 0 after; record 2's last row has no scored token (a list's padding)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (N, K, L))
  prompt_N = rng.integers(1, 5, N)
  length_NxK = rng.integers(1, 7, (N, K))
  length_NxK[2, -1] = 0
  tokens[:, 1:] = np.where(np.arange(L) < prompt_N[:, None, None], tokens[:, :1], tokens[:, 1:])
  start = prompt_N[:, None, None]
  position_L = np.arange(L)
  mask = (position_L >= start) & (position_L < start + length_NxK[..., None])
  tokens = np.where(position_L < start + length_NxK[..., None], tokens, 0)
  return {
    "tokens_KxL": tokens.astype(np.int32),
    "loss_mask_KxL": mask.astype(np.float32),
    "id": np.arange(N, dtype=np.int32),
    "score_K": rng.standard_normal((N, K)).astype(np.float32),
  }


def _packed(arrays: dict, shared: bool, rows: int = ROWS, pack_len: int = PACK_LEN) -> dict:
  return packed_batch(
    arrays, shared=shared, pack_len=pack_len, pack_records=PACK_RECORDS, rows=rows
  )


def _packed_fields(batch: dict) -> dict:
  return {k: batch[k] for k in logps.PACKED}


@pytest.mark.parametrize("shared", [True, False])
def test_unpacking_rebuilds_each_record_exactly(shared):
  arrays = _records(50)
  batch = _packed(arrays, shared)
  filled = np.flatnonzero(np.asarray(batch["example_mask_B"]))
  ids = np.asarray(batch["id_B"])[filled]
  assert len(set(ids)) == len(ids) and len(ids) >= 4  # Distinct records, several to a row.
  assert len(filled) > ROWS  # Fewer rows than records: packing happened.
  np.testing.assert_array_equal(
    np.asarray(batch["loss_mask_BxKxL"])[filled], arrays["loss_mask_KxL"][ids]
  )
  np.testing.assert_array_equal(np.asarray(batch["score_BxK"])[filled], arrays["score_K"][ids])
  # Tokens agree wherever a scored row has them (a row without a scored token is left out).
  scored_rows = arrays["loss_mask_KxL"][ids].any(-1)
  got, want = np.asarray(batch["tokens_BxKxL"])[filled], arrays["tokens_KxL"][ids]
  np.testing.assert_array_equal(got[scored_rows], want[scored_rows])
  # Empty slots are padding everywhere.
  empty = np.flatnonzero(np.asarray(batch["example_mask_B"]) == 0)
  assert not np.asarray(batch["loss_mask_BxKxL"])[empty].any()
  # Each packed row holds whole records of at most PACK_LEN slots; the records' own slots
  # count exactly their informative tokens (a shared prompt once).
  lengths = packing.check_records(arrays, shared, PACK_LEN)
  used = int(np.sum(np.asarray(batch["pack_segment_BxS"]) > 0))
  assert used == int(lengths[ids].sum())
  if shared:
    unshared = packing.check_records(arrays, False, PACK_LEN)
    assert np.all(lengths <= unshared) and np.any(lengths < unshared)


def _weights(batch):
  """Fixed random weights per (record id, k, t), placed at each slot's record."""
  w = np.random.default_rng(5).standard_normal((N + 1, K, L - 1)).astype(np.float32)
  ids = np.where(np.asarray(batch["example_mask_B"]) > 0, np.asarray(batch["id_B"]), N)
  return jnp.asarray(w[ids])


CASES = {
  **{name: options for name, options in FAMILIES.items()},
  "scanned_chunked": dict(scan_layers=True, logits_chunk=4, attention_chunk=4, remat=True),
}


@pytest.mark.parametrize("case", CASES)
def test_packed_rows_equal_the_unpacked_rows_and_their_gradients(case):
  cfg = models.ModelConfig(**{**TINY, **CASES[case]})
  params = INIT(cfg, jax.random.key(0))
  graphdef = models.abstract(cfg)[0]
  arrays = _records(cfg.vocab_size)
  for shared in (True, False):
    batch = _packed(arrays, shared)
    tokens, mask, w = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"], _weights(batch)
    on = mask[..., 1:] * batch["example_mask_B"][:, None, None]

    @jax.jit
    def both(params):  # (log-probs, gradient) packed, then from the records' own rows.
      def weighted(params, packed):
        logp, m = logps.token_logps_BxK(graphdef, params, tokens, mask, packed=packed)
        return jnp.sum(logp * on * w), logp

      return [
        jax.grad(weighted, has_aux=True)(params, p)[::-1] for p in (_packed_fields(batch), None)
      ]

    (packed, g_packed), (plain, g_plain) = both(params)
    scored = np.asarray(on) > 0
    assert scored.sum() > 20
    np.testing.assert_allclose(np.asarray(packed)[scored], np.asarray(plain)[scored], atol=1e-5)
    scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(g_plain))
    for x, y in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_plain), strict=True):
      assert float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) <= 1e-5 * scale


def test_packed_rows_under_lora_give_the_adapters_the_same_gradients():
  cfg = models.ModelConfig(**TINY)
  graphdef, shapes, names = models.abstract(cfg)
  rank = mlc.ConfigDict(dict(rank=2, alpha=4.0, targets=("attn", "mlp")))
  base = INIT(cfg, jax.random.key(0))
  adapters = lora_adapters(shapes, names, rank)
  batch = _packed(_records(cfg.vocab_size), shared=True)
  # Positive weights: the value is a sum without cancellation, so 1e-5 relative means something.
  tokens, mask, w = batch["tokens_BxKxL"], batch["loss_mask_BxKxL"], jnp.abs(_weights(batch))
  on = mask[..., 1:] * batch["example_mask_B"][:, None, None]

  def loss(adapters, packed):
    params = lora.merge(base, adapters, rank)
    logp, _ = logps.token_logps_BxK(graphdef, params, tokens, mask, packed=packed)
    return jnp.sum(logp * on * w)

  grad = jax.jit(jax.value_and_grad(loss))
  (v_packed, g_packed), (v_plain, g_plain) = (
    grad(adapters, _packed_fields(batch)),
    grad(adapters, None),
  )
  np.testing.assert_allclose(v_packed, v_plain, rtol=1e-5)
  scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(g_plain))
  for x, y in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_plain), strict=True):
    assert float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) <= 1e-5 * scale


def test_a_packed_step_equals_the_step_on_the_same_records():
  """One DPO update on a packed batch: the loss, metrics and new parameters of the update on the
  same records unpacked (the empty slots weigh nothing)."""
  cfg = models.ModelConfig(**TINY)
  graphdef = models.abstract(cfg)[0]
  params = INIT(cfg, jax.random.key(0))
  ref = INIT(cfg, jax.random.key(1))
  arrays = _records(cfg.vocab_size)
  arrays = {
    k: v[:, :2] if k in ("tokens_KxL", "loss_mask_KxL", "score_K") else v for k, v in arrays.items()
  }
  arrays["loss_mask_KxL"][2, 1, 5] = 1.0  # Pairs: both responses scored.
  batch = _packed(arrays, shared=True)
  ids = np.asarray(batch["id_B"])[np.asarray(batch["example_mask_B"]) > 0]
  plain = {
    "tokens_BxKxL": jnp.asarray(arrays["tokens_KxL"][ids]),
    "loss_mask_BxKxL": jnp.asarray(arrays["loss_mask_KxL"][ids]),
    "example_mask_B": jnp.ones(len(ids)),
  }
  # Adam's first update is −lr·g/(|g| + ε): with the usual ε = 1e-8 it would magnify the last
  # bits of a near-zero gradient entry, hence ε = 1e-3 here.
  update, tx = dpo_update(graphdef, ref, eps=1e-3)
  state = step.init_state(params, tx, 0)
  (s_packed, m_packed), (s_plain, m_plain) = update(state, batch), update(state, plain)
  assert set(m_packed) == set(m_plain) | {"data/padding_packed", "data/records_per_row"}
  np.testing.assert_allclose(m_packed["data/records_per_row"], len(ids) / ROWS)
  np.testing.assert_allclose(
    m_packed["data/padding_packed"], np.mean(np.asarray(batch["pack_segment_BxS"]) == 0)
  )
  for key in m_plain:
    np.testing.assert_allclose(m_packed[key], m_plain[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for x, y in zip(jax.tree.leaves(s_packed.params), jax.tree.leaves(s_plain.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)  # 1e-4 of the step (lr 1e-2).


def test_bad_records_are_refused_with_their_number():
  arrays = _records(50)
  with pytest.raises(ConfigError, match=r"record \d+ needs \d+ slots"):
    packing.check_records(arrays, True, 8)
  arrays["loss_mask_KxL"][4] = 0.0
  with pytest.raises(ConfigError, match="record 4 has no scored token"):
    packing.check_records(arrays, True, PACK_LEN)


def test_the_flat_layout_of_a_shared_record():
  """Prompt [7 8], responses [1 2] and [4 5 6]: [7 8 | 1 2 | 4 5 6], each response's first token
  predicted from the prompt's last slot, positions continuing from the prompt's end."""
  record = {
    "tokens_KxL": np.array([[7, 8, 1, 2, 0], [7, 8, 4, 5, 6]], np.int32),
    "loss_mask_KxL": np.array([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], np.float32),
  }
  flat = packing.flatten(record, shared=True)
  np.testing.assert_array_equal(flat["tokens"], [7, 8, 1, 2, 4, 5, 6])
  np.testing.assert_array_equal(flat["positions"], [0, 1, 2, 3, 2, 3, 4])
  np.testing.assert_array_equal(flat["branch"], [0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(flat["prev"], [-1, 0, 1, 2, 1, 4, 5])
  np.testing.assert_array_equal(flat["scored"], [0, 0, 1, 1, 1, 1, 1])
  unshared = packing.flatten(record, shared=False)
  np.testing.assert_array_equal(unshared["tokens"], [7, 8, 1, 2, 7, 8, 4, 5, 6])
  np.testing.assert_array_equal(unshared["branch"], [1, 1, 1, 1, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(unshared["prev"], [-1, 0, 1, 2, -1, 4, 5, 6, 7])


def _pairs_file(path, n: int = 48):
  """Pairs of unequal lengths: prompts of 2-12 tokens, responses of 1-8."""
  rng = np.random.default_rng(0)

  def ids(lo, hi):
    return rng.integers(1, 8, rng.integers(lo, hi + 1)).tolist()

  lines = [
    json.dumps({"prompt": ids(2, 12), "chosen": ids(1, 8), "rejected": ids(1, 8)}) for _ in range(n)
  ]
  path.write_text("\n".join(lines) + "\n")
  return f"jsonl:{path}"


def _packed_run(workdir, source, steps, **data):
  cfg = load_config("dpo", "smoke")
  with cfg.unlocked():
    cfg.data.source, cfg.data.max_len = source, 0
    cfg.data.share_prompt = "on"
    cfg.data.update({"batch_size": 2, "pack_len": 40, "pack_records": 4, **data})
    cfg.mesh.shape, cfg.total_steps, cfg.checkpoint_every, cfg.log_every = (2, 1, 1), steps, 3, 1
  return train.run(cfg, str(workdir))


def test_a_packed_run_resumes_bit_identically_and_reports_its_padding(tmp_path):
  """DPO on pairs of unequal lengths packed into rows of 40 slots: 3 steps then a resume to 6
  give the 6-step run's losses bit for bit (the packer's position is in the checkpoint); the
  rows (sharing each record's prompt) hold several records each and far less padding than the
  records' own rows."""
  source = _pairs_file(tmp_path / "pairs.jsonl")
  _packed_run(tmp_path / "a", source, 3)
  _packed_run(tmp_path / "a", source, 6)  # Resumes at step 3.
  _packed_run(tmp_path / "b", source, 6)
  resumed, straight = (read_jsonl(tmp_path / w / "metrics.jsonl") for w in "ab")
  losses = [{r["step"]: r["loss"] for r in run if "loss" in r} for run in (resumed, straight)]
  assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3, 4, 5, 6]
  assert losses[0] == losses[1]  # Exactly.
  start = next(r for r in straight if "data/padding_unpacked" in r)
  steps = [r for r in straight if "data/padding_packed" in r]
  packed = np.mean([r["data/padding_packed"] for r in steps])
  # Measured: 0.44 of the records' own slots are padding, 0.04 of the packed rows'.
  assert start["data/padding_unpacked"] > 0.3 and packed < 0.15
  assert np.mean([r["data/records_per_row"] for r in steps]) > 1.5


def test_packing_is_refused_where_it_does_not_apply(tmp_path):
  cfg = load_config("rloo", "smoke")
  with cfg.unlocked():
    cfg.data.pack_len = 64
  with pytest.raises(ConfigError, match="data.pack_len=64 does not apply to objective 'rloo'"):
    train.run(cfg, str(tmp_path / "rloo"))
  source = _pairs_file(tmp_path / "pairs.jsonl")
  with pytest.raises(ConfigError, match=r"data.pack_len=12: record \d+ needs \d+ slots"):
    _packed_run(tmp_path / "short", source, 1, pack_len=12)


def test_each_process_packs_its_own_share_of_the_stream():
  """Two processes: process p packs records p, p + 2, … of the (here unshuffled) stream of 6
  records, so their records are disjoint; each gets its half of the batch's rows."""
  arrays = {k: v[:6] for k, v in _records(50).items()}
  for p in range(2):
    it = packed_stream(
      arrays,
      shared=True,
      pack_len=PACK_LEN,
      pack_records=PACK_RECORDS,
      rows=4,
      process=(p, 2),
    )
    batch = next(it)
    assert batch["pack_tokens_S"].shape == (2, PACK_LEN)
    assert batch["tokens_KxL"].shape == (2 * PACK_RECORDS, K, L)
    ids = batch["id"][batch["example_mask"] > 0]
    assert len(ids) >= 2 and np.all(ids % 2 == p)


def test_sft_records_pack_many_to_a_row():
  """Corpus records (K = 1, documents of 2-10 tokens scored from position 1): packed 8 to a row
  of 40 slots where they fit, rebuilt exactly."""
  rng = np.random.default_rng(3)
  length_N = rng.integers(2, 11, 24)
  tokens = np.where(np.arange(10) < length_N[:, None], rng.integers(1, 50, (24, 10)), 0)
  mask = (np.arange(10) >= 1) & (np.arange(10) < length_N[:, None])
  arrays = {
    "tokens_KxL": tokens[:, None].astype(np.int32),
    "loss_mask_KxL": mask[:, None].astype(np.float32),
    "id": np.arange(24, dtype=np.int32),
  }
  batch = packed_batch(arrays, shared=False, pack_len=40, pack_records=8, rows=2)
  filled = np.flatnonzero(np.asarray(batch["example_mask_B"]))
  ids = np.asarray(batch["id_B"])[filled]
  assert len(ids) > 4  # More than two records a row.
  np.testing.assert_array_equal(
    np.asarray(batch["tokens_BxKxL"])[filled], arrays["tokens_KxL"][ids]
  )
  np.testing.assert_array_equal(
    np.asarray(batch["loss_mask_BxKxL"])[filled], arrays["loss_mask_KxL"][ids]
  )
  assert int(np.sum(np.asarray(batch["pack_segment_BxS"]) > 0)) == int(length_N[ids].sum())


def test_the_stream_outlasts_a_run_whose_rows_hold_many_records():
  """Short records, many to a row: the packed stream still has every step's batch (the epochs
  are counted from the most records a row can hold)."""
  arrays = {k: v[:4] for k, v in _records(50).items()}
  it = packed_stream(
    arrays,
    shared=True,
    pack_len=PACK_LEN,
    pack_records=PACK_RECORDS,
    rows=2,
    total_steps=30,
    shuffle=True,
  )
  batches = [next(it) for _ in range(30)]
  assert all(b["example_mask"].sum() >= 2 for b in batches)
  assert np.mean([b["example_mask"].sum() / 2 for b in batches]) > 1.5  # Records a row.
