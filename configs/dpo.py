r"""DPO (Rafailov et al. 2023, arXiv 2305.18290) on testbed preference pairs.

Pairs are two samples of the cached base LM per prompt, labelled by the testbed's gold reward with
Bradley–Terry noise, P(a ≻ b) = σ((r_a − r_b)/T). With such labels the population optimum of DPO is
π* ∝ π_ref·exp(r/(β·T)); the exact metrics report the divergences to it (target.kind = rlhf).

  # Default (≈1–2 min on a 2-core CPU; pretrains and caches the base LM on first use):
  python -m align_jax.main --config=configs/dpo.py
  # Seconds-long smoke run:
  python -m align_jax.main --config=configs/dpo.py:smoke --workdir=runs/dpo_smoke
  # Sharded over 8 devices, another β:
  python -m align_jax.main --config=configs/dpo.py --config.mesh.shape="(2,2,2)" --config.loss.beta=0.2
  # Your own pre-tokenized pairs ({"prompt", "chosen", "rejected"} per line):
  python -m align_jax.main --config=configs/dpo.py --config.data.source=jsonl:pairs.jsonl
  # The β sweep (get_sweep), one run per seed; experiments/d2o_aot.py compares it with AOT:
  python -m align_jax.sweep --config=configs/dpo.py --local --seeds=0,1,2

Expected (default): summary.json's final exact/reward above its initial value, with
exact/kl_policy_ref > 0 reported; the console prints the initial-vs-final table.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "dpo"
  c.objective = "dpo"
  c.loss.beta = 0.1  # Inverse temperature of the implicit reward β·log(π/π_ref).
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c, rlhf_target=True)
  if arg.smoke:
    config_lib.smoke(c)
  return c


def get_sweep(arg: str | None = None, quick: bool = False) -> list[dict]:
  """β sweep (quick: the default 0.1)."""
  del arg
  return config_lib.product(**{"loss.beta": [0.1] if quick else [0.05, 0.1, 0.3]})
