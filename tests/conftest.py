"""Every test sees 8 fake CPU devices and a private cache for the testbed base LM."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Testbed base LMs pretrained by tests are cached here for the session (and reused by subprocesses).
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="align_jax_test_cache_"))

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

# Runs of different configs share compiled programs (exact evaluation, init) through the
# persistent cache: identical computations compile once per session. The pytest-xdist workers
# inherit the directory from the controller's environment, and subprocesses (the CLI tests) too.
os.environ.setdefault("ALIGN_JAX_TEST_XLA_CACHE", tempfile.mkdtemp(prefix="align_jax_test_xla_"))
_XLA_CACHE = {
  "JAX_COMPILATION_CACHE_DIR": os.environ["ALIGN_JAX_TEST_XLA_CACHE"],
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Model families' options, for tests that must hold in every family: sliding windows
# on alternating layers (Gemma 2) and every third (Gemma 3, with its own local RoPE base and a
# layer count that is no multiple of the pattern), soft-caps, sandwich and QK norms, biases,
# LayerNorm and learned positions (GPT-2), Llama 3's RoPE scaling.
FAMILIES = {
  "llama3": dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=4),
  "gemma2": dict(
    norm_plus_one=True,
    post_norms=True,
    attn_softcap=2.0,
    final_softcap=3.0,
    sliding_window=3,
    sliding_window_pattern=2,
    query_pre_attn_scalar=24.0,
    embed_scale=True,
    tie_embeddings=True,
    mlp_act="gelu_tanh",
  ),
  "gemma3": dict(
    n_layers=5,
    qk_norm=True,
    post_norms=True,
    norm_plus_one=True,
    sliding_window=3,
    sliding_window_pattern=3,
    rope_theta=1000.0,
    rope_local_theta=50.0,
    rope_scaling="linear",
    rope_factor=2.0,
  ),
  "qwen2": dict(qkv_bias=True),
  "gpt2": dict(
    norm="layer",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    gated_mlp=False,
    mlp_act="gelu_tanh",
    positions="learned",
    max_positions=16,
  ),
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(*args: str) -> list[str]:
  """The CLI as a user runs it."""
  return [sys.executable, "-m", "align_jax.main", *args]


def subprocess_env(devices: int = 8) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONUNBUFFERED"] = "1"
  # This checkout's align_jax, also where the environment's editable install points at another
  # checkout (a git worktree sharing the main checkout's virtualenv).
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  env.update(_XLA_CACHE)
  return env


@pytest.fixture(scope="session")
def devices8():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (see conftest.py)"
  return jax.devices()


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), as the CLI would build it (then locked)."""
  from align_jax import sweep

  cfg = sweep.load(os.path.join(ROOT, "configs", f"{name}.py"), arg)
  cfg.lock()
  return cfg


def read_jsonl(path: str) -> list[dict]:
  import json

  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_study_quick(name: str, tmp_path) -> tuple[dict, str]:
  """experiments/<name>.py --quick through `study.main`, as the command line runs it; checks the
  written table, numbers and plot exist and agree, and returns (the JSON, the markdown)."""
  import importlib.util
  import json

  spec = importlib.util.spec_from_file_location(
    f"experiments_{name}", os.path.join(ROOT, "experiments", f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = module.study.main(
    name,
    module.grids,
    module.analyze,
    argv=["--quick", "--root", str(tmp_path / "runs"), "--out", str(tmp_path)],
  )
  for ext in ("md", "json", "png"):
    assert os.path.getsize(tmp_path / f"{name}.{ext}") > 0
  assert json.load(open(tmp_path / f"{name}.json"))["meta"] == out["meta"]
  assert out["meta"]["command"] == f"python experiments/{name}.py --quick"
  return out, open(tmp_path / f"{name}.md").read()


SLOW = ("tests/experiments/", "tests/test_plan.py")  # Studies and plans: `pytest -m slow`.
# The default configs trained at their full budget (the README's claims, minutes of training
# each) are studies too; their tests carry `@pytest.mark.slow` where they are.


def pytest_collection_modifyitems(config, items):
  """Marks the studies' and plans' tests `slow` (the fast suite leaves them to `pytest -m slow`)."""
  for item in items:
    path = os.path.relpath(str(item.path), ROOT)
    if path.startswith(SLOW):
      item.add_marker(pytest.mark.slow)


def dpo_update(graphdef, ref_params, *, total_steps: int = 1, eps: float = 1e-8, **bound):
  """(update, tx): a jitted DPO update (state, batch) -> (state, metrics) against `ref_params`,
  β = 0.5, AdamW at lr 1e-2 with clipping at 1; `bound`: further `step.train_step` arguments
  (shared_prompt, log_steps)."""
  import ml_collections as mlc

  from align_jax import objectives, step

  optim = mlc.ConfigDict(
    dict(lr=1e-2, schedule="constant", warmup_steps=0, total_steps=total_steps, b1=0.9, b2=0.99)
  )
  optim.update(eps=eps, weight_decay=0.0, clip_norm=1.0)
  tx = step.optimizer(optim)

  def update(state, batch):
    return step.train_step(
      state,
      batch,
      ref_params,
      graphdef=graphdef,
      objective=objectives.get("dpo"),
      loss_cfg={"beta": 0.5},
      tx=tx,
      lr_fn=step.learning_rate(optim),
      **bound,
    )

  return jax.jit(update), tx


def lora_adapters(shapes, names, rank, seed: int = 1):
  """Random LoRA adapters (scale 0.3) for a model's parameter shapes and names: a gradient test
  needs both factors non-zero."""
  import jax.numpy as jnp
  import numpy as np

  from align_jax.models import lora

  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
    lora.abstract(shapes, names, rank),
  )


def packed_stream(arrays: dict, *, rows: int, total_steps=1, shuffle=False, process=(0, 1), **kw):
  """The packed batches of `arrays`' records (align_jax/data/packing.py; in their order unless
  `shuffle`) as process `process[0]` of `process[1]` reads them; `kw`: shared, pack_len,
  pack_records."""
  from align_jax.data import packing, pipeline

  return packing.batches(
    pipeline.ArraySource(arrays),
    global_rows=rows,
    total_steps=total_steps,
    seed=0,
    shuffle=shuffle,
    process_index=process[0],
    process_count=process[1],
    **kw,
  )


def packed_batch(arrays: dict, **kw):
  """The first packed batch (`packed_stream`) as the step's batch fields (device arrays)."""
  import jax.numpy as jnp

  from align_jax.data import pipeline

  return {
    pipeline.batch_key(k): jnp.asarray(v) for k, v in next(packed_stream(arrays, **kw)).items()
  }
