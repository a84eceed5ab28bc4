"""The testbed as a task: prompts × responses, its datasets, the cached base LM, exact evaluation.

Tokens: ToyLang ids 0..7, no BOS: a sequence is [prompt (P ≥ 1 tokens), response (T tokens)], and
π(y|x) is the model's conditional of the response given the prompt. Without an input-only token the
model's next-token distribution lives on the language's tokens, so Σ_y π(y|x) = 1 exactly.
"""

import copy
import dataclasses
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.testbed import exact, language


@dataclasses.dataclass(frozen=True)
class Testbed:
  prompts_XxP: np.ndarray        # Every prompt, lexicographic.
  responses_YxT: np.ndarray      # Every response, lexicographic.
  prompt_logw_X: np.ndarray      # log of the prompt distribution (the chain's marginal).
  reward_XxY: np.ndarray         # The gold rule reward r(x, y).
  chain_logp_XxY: np.ndarray     # The oracle conditional of the chain.

  @property
  def seq_len(self) -> int:
    return self.prompts_XxP.shape[1] + self.responses_YxT.shape[1]


def make(tb_cfg) -> Testbed:
  P, T = tb_cfg.prompt_len, tb_cfg.response_len
  if P < 1 or T < 1:
    raise ValueError(f"testbed: prompt_len={P} and response_len={T} must both be >= 1")
  prompts, responses = language.all_sequences(P), language.all_sequences(T)
  reward_Y = language.response_reward(responses)
  return Testbed(
      prompts_XxP=prompts, responses_YxT=responses,
      prompt_logw_X=language.prompt_log_weights(P),
      reward_XxY=np.broadcast_to(reward_Y, (len(prompts), len(responses))).astype(np.float32),
      chain_logp_XxY=language.chain_conditional_logp(P, T))


def corpus(tb: Testbed, n: int, seed: int) -> dict[str, np.ndarray]:
  """MLE records: whole chain samples, every token after the first scored (K = 1)."""
  tokens = language.sample_sequences(np.random.default_rng(seed), n, tb.seq_len).astype(np.int32)
  mask = np.ones_like(tokens, np.float32)
  mask[:, 0] = 0.0
  return {"tokens_KxL": tokens[:, None], "loss_mask_KxL": mask[:, None]}


def sample_responses(rng: np.random.Generator, logp_XxY: np.ndarray, prompt_idx_N: np.ndarray,
                     k: int) -> np.ndarray:
  """k independent response indices per drawn prompt from the exact conditional: int [N, k]."""
  cdf_XxY = np.cumsum(np.exp(logp_XxY.astype(np.float64)), axis=1)
  cdf_NxY = cdf_XxY[prompt_idx_N]
  u_Nxk = rng.random((len(prompt_idx_N), k)) * cdf_NxY[:, -1:]
  idx = np.stack([np.searchsorted(cdf_NxY[n], u_Nxk[n], side="right")
                  for n in range(len(prompt_idx_N))])
  return np.minimum(idx, logp_XxY.shape[1] - 1)


def pairs(tb: Testbed, base_logp_XxY: np.ndarray, n: int, seed: int,
          bt_temperature: float) -> dict[str, np.ndarray]:
  """Preference pairs: prompts from the prompt distribution, two base samples, BT-noisy labels.

  P(a ≻ b) = σ((r_a − r_b) / bt_temperature); K index 0 is the chosen response.
  """
  rng = np.random.default_rng(seed)
  x_N = rng.choice(len(tb.prompts_XxP), size=n, p=np.exp(tb.prompt_logw_X))
  ab_Nx2 = sample_responses(rng, base_logp_XxY, x_N, 2)
  r_Nx2 = tb.reward_XxY[x_N[:, None], ab_Nx2].astype(np.float64)
  p_a = 1.0 / (1.0 + np.exp(-(r_Nx2[:, 0] - r_Nx2[:, 1]) / bt_temperature))
  a_wins = rng.random(n) < p_a
  chosen_Nx2 = np.where(a_wins[:, None], ab_Nx2, ab_Nx2[:, ::-1])
  tokens = np.concatenate([np.repeat(tb.prompts_XxP[x_N][:, None], 2, 1),
                           tb.responses_YxT[chosen_Nx2]], axis=2).astype(np.int32)  # [N, 2, P+T]
  mask = np.zeros(tokens.shape, np.float32)
  mask[:, :, tb.prompts_XxP.shape[1]:] = 1.0
  return {"tokens_KxL": tokens, "loss_mask_KxL": mask,
          "prompt_index": x_N.astype(np.int32), "response_index_K": chosen_Nx2.astype(np.int32)}


def exact_logp_fn(graphdef, tb: Testbed, chunk: int):
  """params -> log π(y|x) for every prompt and response [X, Y] (one enumeration pass)."""
  from align_jax import logps  # Imported here: align_jax.logps imports the model stack.

  def logp_XxY(params):
    fn = lambda tokens: logps.next_token_logprobs(graphdef, params, tokens)
    return exact.prefix_logps(fn, jnp.asarray(tb.prompts_XxP), tb.responses_YxT.shape[1],
                              language.V, chunk=chunk)
  return logp_XxY


# --- The cached base LM -------------------------------------------------------------------------

def cache_root() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "align_jax")


def base_key(tb_cfg, model_cfg) -> str:
  """Identifies a base LM by everything that determines it."""
  fields = ("prompt_len", "response_len", "pretrain_steps", "pretrain_batch", "pretrain_lr",
            "pretrain_examples")
  blob = json.dumps({"testbed": {k: tb_cfg[k] for k in fields}, "model": model_cfg.to_dict(),
                     "chain": "toylang-v1"}, sort_keys=True)
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
  c.data.source = "testbed_corpus"
  c.data.batch_size = tb_cfg.pretrain_batch
  c.data.num_examples = tb_cfg.pretrain_examples
  c.testbed.target = "chain"
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
