"""Shared config vocabulary: typed `path:arg` parsing, the base config every file extends, sweeps.

Every file in `configs/` builds its `ConfigDict` from `base()`, so the same override reads the same
everywhere (`--config.optim.lr=1e-4`, `--config.mesh.shape="(2,2,2)"`). Structure (model size, list
size, smoke) is chosen through the string after the colon: `--config=configs/dpo.py:smoke`.
"""

import itertools
import math
import types
from typing import Any

import ml_collections as mlc

from align_jax.models import presets as models
from align_jax.errors import ConfigError


def parse_arg(arg: str | None, **defaults: Any) -> types.SimpleNamespace:
  """Parses `"k=v,flag,k2=v2"` with types taken from `defaults`; unknown keys are errors.

  A bare name sets a bool default to True (`smoke` means `smoke=True`).
  """
  values = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"config arg {key!r} is unknown; known: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"config arg {key!r} needs a value ({key}=...)")
      values[key] = True
      continue
    values[key] = _typed(key, raw.strip(), default)
  return types.SimpleNamespace(**values)


def _typed(key: str, raw: str, default: Any) -> Any:
  if isinstance(default, bool):
    if raw.lower() in ("1", "true", "yes"):
      return True
    if raw.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config arg {key}={raw!r} is not a bool")
  if isinstance(default, (int, float)):
    try:
      return type(default)(raw)
    except ValueError:
      raise ConfigError(f"config arg {key}={raw!r} is not {type(default).__name__}") from None
  return raw


def base() -> mlc.ConfigDict:
  """Fields shared by every config. Each file sets `objective`, `loss` and what it changes."""
  c = mlc.ConfigDict()
  c.name = ""  # Set by each config file; default workdir is runs/<name>.
  c.seed = 0
  c.total_steps = 100
  c.log_every = 10  # Console / metrics.jsonl / TensorBoard interval (steps).
  c.eval_every = (
    50  # Evaluation interval (steps; testbed: exact, files: validation); 0 = start and end.
  )
  c.checkpoint_every = 50  # Orbax save interval (steps); the last step is always saved.
  c.keep_checkpoints = 2  # How many recent checkpoints to keep.
  c.async_checkpointing = True

  # Mesh over ("data", "fsdp", "tensor"); one -1 takes the remaining devices.
  c.mesh = mlc.ConfigDict(dict(shape=(1, -1, 1), axes=("data", "fsdp", "tensor")))
  # Logical axis -> mesh axes. Parameters and activations (act_*) have separate names; each name
  # appears once (checked at start-up), and every name the model uses must be here.
  c.rules = (
    ("layers", None),  # The leading axis of scanned layers' stacked parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("scores", None),
    ("positions", None),  # Learned position rows (GPT-2).
    ("bias", None),  # Biases over D.
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
  )

  c.objective = ""
  c.loss = mlc.ConfigDict()  # The objective's keyword arguments.
  c.model = mlc.ConfigDict()  # Filled from align_jax.models.presets by set_model.
  # The preset `model` was built from ('' = by hand). A Hugging Face init_checkpoint's config.json
  # is the architecture: a fresh-init preset (presets.FRESH: testbed, tiny) yields to it, and
  # only the model fields that differ from that preset (overrides) must agree with it; any other
  # preset, or a hand-built model, must agree with it in every field that changes the computation.
  c.model_preset = ""
  # What the parameters start from: '' (fresh init from the seed), "testbed" (the cached testbed
  # base LM), an Orbax params directory, or a Hugging Face model directory.
  c.init_checkpoint = ""
  # A frozen teacher LM (objective gkd; target.kind = teacher; rollout.anchor = teacher): path ''
  # (none), a run's workdir (its newest checkpoint), an Orbax params or Hugging Face directory,
  # testbed (the cached testbed base LM of teacher.model's architecture) or init:<seed> (a fresh
  # init); model: a preset name ('' = the student's architecture; a workdir or HF dir has its own).
  c.teacher = mlc.ConfigDict(dict(path="", model=""))
  c.reward_model = ""  # On-policy: the workdir of a trained reward-model run to use as
  # the reward instead of the task's rule (testbed: gold reward).
  # LoRA (align_jax/models/lora.py): only adapters W + (alpha/rank)·A·B are trained and
  # checkpointed; the base (init_checkpoint) is frozen and, with adapters off, the reference.
  c.lora = mlc.ConfigDict(
    dict(
      rank=0,  # 0: off (every parameter is trained).
      alpha=16.0,
      targets=("attn", "mlp"),  # attn: the q/k/v/o projections; mlp: gate/up/down.
    )
  )

  c.optim = mlc.ConfigDict(
    dict(
      lr=1e-3,
      warmup_steps=0,
      schedule="constant",  # constant | cosine (to 0 at total_steps, after warmup)
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      clip_norm=1.0,  # Global-norm clipping; 0 disables.
    )
  )

  c.data = mlc.ConfigDict(
    dict(
      # testbed, or a file / dataset: jsonl:PATH, arrayrecord:PATH, tfds:NAME/SPLIT[@DATA_DIR]
      # (align_jax/data/preference.py; on-policy prompts: align_jax/data/prompts.py). The
      # objective decides the record format.
      source="testbed",
      # Text fields (align_jax/data/tokenize.py): a tokenizer.json, tokenizer.model or HF
      # tokenizer directory; the chat template: '' (text as it is, messages through the
      # tokenizer's own template) | tokenizer (its own, for text too) | PATH.jinja | plain |
      # llama3 | gemma | chatml | qwen2 | qwen2.5 (built in); a system message before each prompt.
      tokenizer="",
      chat_template="",
      system_prompt="",
      prompt_len=0,  # On-policy file prompts: tokens per prompt (P), longer cut.
      batch_size=64,  # Global prompts per step (B).
      max_len=0,  # Tokens per sequence (L) for file sources; 0 = from the data.
      list_size=4,  # Ranked lists: responses per prompt (K); files: 0 = longest.
      num_samples=4,  # Negatives-only (D2O): the model's own samples per negative.
      num_examples=4096,  # Testbed datasets: records generated; file prompts: read.
      precompute_ref=False,  # Reference log-probs once per dataset, cached in the workdir.
      # An example's K responses in one row [prompt | r1 | … | rK] (block-causal attention,
      # align_jax/logps.py): the prompt is computed once; the same log-probs. auto: where it
      # saves work, prompts of >= 16 tokens; on; off.
      share_prompt="auto",
      # Fixed records packed several to a row of pack_len token slots, with segment ids (Grain's
      # best-fit packer; align_jax/data/packing.py): data.batch_size then counts rows, each of at
      # most pack_records records. 0: one record per row, padded to data.max_len.
      pack_len=0,
      pack_records=8,
      # BCO's underlying-distribution matching: undesirable examples weighted by the clipped
      # density ratio p̂/(1−p̂) of a prompt classifier (align_jax/data/udm.py).
      udm=False,
      udm_per_class=1024,  # Prompts per class the classifier is fitted on (TRL: 1024).
      udm_min_ratio=0.5,  # Clip range of the density ratio (TRL: 0.5, 10).
      udm_max_ratio=10.0,
      shuffle=True,
      # Validation on file data (align_jax/validate.py): a held-out random share of the
      # source's records, or another source in the same format; evaluated at the start, every
      # eval_every steps and at the end.
      eval_fraction=0.0,
      eval_source="",
    )
  )

  c.sampling = mlc.ConfigDict(
    dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4, eos_id=-1)
  )

  # On-policy objectives: per prompt, num_policy samples of the policy and num_anchor of the
  # anchor; the anchor is the frozen reference, an EMA of the policy, or a periodic copy of it.
  # One rollout feeds updates_per_batch passes of `minibatches` updates each (one step each, on
  # consecutive slices of its prompts); informative_prompts > 0 keeps that many of the
  # data.batch_size prompts rolled out, those whose samples' rewards differ first (DAPO).
  c.rollout = mlc.ConfigDict(
    dict(
      num_policy=2,
      num_anchor=0,
      anchor="reference",
      anchor_ema=0.02,
      anchor_every=50,
      updates_per_batch=1,
      minibatches=1,
      informative_prompts=0,
    )
  )

  # The run's target distribution, for exact divergences and for f-DPG's / GDC's energy-based
  # target (align_jax/testbed/target.py): '' (none) | chain | rlhf | bon | pointwise |
  # distributional | hybrid. rlhf (π_ref·exp(r/β)) also applies to file prompts with a learned
  # reward; the others are defined on the testbed (their settings are in testbed.*).
  c.target = mlc.ConfigDict(dict(kind="", beta=1.0))

  c.testbed = mlc.ConfigDict(
    dict(
      prompt_len=2,  # First tokens of a ToyLang string are the prompt ...
      response_len=4,  # ... the rest the response: 8**2 prompts x 8**4 responses.
      bt_temperature=1.0,  # Bradley-Terry noise of preference labels: P(a>b)=sigmoid((ra-rb)/T).
      pretrain_steps=600,  # The cached base LM: MLE on chain samples.
      pretrain_batch=256,
      pretrain_lr=3e-3,
      pretrain_examples=200_000,
      eval_chunk=8192,  # Rows per forward in the exact enumeration pass.
      exact_eval=True,  # Exact evaluation at start, every eval_every steps and at the end.
      # Settings of the testbed-only targets (target.kind above):
      constraint_token=6,  # pointwise target: b = the response contains this token (g) ...
      epsilon=0.0,  # ... smoothed to max(b, ε) when ε > 0 (for reverse KL).
      moment=0.5,  # distributional target: E_p[response starts with e or f] = this
      # (hybrid: both, λ fitted on a·b).
      reward_transform="",  # On-policy training reward: '' (gold r) | lsc: log σ(r − E_ref[r|x]).
      target_n=4,  # N of the bon target, Best-of-N of π_ref (ties included) ...
      target_jeffreys=0.5,  # ... and the mix β of exact/jeffreys_bon (1−β)KL(BoN‖π) + βKL(π‖BoN).
      tie_alpha=0.5,  # Ternary labels: Rao–Kupper tie parameter α (objective todo).
      eval_pairs=2048,  # Held-out BT pairs for exact/ranking_accuracy (0: none).
      distinct_samples=16,  # exact/distinct_*: expected Distinct-n of this many samples per
      # prompt (exact, by enumeration; 0: not computed).
      categories=6,  # Distributional labels (DPRM): ordered rating categories C ...
      voters=10,  # ... and simulated annotators per response.
    )
  )
  return c


# ---- Start-up checks of the fields above -----------------------------------------------------
# One row per field: (key, holds(value), requirement). `train.run` checks every row whose key the
# config has before it touches the workdir; objectives add rows for their `loss.*` fields
# (`objectives.Objective.checks`). A failing row is one ConfigError naming the key and its value.


def interval(low: float, high: float = math.inf, *, open_low=False, open_high=False):
  """(holds, requirement) of a finite real number in the interval."""

  def holds(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

  if high == math.inf:
    return holds, f"finite and {'>' if open_low else '>='} {low:g}"
  brackets = "(" if open_low else "[", ")" if open_high else "]"
  return holds, f"in {brackets[0]}{low:g}, {high:g}{brackets[1]}"


def whole(low: int):
  """(holds, requirement) of an integer >= low."""

  def holds(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low

  return holds, f"an integer >= {low}"


POSITIVE = interval(0, open_low=True)
NON_NEGATIVE = interval(0)
PROBABILITY = interval(0, 1)

CHECKS = (
  ("seed", *whole(0)),
  ("total_steps", *whole(1)),
  ("log_every", *whole(0)),
  ("eval_every", *whole(0)),
  ("checkpoint_every", *whole(0)),
  ("keep_checkpoints", whole(1)[0], "an integer >= 1 (0 would keep nothing to resume from)"),
  ("optim.lr", *NON_NEGATIVE),
  ("optim.warmup_steps", *whole(0)),
  ("optim.b1", *interval(0, 1, open_high=True)),
  ("optim.b2", *interval(0, 1, open_high=True)),
  ("optim.eps", *NON_NEGATIVE),
  ("optim.weight_decay", *NON_NEGATIVE),
  ("optim.clip_norm", *NON_NEGATIVE),
  ("data.batch_size", *whole(1)),
  ("data.num_examples", *whole(1)),
  ("data.list_size", *whole(0)),
  ("data.num_samples", *whole(1)),
  ("data.max_len", *whole(0)),
  ("data.prompt_len", *whole(0)),
  ("data.share_prompt", lambda v: v in ("auto", "on", "off"), "auto, on or off"),
  ("data.pack_len", *whole(0)),
  ("data.pack_records", *whole(1)),
  ("data.udm_per_class", *whole(1)),
  ("data.udm_min_ratio", *POSITIVE),
  ("data.udm_max_ratio", *POSITIVE),
  ("sampling.temperature", *NON_NEGATIVE),
  ("sampling.top_k", *whole(0)),
  ("sampling.top_p", *interval(0, 1, open_low=True)),
  ("sampling.max_new_tokens", *whole(1)),
  ("rollout.num_policy", *whole(0)),
  ("rollout.num_anchor", *whole(0)),
  ("rollout.anchor_ema", *PROBABILITY),
  ("rollout.anchor_every", *whole(1)),
  ("target.beta", *POSITIVE),
  *((f"model.{k}", *whole(1)) for k in ("vocab_size", "d_model", "n_layers", "n_heads")),
  *((f"model.{k}", *whole(1)) for k in ("n_kv_heads", "head_dim", "mlp_dim")),
  ("testbed.prompt_len", *whole(1)),
  ("testbed.response_len", *whole(1)),
  ("testbed.bt_temperature", *POSITIVE),
  ("testbed.pretrain_steps", *whole(1)),
  ("testbed.pretrain_batch", *whole(1)),
  ("testbed.pretrain_lr", *NON_NEGATIVE),
  ("testbed.pretrain_examples", *whole(1)),
  ("testbed.eval_chunk", *whole(1)),
  ("testbed.epsilon", *PROBABILITY),
  ("testbed.moment", *interval(0, 1, open_low=True, open_high=True)),
  ("testbed.target_n", *whole(1)),
  ("testbed.target_jeffreys", *PROBABILITY),
  ("testbed.eval_pairs", *whole(0)),
  ("testbed.distinct_samples", *whole(0)),
  ("testbed.categories", *whole(2)),
  ("testbed.voters", *whole(1)),
)


def check(cfg: mlc.ConfigDict, rows, context: str = "") -> None:
  """Raises a ConfigError for the first row whose key `cfg` has and whose value fails."""
  for key, holds, requirement in rows:
    node, *path = key.split(".")
    value = cfg.get(node)
    for name in path:
      value = value.get(name) if isinstance(value, mlc.ConfigDict) else None
    if value is not None and not holds(value):
      raise ConfigError(f"{key}={value!r} must be {requirement}{context}")


def testbed_preference(c: mlc.ConfigDict, *, rlhf_target: bool = False) -> None:
  """Offline preference training on the testbed from its cached base LM (the shared defaults).

  With `rlhf_target`, the exact metrics include the divergences to π_ref·exp(r/(β·T)), the
  population optimum of DPO-style objectives on Bradley–Terry labels of temperature T (needs
  `loss.beta`; follows later overrides of β and T).
  """
  c.init_checkpoint = "testbed"  # The cached testbed base LM (pretrained on first use).
  c.data.batch_size = 64
  c.data.num_examples = 8192
  if rlhf_target:
    c.target.kind = "rlhf"
    c.target.beta = c.loss.get_ref("beta") * c.testbed.get_ref("bt_temperature")
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 10
  c.total_steps = 300
  c.log_every = 25
  c.eval_every = 100
  c.checkpoint_every = 100


def testbed_on_policy(c: mlc.ConfigDict) -> None:
  """On-policy training on the testbed from its cached base LM (prompts drawn from the chain)."""
  c.init_checkpoint = "testbed"
  c.data.batch_size = 32  # Prompts per step; each gets the rollout's samples.
  c.data.num_examples = 8192  # Prompt draws (the dataset the Grain pipeline cycles through).
  c.sampling.max_new_tokens = c.testbed.get_ref("response_len")
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 10
  c.total_steps = 150
  c.log_every = 25
  c.eval_every = 50
  c.checkpoint_every = 50


# configs/lipo.py's `loss` arg -> objective; every one trains on ranked lists (ALGORITHMS.md §3.2).
LISTWISE = {
  "lambda": "lipo",
  "listmle": "listmle",
  "softmax": "list_softmax",
  "pair_logistic": "list_pair_logistic",
  "pair_hinge": "list_pair_hinge",
}


def listwise(name: str, objective: str, arg: str | None) -> mlc.ConfigDict:
  """A LiPO-family config on testbed ranked lists; `arg` takes smoke, model and k (list size).

  Scores s = β·log(π/π_ref), β = 0.05 (LiPO's small β, [M] in ALGORITHMS.md §3.3); losses are
  sums over a list's labelled pairs / positions; labels are BT win shares (task.lists).
  """
  arg = parse_arg(arg, smoke=False, model="testbed", k=4)
  c = base()
  c.name = name
  c.objective = objective
  c.loss.beta = 0.05
  if objective == "lipo":
    c.loss.discount = "log2"  # Rank discount D(τ) = log2(1 + τ) (LambdaRank); ln rescales.
  if objective == "list_pair_hinge":
    c.loss.delta = 1.0  # Hinge margin (LiPO / RSO / TRL).
  set_model(c, arg.model)
  testbed_preference(c)
  c.data.list_size = arg.k
  if arg.smoke:
    smoke(c)
  return c


def set_model(c: mlc.ConfigDict, name: str) -> None:
  """c.model from the preset `name`, recorded in c.model_preset (see `base`)."""
  c.model = models.preset(name)
  c.model_preset = name


def smoke(c: mlc.ConfigDict) -> None:
  """Shrinks any config to seconds on a CPU; the code path is unchanged."""
  set_model(c, "tiny")
  c.testbed.response_len = 3
  c.testbed.pretrain_steps = 60
  c.testbed.pretrain_batch = 64
  c.testbed.pretrain_examples = 4096
  c.testbed.eval_chunk = 4096
  c.data.batch_size = 16
  c.data.num_examples = 512
  c.total_steps = 6
  c.log_every = 2
  c.eval_every = 3
  c.checkpoint_every = 3
  c.optim.warmup_steps = 0


def product(**axes: list[Any]) -> list[dict[str, Any]]:
  """Cartesian product of override lists: product(a=[1, 2], b=[3]) -> [{a:1,b:3}, {a:2,b:3}]."""
  keys = list(axes)
  return [dict(zip(keys, vals)) for vals in itertools.product(*axes.values())]
