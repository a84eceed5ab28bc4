"""FLOP and byte counts of the model: the model FLOPs MFU divides, and every matmul of a program.

Model FLOPs (what MFU counts; PaLM's convention, Chowdhery et al. 2022, App. B):

  N        = matmul parameters: per layer D·H·K (q) + 2·D·G·K (k, v) + H·K·D (o) + 3·D·F (gated
             MLP), plus D·V for the output projection (the embedding lookup is a gather: 0 FLOPs;
             with tied embeddings the table is counted once, as the output projection).
  forward  = 2·N per token + attention 4·n_layers·H·K·L_q·L_kv per sequence (q·kᵀ and p·v, each
             2·L_q·L_kv·H·K per layer; the full square, as the einsum computes it: the causal
             mask does not halve it).
  training = 3 × forward (the backward pass is twice the forward: gradients of activations and
             of weights), i.e. 6·N·L + 12·n_layers·H·K·L² per sequence of L tokens.
  frozen   = every forward of a frozen model (the DPO / LiPO reference, BOND's anchor log-probs)
             adds 2·N·L + 4·n_layers·H·K·L² per sequence, counted once per forward pass run.

Not counted: norms, RoPE, softmax, the loss, the optimizer (elementwise, O(N) per step, not per
token), and remat's recomputed forward (hardware FLOPs, not model FLOPs). So MFU ≤ the
hardware's utilisation. `jaxpr_matmul_flops` counts every matmul a traced program executes
(recomputations included: hardware matmul FLOPs); tests/test_benchmark_flops.py checks the
formula against it.

Decode bytes (the memory-bandwidth roofline of one decode step): every parameter is read once
(in its storage dtype) and every layer's whole KV cache [R, S, G, K] is read (the sampler
attends over all S slots, masked), so bytes = param_bytes + 2·n_layers·R·S·G·K·itemsize.
"""

import math

import jax.numpy as jnp
from jax.extend import core


def matmul_params(cfg) -> int:
  """N: parameters used in matmuls per token (see the module docstring)."""
  D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = D * H * K + 2 * D * G * K + H * K * D + 3 * D * F
  head = D * (cfg.num_scores or cfg.vocab_size)
  return cfg.n_layers * per_layer + head


def forward_flops(cfg, rows: int, length: int, kv_length: int | None = None) -> int:
  """Model FLOPs of one forward pass over `rows` sequences of `length` tokens attending to
  `kv_length` keys each (default: themselves)."""
  kv_length = length if kv_length is None else kv_length
  dense = 2 * matmul_params(cfg) * rows * length
  attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * length * kv_length * rows
  return dense + attention


def train_step_flops(cfg, rows: int, length: int, frozen_forwards: int = 1) -> int:
  """Model FLOPs of one update on `rows` sequences: the policy's forward + backward (3 forwards)
  and `frozen_forwards` forwards of frozen models over the same rows."""
  return (3 + frozen_forwards) * forward_flops(cfg, rows, length)


def decode_step_bytes(param_bytes: int, cfg, rows: int, slots: int) -> int:
  """Bytes one decode step must read: all parameters plus every layer's whole KV cache."""
  itemsize = jnp.dtype(cfg.dtype).itemsize
  return param_bytes + 2 * cfg.n_layers * rows * slots * cfg.n_kv_heads * cfg.head_dim * itemsize


def jaxpr_matmul_flops(jaxpr, while_trips: int | None = None) -> int:
  """2·(output size)·(contracted size) summed over every dot_general of a (closed) jaxpr,
  recursing into nested jaxprs (jit, remat, custom derivatives, conditionals' costliest branch;
  scans times their length). A while loop has no static trip count: its body counts
  `while_trips` times (e.g. the sampler's decode loop: at most max_new_tokens), or it raises."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      out_size = math.prod(eqn.outvars[0].aval.shape)
      total += 2 * out_size * math.prod(lhs_shape[d] for d in lhs_contract)
      continue
    if name == "while" and while_trips is None:
      raise ValueError("jaxpr_matmul_flops: a while loop has no static FLOP count (while_trips)")
    if name == "cond":
      total += max(jaxpr_matmul_flops(b, while_trips) for b in eqn.params["branches"])
      continue
    repeat = {"scan": eqn.params.get("length", 1), "while": while_trips}.get(name, 1)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (core.Jaxpr, core.ClosedJaxpr)):
          total += repeat * jaxpr_matmul_flops(sub, while_trips)
  return total
