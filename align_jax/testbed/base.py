"""The testbed's cached base LM: the language model every testbed run starts from.

It is pretrained once by MLE on chain samples (`pretrain_config`, configs/pretrain_testbed.py) and
cached under `$XDG_CACHE_HOME/align_jax/<base_key>`, keyed by everything that determines it.
Concurrent runs on one host wait on a file lock and reuse the first one's result; a fresh base is
staged and then moved into place atomically (`publish_base`).
"""

import copy
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable

import jax
import ml_collections as mlc
from jax.experimental import multihost_utils

from align_jax import checkpoint


def cache_root() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "align_jax")


_NOT_THE_MODEL = ("scan_layers", "logits_chunk", "attention_chunk")


def base_key(tb_cfg, model_cfg) -> str:
  """Identifies a base LM by everything that determines it."""
  fields = (
    "prompt_len",
    "response_len",
    "pretrain_steps",
    "pretrain_batch",
    "pretrain_lr",
    "pretrain_examples",
  )
  blob = json.dumps(
    {
      "testbed": {k: tb_cfg[k] for k in fields},
      # The parameters' layout and the chunks of log-probs and attention do not change the base
      # LM (read_lm converts the layout).
      "model": {k: v for k, v in model_cfg.to_dict().items() if k not in _NOT_THE_MODEL},
      "chain": "toylang-v1",
      "params": "head-dim-E",
    },
    sort_keys=True,
  )
  return "testbed-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_dir(tb_cfg, model_cfg) -> str:
  return os.path.join(cache_root(), base_key(tb_cfg, model_cfg))


def pretrain_config(tb_cfg, model_cfg, seed: int = 0):
  """The config that trains the base LM for these settings (configs/pretrain_testbed.py)."""
  from align_jax import config_lib

  tb_cfg, model_cfg = copy.deepcopy(tb_cfg), copy.deepcopy(model_cfg)
  c = config_lib.base()
  c.name = "pretrain_testbed"
  c.objective = "sft"
  c.seed = seed
  c.model = model_cfg
  c.testbed = tb_cfg
  c.total_steps = tb_cfg.pretrain_steps
  c.log_every = max(tb_cfg.pretrain_steps // 10, 1)
  c.eval_every = 0
  c.checkpoint_every = tb_cfg.pretrain_steps
  c.keep_checkpoints = 1
  c.data.source = "testbed"
  c.data.batch_size = tb_cfg.pretrain_batch
  c.data.num_examples = tb_cfg.pretrain_examples
  c.target.kind = "chain"
  c.optim.lr = tb_cfg.pretrain_lr
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = min(50, tb_cfg.pretrain_steps // 10)
  return c


def staging_dir(tb_cfg, model_cfg) -> str:
  """Where every process writes a fresh base before `publish_base` moves it into place."""
  return base_dir(tb_cfg, model_cfg) + ".staging"


def publish_base(tb_cfg, model_cfg, info: dict) -> str:
  """Moves the staged base into the cache atomically (process 0 only); returns its directory."""
  final, staging = base_dir(tb_cfg, model_cfg), staging_dir(tb_cfg, model_cfg)
  with open(os.path.join(staging, "info.json"), "w") as f:
    json.dump(info, f, indent=1)
  if os.path.isdir(final):  # Another run finished first; keep theirs.
    shutil.rmtree(staging)
  else:
    os.replace(staging, final)
  return final


def language_model(model_cfg):
  """The language model a testbed run's model starts from: reward models (num_scores > 0) start
  from the language model's body, so they share its base."""
  lm = mlc.ConfigDict(model_cfg.to_dict())
  lm.num_scores = 0
  lm.scan_layers = False  # Stored unrolled; a scan_layers run stacks it as it reads it.
  return lm


def ensure(cfg, pretrain: Callable) -> str:
  """The cached base LM's directory for `cfg`'s testbed and model settings; pretrains it first if
  it is not cached. `pretrain(config, workdir)` trains a config and returns its result (the run
  function of align_jax.train, passed in so the testbed does not import the trainer)."""
  lm = language_model(cfg.model)
  path = base_dir(cfg.testbed, lm)
  if os.path.isdir(os.path.join(path, "params")):
    return path
  if jax.process_count() > 1:
    return _pretrain(cfg, lm, path, pretrain)
  os.makedirs(os.path.dirname(path), exist_ok=True)  # Other runs on this host wait, then reuse.
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.isdir(os.path.join(path, "params")):
      return path
    return _pretrain(cfg, lm, path, pretrain)


def _pretrain(cfg, lm, path: str, pretrain: Callable) -> str:
  """Trains the base LM (configs/pretrain_testbed.py) and publishes it into the cache at `path`."""
  print(
    f"pretraining the testbed base LM ({cfg.testbed.pretrain_steps} steps), cached in {path}",
    flush=True,
  )
  pcfg = pretrain_config(cfg.testbed, lm)
  pcfg.mesh, pcfg.rules = cfg.mesh, cfg.rules
  result = pretrain(pcfg, path + ".run")
  staging = staging_dir(pcfg.testbed, pcfg.model)
  if jax.process_index() == 0 and os.path.isdir(staging):
    shutil.rmtree(staging)
  multihost_utils.sync_global_devices("testbed_base_staging")
  checkpoint.save_params(os.path.join(staging, "params"), result.state.params)
  if jax.process_index() == 0:
    publish_base(pcfg.testbed, pcfg.model, result.summary)
  multihost_utils.sync_global_devices("testbed_base_published")
  return path
