r"""f-DPG (Go et al. 2023, arXiv 2302.08215): approximate an energy-based target with any f-divergence.

The target is P(y|x) = π_ref(y|x)·φ(x, y) on the testbed, one partition function per prompt:
`task` pointwise (GDC: the response must contain token g; P = a·b), distributional (GDC: the
response's first token is e or f with probability 0.5 overall; P = a·exp(λφ), λ fitted exactly by
moment matching), hybrid (both: P = a·b·exp(λφ), λ fitted on a·b) or rlhf (P = a·exp(r/β);
testbed.reward_transform = lsc uses log σ(r − E_ref[r|x]) instead of r). The policy samples rollout.num_policy responses per
prompt (on-policy: the proposal q is the policy, weights π/q = 1), or with proposal=offline a
frozen copy q samples them (importance weights π/q) and is replaced by π every
rollout.anchor_every steps when the IS estimate of D(p‖π) is below D(p‖q) (§1.6); each sample's pseudo-reward
−f'(π/p) with the running per-prompt Ẑ gives the surrogate loss of ALGORITHMS.md §1.5, minus a
baseline: the mean of the last loss.baseline_window pseudo-rewards of previous steps (naver/disco),
`exact` (forward KL's B = 1) or none. Samples outside the target's support (pointwise, b = 0) are
given the table's limit pseudo-reward (loss.outside_support = limit: forward KL 0, TV −½, JS
−½ log 2; `mask` drops them instead); reverse KL, Pearson and Amari are +∞ against a hard
constraint, so for them the pointwise task smooths it, testbed.epsilon = 0.01 (b_ε = max(b, ε)).
disco's defaults: JS, window 1024. The exact metrics are the divergences to the normalised target.

  python -m align_jax.main --config=configs/fdpg.py                       # JS, pointwise
  python -m align_jax.main --config=configs/fdpg.py:divergence=forward_kl,task=distributional
  python -m align_jax.main --config=configs/fdpg.py:divergence=reverse_kl,task=rlhf
  python -m align_jax.main --config=configs/fdpg.py:divergence=amari --config.loss.alpha=0.5
  python -m align_jax.main --config=configs/fdpg.py:divergence=forward_kl,proposal=offline   # DPG with q
  python -m align_jax.main --config=configs/fdpg.py:smoke
  # The divergence × target study (get_sweep; experiments/fdpg.py tabulates it):
  python -m align_jax.sweep --config=configs/fdpg.py --local --seeds=0,1,2

Expected (default): the run's own divergence to the target falls by more than half from the base
(exact/js for JS, exact/kl_target_policy for forward KL, exact/kl_policy_target for reverse KL,
exact/tv for TV); pointwise: exact/constraint_rate rises towards 1.
"""

from align_jax import config_lib
from align_jax.objectives import fdpg

TASKS = ("pointwise", "distributional", "hybrid", "rlhf")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(
    arg, smoke=False, model="testbed", divergence="js", task="pointwise", proposal="policy"
  )
  if arg.divergence not in fdpg.DIVERGENCES:
    raise ValueError(
      f"config arg divergence={arg.divergence!r} is unknown; known: {fdpg.DIVERGENCES}"
    )
  if arg.task not in TASKS:
    raise ValueError(f"config arg task={arg.task!r} is unknown; known: {TASKS}")
  if arg.proposal not in ("policy", "offline"):
    raise ValueError(f"config arg proposal={arg.proposal!r} is unknown; known: policy, offline")
  c = config_lib.base()
  c.name = f"fdpg_{arg.divergence}_{arg.task}"
  c.objective = "fdpg"
  config_lib.set_model(c, arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 4  # Samples per prompt (the proposal is the policy itself).
  if arg.proposal == "offline":  # Samples from a frozen copy q, replaced by π when π is closer.
    c.rollout.num_policy, c.rollout.num_anchor = 0, 4
    c.rollout.anchor = "proposal"
    c.rollout.anchor_every = 10  # naver/gdc's q_update_interval.
  c.loss.divergence = arg.divergence
  c.loss.alpha = 0.5  # Amari order α (divergence=amari only).
  # Samples with P = 0 get the table's limit pseudo-reward (the unbiased estimator); divergences
  # whose limit is −∞ use a smoothed target instead, where no sample has P = 0. "mask" (dropping
  # them) would bias the TV and JS gradients: their limits −½ and −½ log 2 are finite.
  c.loss.outside_support = (
    "mask" if arg.divergence in ("reverse_kl", "pearson", "amari") else "limit"
  )
  c.loss.baseline = "window"  # window | exact (forward KL) | none.
  c.loss.baseline_window = 1024  # Past pseudo-rewards averaged by the baseline (disco: 1024).
  c.loss.proposal_criterion = "kl"  # Offline proposal: q ← π when D(p‖π) < D(p‖q) by kl | tv.
  c.loss.clip_log_ratio = 0.0  # > 0 clips log(π/p) to ±c before the pseudo-reward (0: exact).
  c.target.kind = arg.task
  c.target.beta = 1.0  # rlhf task: β of a·exp(r/β).
  if arg.task in ("pointwise", "hybrid") and arg.divergence in ("reverse_kl", "pearson", "amari"):
    c.testbed.epsilon = 0.01  # These divergences are +∞ against a hard constraint.
  if arg.smoke:
    config_lib.smoke(c)
  return c


def get_sweep(arg: str | None = None, quick: bool = False) -> list[dict]:
  """ABLATIONS.md R1: divergence ∈ {forward KL, reverse KL, TV, JS} × task ∈ {pointwise,
  distributional, rlhf}, one shared learning rate (the config's, untuned per divergence).

  Reverse KL on the pointwise task trains against b_ε with ε = 1e-5 (ABLATIONS.md §3.2: the
  default 0.01 puts ~15% of the target's mass on violations and caps its alignment).
  quick: JS on the pointwise task and forward KL on the distributional one (the smoke tests'
  programs, so a test session compiles them once).
  """
  del arg
  if quick:
    return ["divergence=js,task=pointwise", "divergence=forward_kl,task=distributional"]
  points = []
  for task in ("pointwise", "distributional", "rlhf"):
    for divergence in ("forward_kl", "reverse_kl", "tv", "js"):
      point = {"arg": f"divergence={divergence},task={task}"}
      if divergence == "reverse_kl" and task == "pointwise":
        point["testbed.epsilon"] = 1e-5
      points.append(point)
  return points
