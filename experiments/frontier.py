r"""The exact reward–KL frontier: where the GRPO family, RLOO, REINFORCE, BOND, J-BOND and f-DPG
end up on the testbed's plane (E_π[r], KL(π‖π_ref)), and what diversity they spend.

Each method runs its default config (its own hyperparameters; rollout and learning rate as the
README documents) for the same budget, with exact evaluations along the way. The frontier is
exact: for a policy at KL(π‖π_ref) = κ, no policy has a higher E_π[r] than π_β ∝ π_ref·exp(r/β)
with KL(π_β‖π_ref) = κ (the Lagrangian dual of max E_π[r] s.t. KL ≤ κ), and β is found by
bisection for every evaluated κ, so each point's regret r(π_β) − r(π) ≥ 0 and the entropy and
expected Distinct-n of π_β at the same KL are exact too. The study reports, per method, the final
point, the regret at equal KL (final and along the path) and the diversity spent relative to the
frontier's optimum at that KL (entropy, Distinct-2), and one sentence of what the numbers show.

  python experiments/frontier.py             # the full study: 9 methods × 3 seeds
  python experiments/frontier.py --quick     # GRPO and RLOO smoke runs, one seed (tests)
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # noqa: E402

BUDGET = {"total_steps": 200, "eval_every": 20}
QUICK = {"total_steps": 4, "eval_every": 2, "checkpoint_every": 0, "mesh.shape": (1, 1, 1)}
METHODS = (  # (group: its runs' folder, label, config, its arg): each config's defaults.
  ("GRPO", "GRPO", "configs/grpo.py", ""),
  ("dr_grpo", "Dr. GRPO", "configs/dr_grpo.py", ""),
  ("DAPO", "DAPO", "configs/dapo.py", ""),
  ("GSPO", "GSPO", "configs/gspo.py", ""),
  ("RLOO", "RLOO", "configs/rloo.py", ""),
  ("REINFORCE-KL", "REINFORCE-KL", "configs/reinforce.py", ""),
  ("J-BOND", "J-BOND", "configs/jbond.py", ""),
  ("BOND", "BOND", "configs/bond.py", ""),
  ("f-DPG", "f-DPG", "configs/fdpg.py", "task=rlhf,divergence=reverse_kl"),
)
LABELS = {group: label for group, label, _, _ in METHODS}
QUICK_METHODS = ("GRPO", "RLOO")
BETAS = np.append(np.geomspace(0.02, 300.0, 70), np.inf)  # The plotted frontier; β = ∞: π_ref.
DISTINCT_SAMPLES = 16  # testbed.distinct_samples of every config: Distinct-n of 16 samples.


def grids(quick: bool) -> list[study.Grid]:
  arg_suffix, sets = ("smoke", QUICK) if quick else ("", BUDGET)
  return [
    study.Grid(group, config, arg=",".join(filter(None, (arg, arg_suffix))), sets=sets, points=[{}])
    for group, _, config, arg in METHODS
    if not quick or group in QUICK_METHODS
  ]


class Frontier:
  """The exact KL-regularised optima π_β of a reference: their metrics at given β or given KL."""

  def __init__(self, reference):
    import jax
    import jax.numpy as jnp
    from align_jax import targets
    from align_jax.testbed import exact, language

    tb, ref_XxY = reference
    ref_XxY, reward_XxY = jnp.asarray(ref_XxY), jnp.asarray(tb.reward_XxY)
    w_X = jnp.asarray(tb.prompt_logw_X)

    def optimum(beta):
      return exact.normalize(targets.rlhf(ref_XxY, reward_XxY, beta))

    def metrics(beta):
      opt_XxY = optimum(beta)
      distinct = exact.expected_distinct(
        opt_XxY, tb.responses_YxT, w_X, num_samples=DISTINCT_SAMPLES, vocab=language.V
      )
      return {
        "kl": exact.kl(opt_XxY, ref_XxY, w_X),
        "reward": exact.expectation(opt_XxY, reward_XxY, w_X),
        "entropy": exact.entropy(opt_XxY, w_X),
        "distinct_2": distinct["exact/distinct_2"],
      }

    def beta_at(kl_Q):  # KL(π_β‖π_ref) falls as β grows: bisection on log β, per query.
      kl_of = lambda log_b: exact.kl(optimum(jnp.exp(log_b)), ref_XxY, w_X)

      def halve(_, bounds):
        lo, hi = bounds  # log β: KL(lo) ≥ κ ≥ KL(hi).
        mid = 0.5 * (lo + hi)
        above = jax.lax.map(kl_of, mid) > kl_Q
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

      lo, hi = jnp.full_like(kl_Q, np.log(1e-3)), jnp.full_like(kl_Q, np.log(1e6))
      lo, hi = jax.lax.fori_loop(0, 60, halve, (lo, hi))
      return jnp.exp(0.5 * (lo + hi))

    self._metrics = jax.jit(lambda b_Q: jax.lax.map(metrics, b_Q))
    self._beta_at = jax.jit(beta_at)
    self.max_kl = float(exact.kl(optimum(1e-3), ref_XxY, w_X))

  def at_betas(self, betas) -> dict[str, np.ndarray]:
    import jax.numpy as jnp

    out = self._metrics(jnp.asarray(np.sort(betas)[::-1], jnp.float32))
    return {"beta": np.sort(betas)[::-1], **{k: np.asarray(v) for k, v in out.items()}}

  def at_kl(self, kls) -> dict[str, np.ndarray]:
    """π_β's metrics at KL(π_β‖π_ref) = each of `kls` (clipped to the frontier's range)."""
    import jax.numpy as jnp

    kls = np.clip(np.asarray(kls, np.float32), 0.0, self.max_kl)
    betas = self._beta_at(jnp.asarray(kls))
    return {
      "beta": np.asarray(betas),
      **{k: np.asarray(v) for k, v in self._metrics(betas).items()},
    }


def _path(r: study.Record) -> dict[str, np.ndarray]:
  steps, ms = zip(*r.trajectory)
  keys = {"kl": "exact/kl_policy_ref", "reward": "exact/reward", "entropy": "exact/entropy"}
  keys["distinct_2"] = "exact/distinct_2"
  return {"step": np.array(steps), **{k: np.array([m[v] for m in ms]) for k, v in keys.items()}}


def _sentence(label: str, s: dict) -> str:
  """One sentence of what the exact numbers say about a method."""
  regret, spread = s["final_regret"]
  where = (
    "on the frontier"
    if regret <= max(2 * spread, 0.01)
    else f"{regret:.3f} below the frontier's reward at its KL"
  )
  path = s["mean_regret"][0]
  entropy = s["entropy_gap"][0]
  if abs(entropy) <= 0.05:
    diversity = "keeps the entropy of the optimum at that KL"
  elif entropy < 0:
    diversity = f"spends {-entropy:.2f} nats more entropy than the optimum at that KL"
  else:
    diversity = f"keeps {entropy:.2f} nats more entropy than the optimum at that KL"
  return (
    f"**{label}** ends at KL {s['final_kl'][0]:.2f} with E[r] = {s['final_reward'][0]:.3f}, "
    f"{where} (mean regret along its path {path:.3f}), and {diversity} "
    f"(Distinct-2 {s['distinct_2'][0]:.3f} vs {s['frontier_distinct_2'][0]:.3f})."
  )


def analyze(records: list[study.Record], args):
  frontier = Frontier(study.reference(records[0]))
  front = frontier.at_betas(BETAS)
  data = {"frontier": {k: v.tolist() for k, v in front.items()}, "methods": {}}
  data["frontier"]["beta"] = [b if np.isfinite(b) else None for b in front["beta"]]  # None: ∞.
  rows, sentences = [], []
  for label, rs in study.group_by(records, lambda r: LABELS[r.group]).items():
    paths = [_path(r) for r in rs]
    optima = [frontier.at_kl(p["kl"]) for p in paths]
    regret = [o["reward"] - p["reward"] for p, o in zip(paths, optima)]
    s = {
      "final_kl": study.mean_std(p["kl"][-1] for p in paths),
      "final_reward": study.mean_std(p["reward"][-1] for p in paths),
      "final_regret": study.mean_std(g[-1] for g in regret),
      "mean_regret": study.mean_std(float(np.mean(g[1:])) for g in regret),
      "entropy": study.mean_std(p["entropy"][-1] for p in paths),
      "frontier_entropy": study.mean_std(o["entropy"][-1] for o in optima),
      "entropy_gap": study.mean_std(
        p["entropy"][-1] - o["entropy"][-1] for p, o in zip(paths, optima)
      ),
      "distinct_2": study.mean_std(p["distinct_2"][-1] for p in paths),
      "frontier_distinct_2": study.mean_std(o["distinct_2"][-1] for o in optima),
    }
    s["min_regret"] = float(min(np.min(g) for g in regret))
    s["paths"] = [
      {**{k: v.tolist() for k, v in p.items()}, "regret": g.tolist()} for p, g in zip(paths, regret)
    ]
    data["methods"][label] = s
    rows.append(
      [
        label,
        study.fmt([p["reward"][-1] for p in paths]),
        study.fmt([p["kl"][-1] for p in paths]),
        study.fmt([g[-1] for g in regret]),
        study.fmt([float(np.mean(g[1:])) for g in regret]),
        f"{study.fmt([p['entropy'][-1] for p in paths], 2)} ({s['frontier_entropy'][0]:.2f})",
        f"{study.fmt([p['distinct_2'][-1] for p in paths])} ({s['frontier_distinct_2'][0]:.3f})",
      ]
    )
    sentences.append(_sentence(label, s))
  steps = records[0].summary["steps"]
  body = [
    f"Every method's default config, {steps} steps, exact evaluations every "
    f"{records[0].cfg('eval_every')} steps. Regret = E[r] of the frontier's optimum π_β at the "
    "run's own KL(π‖π_ref) minus the run's (exact: β by bisection; ≥ 0 by optimality of π_β); "
    "mean regret along the path (every evaluation after step 0); entropy and expected "
    "Distinct-2 of 16 samples, with the optimum's at the same KL in brackets (mean ± std over "
    "seeds):",
    study.table(
      [
        "method",
        "E_π[r]",
        "KL(π‖π_ref)",
        "regret at equal KL",
        "mean path regret",
        "entropy (π_β)",
        "Distinct-2 (π_β)",
      ],
      rows,
    ),
    "**What the exact numbers show.**\n\n" + "\n".join(f"- {s}" for s in sentences),
    _overall(records, data["methods"], front),
  ]
  return "\n\n".join(body), data, _figure(data)


GRPO_FAMILY = ("GRPO", "dr_grpo", "DAPO", "GSPO")  # Their loss.beta is a KL coefficient.


def _overall(records, methods: dict, front: dict) -> str:
  """The ranking by final regret and which methods end nearly deterministic."""
  by_regret = sorted(methods, key=lambda k: methods[k]["final_regret"][0])
  regret = lambda k: f"{k} ({methods[k]['final_regret'][0]:.3f})"
  collapsed = [k for k in methods if methods[k]["entropy"][0] < 0.5]
  betas = {LABELS[r.group]: r.cfg("loss.beta") for r in records if r.group in GRPO_FAMILY}
  named = [f"{k} (KL β = {betas[k]})" if k in betas else k for k in collapsed]
  ref_entropy = float(np.asarray(front["entropy"])[np.argmin(front["kl"])])
  return (
    f"**Overall.** Closest to the frontier at the end: {', '.join(map(regret, by_regret[:2]))}; "
    f"furthest: {regret(by_regret[-1])}. Nearly deterministic at the end (entropy < 0.5 nats; "
    f"π_ref's is {ref_entropy:.2f}): {', '.join(named) or 'none'}."
  )


def _figure(data):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  front = data["frontier"]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
  ax.plot(front["kl"], front["reward"], "k-", lw=1.5, label="frontier π_β ∝ π_ref·e^{r/β} (exact)")
  bx.plot(front["kl"], front["entropy"], "k-", lw=1.5, label="frontier π_β (exact)")
  kl_max = 0.0
  for label, s in data["methods"].items():
    kl = np.mean([p["kl"] for p in s["paths"]], axis=0)
    reward = np.mean([p["reward"] for p in s["paths"]], axis=0)
    entropy = np.mean([p["entropy"] for p in s["paths"]], axis=0)
    (line,) = ax.plot(kl, reward, marker=".", ms=4, label=label)
    bx.plot(kl, entropy, marker=".", ms=4, color=line.get_color(), label=label)
    kl_max = max(kl_max, float(np.max(kl)))
  x_max = 1.15 * kl_max + 0.05
  shown = np.asarray(front["kl"]) <= x_max
  entropies = [np.asarray(front["entropy"])[shown]]
  entropies += [np.ravel([p["entropy"] for p in s["paths"]]) for s in data["methods"].values()]
  low, high = min(map(np.min, entropies)), max(map(np.max, entropies))
  bx.set_ylim(low - 0.05 * (high - low) - 0.01, high + 0.05 * (high - low) + 0.01)
  for axis in (ax, bx):
    axis.set_xlim(0, x_max)
    axis.set_xlabel("KL(π‖π_ref) [nats]")
    axis.legend(fontsize=7)
  reward_top = max(max(np.max(p["reward"]) for p in s["paths"]) for s in data["methods"].values())
  ax.set_ylim(top=reward_top + 0.2)
  ax.set(ylabel="E_π[r] (exact)", title="Reward vs KL along training (mean of seeds)")
  bx.set(ylabel="entropy [nats] (exact)", title="Diversity spent: entropy vs KL")
  fig.tight_layout()
  return fig


if __name__ == "__main__":
  study.main("frontier", grids, analyze)
