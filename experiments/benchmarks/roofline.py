"""The benchmarks' roofline: device peaks, probes, and the model's FLOP and byte counts.

The FLOP and byte formulas live in align_jax/models/flops.py (align_jax.plan uses them too); its
docstring states them. They are re-exported here for the benchmarks.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from align_jax.models.flops import (  # noqa: F401  (re-exported for the benchmarks)
  decode_step_bytes,
  forward_flops,
  jaxpr_matmul_flops,
  matmul_params,
  train_step_flops,
)

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


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


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
