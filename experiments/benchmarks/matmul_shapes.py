"""fp32 matmul throughput at the tiny Llama's shapes (2048 rows: 8 pairs of 128 tokens), under
torch or jax on this host: what the CPU comparison with TRL's torch comes down to.

  python experiments/benchmarks/matmul_shapes.py jax
  <a torch environment>/bin/python experiments/benchmarks/matmul_shapes.py torch

Medians of 30 calls after 5 warm-ups; prints GFLOP/s per shape (M x K x N).
"""

import time, sys

shapes = [(2048, 256, 1024), (2048, 1024, 256), (2048, 256, 256)]
if sys.argv[1] == "torch":
  import torch

  def make(m, k, n):
    a = torch.randn(m, k)
    b = torch.randn(k, n)
    return lambda: a @ b

  sync = lambda x: x
else:
  import jax, jax.numpy as jnp

  def make(m, k, n):
    a = jax.random.normal(jax.random.key(0), (m, k))
    b = jax.random.normal(jax.random.key(1), (k, n))
    mm = jax.jit(lambda a, b: a @ b)
    return lambda: mm(a, b)

  sync = lambda x: x.block_until_ready()
out = []
for m, k, n in shapes:
  f = make(m, k, n)
  for _ in range(5):
    sync(f())
  ts = []
  for _ in range(30):
    t = time.perf_counter()
    sync(f())
    ts.append(time.perf_counter() - t)
  ts.sort()
  out.append(f"{m}x{k}x{n}: {2 * m * k * n / ts[15] / 1e9:.0f}")
print(sys.argv[1], " | ".join(out), "GFLOP/s")
