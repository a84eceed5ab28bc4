r"""On-policy distillation (GKD, Agarwal et al. 2024): the student matches a teacher LM per token.

At every position of the student's own samples (rollout.num_policy per prompt; add
rollout.anchor=teacher and rollout.num_anchor for GKD's mixture with the teacher's samples) the
loss is a divergence between the teacher's and the student's whole next-token distributions:
forward KL, reverse KL or the generalised JSD(β) (objectives/distill.py); loss.sequence_level
adds the score-function term that makes the expected gradient the sequence-level divergence's.
The default teacher is the testbed base LM of a larger architecture (preset `testbed`, d = 64)
and the student a smaller one (preset `tiny`, d = 32); teacher.path may also be a run's workdir
(e.g. a BOND run's Best-of-N-distilled policy) or an Orbax/Hugging Face directory with the
student's vocabulary. target.kind = teacher makes the teacher's exact sequence distribution the
run's target: exact/kl_target_policy = KL(p_teacher‖π), exact/kl_policy_target = KL(π‖p_teacher).

  python -m align_jax.main --config=configs/gkd.py
  python -m align_jax.main --config=configs/gkd.py:smoke
  python -m align_jax.main --config=configs/gkd.py:divergence=jsd --config.loss.beta=0.9
  python -m align_jax.main --config=configs/gkd.py:model=testbed --config.teacher.path=runs/bond
  python -m align_jax.main --config=configs/gkd.py --config.rollout.anchor=teacher \
    --config.rollout.num_anchor=2

Expected (default): exact/kl_policy_target (the reverse KL to the teacher) falls.
"""

from align_jax import config_lib, models


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(
    arg, smoke=False, model="tiny", teacher="testbed", divergence="reverse_kl"
  )
  c = config_lib.base()
  c.name = "gkd"
  c.objective = "gkd"
  c.model = models.preset(arg.model)
  config_lib.testbed_on_policy(c)
  c.teacher.path = "testbed"  # The cached testbed base LM of teacher.model's architecture.
  c.teacher.model = arg.teacher
  c.target.kind = "teacher"
  c.rollout.num_policy = 2
  c.loss.divergence = arg.divergence  # forward_kl | reverse_kl | jsd
  c.loss.beta = 0.5  # JSD's teacher weight.
  c.loss.sequence_level = False  # GKD as published; True: the sequence-level gradient.
  c.loss.aggregation = "token-mean"
  c.loss.norm_len = 0
  if arg.smoke:
    config_lib.smoke(c)
  return c
