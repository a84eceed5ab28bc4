"""FLOP and byte counts of align_jax's model, and the device peaks they are divided by.

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
hardware's utilisation; `jaxpr_matmul_flops` counts every matmul of a traced program exactly,
and the test checks the formula against it (tests/test_benchmark_flops.py).

Decode bytes (the memory-bandwidth roofline of one decode step): every parameter is read once
(in its storage dtype) and every layer's whole KV cache [R, S, G, K] is read (the sampler
attends over all S slots, masked), so bytes = param_bytes + 2·n_layers·R·S·G·K·itemsize.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) of known accelerators (vendor datasheets),
# keyed by a substring of `device_kind`. Other devices (CPUs) use the measured figures.
NOMINAL = {
  "H100": (989e12, 3.35e12),  # SXM5; the PCIe card is lower (756e12, 2.0e12).
  "H200": (989e12, 4.8e12),
  "A100": (312e12, 2.04e12),  # 80 GB SXM.
  "TPU v4": (275e12, 1.2e12),
  "TPU v5 lite": (197e12, 0.82e12),
  "TPU v5p": (459e12, 2.76e12),
  "TPU v6 lite": (918e12, 1.64e12),
}


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


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def jaxpr_matmul_flops(jaxpr) -> int:
  """2·(output size)·(contracted size) summed over every dot_general of a (closed) jaxpr,
  recursing into nested jaxprs (jit, remat, custom derivatives; scans times their length)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      out_size = math.prod(eqn.outvars[0].aval.shape)
      total += 2 * out_size * math.prod(lhs_shape[d] for d in lhs_contract)
      continue
    if eqn.primitive.name in ("while", "cond"):
      raise ValueError(f"jaxpr_matmul_flops: {eqn.primitive.name} has no static FLOP count")
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (core.Jaxpr, core.ClosedJaxpr)):
          total += repeat * jaxpr_matmul_flops(sub)
  return total


def _seconds(fn, *args, reps: int) -> float:
  """Median wall time of `reps` calls after one warm-up call (compilation)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def probe(dtype: str, reps: int = 1) -> tuple[float, float]:
  """(FLOP/s, bytes/s) achieved now by one jitted square matmul (2048² on CPUs, 8192²
  elsewhere) and a jitted sum over a float32 array (256 MB on CPUs, 4 GB elsewhere)."""
  on_cpu = jax.devices()[0].platform == "cpu"
  n, num_bytes = (2048, 2**28) if on_cpu else (8192, 2**32)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  return (
    2 * n**3 / _seconds(jax.jit(jnp.matmul), a, a, reps=reps),
    num_bytes / _seconds(jax.jit(jnp.sum), x, reps=reps),
  )


def device_peaks(dtype: str, probes: list[tuple[float, float]] = ()) -> dict:
  """Peak FLOP/s and memory bandwidth used as denominators, and where each comes from.

  Accelerators in NOMINAL use the datasheet figures (measured ones are reported beside them).
  Other devices (CPUs) use the medians of `probes`: measurements a benchmark takes between its
  repetitions, so that they see the same load as the figures they divide (5 taken now if none).
  A CPU's MFU is thus relative to the achieved FLOP/s of one large matmul, not a hardware peak.
  """
  device = jax.devices()[0]
  probes = list(probes) or [probe(dtype) for _ in range(5)]
  flops, bandwidth = (float(np.median(v)) for v in zip(*probes))
  out = {
    "measured_matmul_flops_per_s": flops,
    "measured_bandwidth_bytes_per_s": bandwidth,
    "probe_dtype": dtype,
    "probes": len(probes),
  }
  nominal = next((v for k, v in NOMINAL.items() if k in device.device_kind), None)
  if nominal is None:
    return out | {
      "peak_flops_per_s": flops,
      "peak_bandwidth_bytes_per_s": bandwidth,
      "peak_source": f"measured on this {device.device_kind}: medians of "
      f"{len(probes)} probes (one {dtype} matmul, one float32 sum) "
      "taken between the repetitions",
    }
  return out | {
    "peak_flops_per_s": nominal[0],
    "peak_bandwidth_bytes_per_s": nominal[1],
    "peak_source": f"datasheet dense bf16 and HBM figures of {device.device_kind}",
  }
