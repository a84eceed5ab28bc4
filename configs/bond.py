r"""BOND (Sessa et al. 2024, arXiv 2407.14622): distil Best-of-N of an anchor with a Jeffreys divergence.

The headline on-policy run. Per prompt the rollout draws rollout.num_policy samples of the policy
and rollout.num_anchor samples of the anchor; the loss mixes (1 − β)·forward (the NLL of the best
of each group of n anchor samples, which is a BoN_n sample) and β·backward (policy gradient on
(n − 1)·log p̂≤(y) − log(π/π_anchor), p̂≤ the Monte-Carlo quantile of y among the anchor samples,
clipped at 1/(2k); leave-one-out baseline over the policy samples) — ALGORITHMS.md §2.3–§2.5.
`anchor`: fixed (the reference: plain BOND), periodic (a hard copy of the policy every
rollout.anchor_every steps: iterative BOND, target BoN_{n^t}) or ema (θ_a ← (1−η)θ_a + ηθ,
η = rollout.anchor_ema). The exact metrics compare the policy with the exact BoN_n of the
reference (ties included): exact/jeffreys_bon (J_β, β = testbed.target_jeffreys) and
exact/bon_quantile E_π[p≤(y)]; for a moving anchor BoN_n(π_ref) is a waypoint, not the target.
β = 0.5 is the paper's default [3P/M]; k = 16 quantile samples follows ABLATIONS.md §4.2.

  python -m align_jax.main --config=configs/bond.py
  python -m align_jax.main --config=configs/bond.py:n=8,beta=0.25 --workdir=runs/bond_n8
  python -m align_jax.main --config=configs/bond.py:anchor=periodic,n=2 --workdir=runs/bond_iter
  python -m align_jax.main --config=configs/bond.py:smoke
  # The β × n and anchor study (get_sweep; experiments/bond.py tabulates it):
  python -m align_jax.sweep --config=configs/bond.py --local --seeds=0,1,2
  # A trained reward model (configs/bt_reward.py) as the reward instead of the testbed's rule:
  python -m align_jax.main --config=configs/bond.py --config.reward_model=runs/bt_reward

Expected (default, 2-core CPU, a few minutes including the base LM's pretraining): exact/jeffreys_bon
falls by more than half from the base, exact/bon_quantile and exact/reward rise.
"""

from align_jax import config_lib

ANCHORS = {"fixed": "reference", "periodic": "periodic", "ema": "ema"}


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed", n=4, beta=0.5, anchor="fixed")
  if arg.anchor not in ANCHORS:
    raise ValueError(f"config arg anchor={arg.anchor!r} is unknown; known: {sorted(ANCHORS)}")
  c = config_lib.base()
  c.name = "bond"
  c.objective = "bond"
  config_lib.set_model(c, arg.model)
  config_lib.testbed_on_policy(c)
  c.rollout.num_policy = 2  # Policy samples per prompt (≥ 2 for the leave-one-out baseline).
  c.rollout.num_anchor = 16  # k anchor samples: quantiles, and k/n groups for the forward term.
  c.rollout.anchor = ANCHORS[arg.anchor]
  c.loss.n = arg.n  # N of the Best-of-N target.
  c.loss.beta = arg.beta  # Jeffreys mix: 0 = forward KL only, 1 = backward only.
  c.loss.num_policy = c.rollout.get_ref("num_policy")
  c.loss.quantile_clip = 1.0 / 32  # Floor of p̂≤: 1/(2k) [3P].
  c.loss.baseline = "mean_loo"
  c.target.kind = "bon"
  c.testbed.target_n = c.loss.get_ref("n")
  c.testbed.target_jeffreys = c.loss.get_ref("beta")
  if arg.smoke:
    config_lib.smoke(c)
  return c


def get_sweep(arg: str | None = None, quick: bool = False) -> list[dict]:
  """ABLATIONS.md R2: β ∈ {0, 0.5, 1} × n ∈ {2, 4, 8, 16} with the fixed anchor (the config's
  budget), then n = 2, β = 0.5 with each anchor (fixed, periodic, ema) over a doubled budget with
  evaluations every 25 steps: does iterative BOND keep improving past BoN_2?

  quick: n = 4, β = 0.5 with the fixed and the EMA anchor (the smoke tests' programs, so a test
  session compiles them once).
  """
  del arg
  if quick:
    return [
      {"arg": "n=4,beta=0.5"},
      {"arg": "n=4,beta=0.5,anchor=ema", "total_steps": 300, "eval_every": 25},
    ]
  return [{"arg": f"n={n},beta={beta}"} for beta in (0.0, 0.5, 1.0) for n in (2, 4, 8, 16)] + [
    {"arg": f"n=2,beta=0.5,anchor={anchor}", "total_steps": 300, "eval_every": 25}
    for anchor in ("fixed", "periodic", "ema")
  ]
