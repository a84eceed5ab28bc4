r"""DPRM, the distributional preference reward model (Li et al. 2024, arXiv 2402.09764).

The model is the testbed base LM's body with a head of C = testbed.categories logits read at the
response's last token; it predicts the share of a population rating the response in each ordered
category and is trained with the optimal-transport loss to the label (cost |j − k|: the CDF
distance, ALGORITHMS.md §4.3). Labels: testbed.voters simulated annotators rate one base sample
per prompt from its advantage over the base mean plus logistic noise; the label is the Bayesian
posterior mean of their votes (uniform Dirichlet prior). The reward other objectives use is the
expected category score Σ_k q_k·k/(C − 1). The OT cost and category scores are our specification
of what the paper's abstract describes (low-medium confidence in ALGORITHMS.md §8).

  python -m align_jax.main --config=configs/dprm.py
  python -m align_jax.main --config=configs/dprm.py:smoke --workdir=runs/dprm_smoke
  python -m align_jax.main --config=configs/dprm.py --config.loss.cost=squared

Expected (default): exact/gold_pair_accuracy (held-out pairs ordered by the expected score vs the
gold reward) rises well above 0.5.
"""

from align_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, smoke=False, model="testbed")
  c = config_lib.base()
  c.name = "dprm"
  c.objective = "dprm"
  c.loss.cost = "abs"  # Ground cost between categories: abs |j − k| | squared.
  config_lib.set_model(c, arg.model)
  config_lib.testbed_preference(c)
  if arg.smoke:
    config_lib.smoke(c)
  c.model.num_scores = c.testbed.get_ref("categories")  # One logit per rating category.
  return c
