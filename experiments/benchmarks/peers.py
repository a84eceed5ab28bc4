r"""align_jax DPO vs Tunix DPO vs TRL DPO on CPU: same tiny Llama, batch, lengths and steps.

  python -m experiments.benchmarks.peers            # installs the peers on first use (~3 min)
  python -m experiments.benchmarks.peers --reps=15 --steps=5 --fresh_venvs

Each peer is installed into its own throw-away venv under --venv_dir (default
$XDG_CACHE_HOME/align_jax/peer_venvs; delete it at will): `google-tunix`, and `trl` with exactly
`torch==2.13.0` (a constraints file pins it, so pip can never pull another torch). The peers
never become project dependencies. Each framework runs in its own process through its own
trainer (peer_workers/*.py): the model and optimizer are built, `warmup` updates run untimed
(compilation), then the three processes take turns, one timed chunk of `steps` updates each per
repetition (the order rotates every repetition), so that load from other work on the machine
hits all three alike; only one process computes at a time. Reported: the median chunk time,
useful tokens/s = batch·(P + 2·R)·steps / time (the prompt once, each response once: what a pair
carries, whatever a framework computes), and the ratios of align_jax's to each peer's. align_jax
scores a pair in one shared-prompt row (`data.share_prompt`, its default); the peers in two rows.
A run on a loaded host is flagged and exits 3 (report.py).

  python -m experiments.benchmarks.peers --prompt_len=256 --response_len=128 --out=peers_dpo_256_128
  python -m experiments.benchmarks.peers --prompt_len=64 --response_len=192 --out=peers_dpo_64_192
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

from align_jax.data import records
from experiments.benchmarks import harness, report
from experiments.benchmarks.peer_workers import protocol

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_workers")
PEERS = {  # venv name -> pip requirements (installed with torch pinned to 2.13.0).
  "tunix": ["google-tunix"],
  "trl": ["torch==2.13.0", "trl"],
}
VERSIONS = {
  "tunix": ["google-tunix", "jax", "jaxlib", "flax", "optax"],
  "trl": ["trl", "torch", "transformers", "accelerate"],
}


def _venv_python(venv_dir: str, name: str, fresh: bool) -> str:
  """The python of peer `name`'s venv, created and installed if missing (or `fresh`)."""
  path = os.path.join(venv_dir, name)
  python = os.path.join(path, "bin", "python")
  marker = os.path.join(path, "installed.json")
  if fresh and os.path.isdir(path):
    subprocess.run(["rm", "-rf", path], check=True)
  if not os.path.exists(marker):
    print(f"installing {name} into {path} (pip log: {path}.log)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    constraints = os.path.join(venv_dir, "constraints.txt")
    with open(constraints, "w") as f:
      f.write("torch==2.13.0\n")
    with open(path + ".log", "w") as log:
      subprocess.run(
        [python, "-m", "pip", "install", "-c", constraints, *PEERS[name]],
        check=True,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    with open(marker, "w") as f:
      json.dump(_versions(python, name), f)
  return python


def _versions(python: str, name: str) -> dict:
  code = (
    "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) "
    "for p in sys.argv[1:]}))"
  )
  out = subprocess.run(
    [python, "-c", code, *VERSIONS[name]], capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout)


class Worker:
  """One framework's process: started, warmed up, then driven chunk by chunk."""

  def __init__(self, name: str, python: str, script: str, spec: dict, log_dir: str):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      HF_HUB_OFFLINE="1",
      HF_DATASETS_OFFLINE="1",
      TRANSFORMERS_OFFLINE="1",
      PYTHONPATH=report.ROOT,
      PYTHONUNBUFFERED="1",
    )
    env.pop("XLA_FLAGS", None)  # One CPU device for every JAX framework.
    self.name, self.log = name, os.path.join(log_dir, f"{name}.log")
    self.proc = subprocess.Popen(
      [python, os.path.join(WORKERS, script), json.dumps(spec)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=open(self.log, "w"),
      text=True,
      env=env,
      cwd=report.ROOT,
    )
    self.info = self._read()
    self.seconds, self.cpu_seconds = [], []

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(protocol.MARK):
        return json.loads(line[len(protocol.MARK) :])
    raise RuntimeError(f"{self.name} worker exited (code {self.proc.wait()}); see {self.log}")

  def chunk(self) -> None:
    self.proc.stdin.write("go\n")
    self.proc.stdin.flush()
    msg = self._read()
    self.seconds.append(msg["seconds"])
    self.cpu_seconds.append(msg["cpu_seconds"])
    self.info |= msg

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=600)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8, help="preference pairs per step")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--response_len", type=int, default=96)
  p.add_argument("--share_prompt", default="auto", help="align_jax's data.share_prompt")
  p.add_argument("--steps", type=int, default=3, help="updates per timed chunk")
  p.add_argument("--reps", type=int, default=9, help="timed chunks per framework")
  p.add_argument("--warmup", type=int, default=3, help="untimed updates first")
  p.add_argument(
    "--venv_dir",
    default=os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "align_jax", "peer_venvs"
    ),
  )
  p.add_argument("--fresh_venvs", action="store_true", help="reinstall the peers' venvs")
  p.add_argument("--out", default="peers_dpo_cpu")
  args = p.parse_args(argv)

  os.makedirs(args.venv_dir, exist_ok=True)
  pythons = {name: _venv_python(args.venv_dir, name, args.fresh_venvs) for name in PEERS}
  versions = {name: _versions(pythons[name], name) for name in PEERS}
  if versions["trl"]["torch"].split("+")[0] != "2.13.0":
    raise RuntimeError(f"the trl venv has torch {versions['trl']['torch']}, not 2.13.0")
  model = {
    k: harness.TINY_LLAMA[k]
    for k in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "n_kv_heads",
      "head_dim",
      "mlp_dim",
      "rope_theta",
      "norm_eps",
    )
  }
  spec = dict(
    seed=0,
    batch=args.batch,
    prompt_len=args.prompt_len,
    response_len=args.response_len,
    steps=args.steps,
    reps=args.reps,
    warmup=args.warmup,
    lr=1e-3,
    model=model,
    share_prompt=args.share_prompt,
  )
  env = report.environment()
  log_dir = tempfile.mkdtemp(prefix="align_jax_peers_")
  plan = [
    ("align_jax", sys.executable, "align_jax_dpo.py"),
    ("tunix", pythons["tunix"], "tunix_dpo.py"),
    ("trl", pythons["trl"], "trl_dpo.py"),
  ]
  workers = []
  for name, python, script in plan:  # Set up and warm up one at a time.
    print(f"starting {name} (log: {log_dir}/{name}.log)", flush=True)
    workers.append(Worker(name, python, script, spec, log_dir))
  for rep in range(args.reps):
    for w in workers[rep % 3 :] + workers[: rep % 3]:
      w.chunk()
    print(
      f"repetition {rep + 1}/{args.reps}: "
      + ", ".join(f"{w.name} {w.seconds[-1] / args.steps:.3f} s/step" for w in workers),
      flush=True,
    )
  for w in workers:
    w.close()

  L = args.prompt_len + args.response_len
  share = types.SimpleNamespace(data=types.SimpleNamespace(share_prompt=args.share_prompt))
  shared = records.prompt_shared(share, args.prompt_len, 2, L) > 0
  tokens_per_chunk = args.batch * (args.prompt_len + 2 * args.response_len) * args.steps
  tps = {w.name: tokens_per_chunk / float(np.median(w.seconds)) for w in workers}
  label = {
    "align_jax": f"align_jax (jax {env['jax']}; pairs in "
    + ("one shared-prompt row)" if shared else "two rows)"),
    "tunix": f"tunix {versions['tunix']['google-tunix']} (jax {versions['tunix']['jax']})",
    "trl": f"trl {versions['trl']['trl']} (torch {versions['trl']['torch']})",
  }
  rows = [
    {
      "framework": label[w.name],
      "step_s (median)": float(np.median(w.seconds)) / args.steps,
      "step_s (min..max)": f"{min(w.seconds) / args.steps:.3f}..{max(w.seconds) / args.steps:.3f}",
      "useful tokens/s": tps[w.name],
      "align_jax / this": tps["align_jax"] / tps[w.name],
      "CPU s/step (median)": float(np.median(w.cpu_seconds)) / args.steps,
      "first loss": w.info.get("first_loss", ""),
    }
    for w in workers
  ]
  notes = [
    f"Model: Llama, vocab {model['vocab_size']}, d {model['d_model']}, {model['n_layers']} "
    f"layers, {model['n_heads']} heads ({model['n_kv_heads']} KV) of {model['head_dim']}, "
    f"SwiGLU {model['mlp_dim']}, untied embeddings, fp32. Batch {args.batch} pairs, prompt "
    f"{args.prompt_len} + response {args.response_len} = {L} tokens, all response tokens "
    "scored; DPO β = 0.1 with the reference forward every step; AdamW lr 1e-3, clip 1.0.",
    f"{args.warmup} warm-up updates untimed, then {args.reps} chunks of {args.steps} updates "
    "per framework, frameworks taking turns (rotating order) in one run; medians. "
    "Useful tokens/s = batch·(P + 2·R)·steps / chunk time; the ideal gain of sharing the "
    f"prompt is 2·L / (P + 2·R) = {2 * L / (args.prompt_len + 2 * args.response_len):.2f}×.",
    "Each framework through its own trainer loop: align_jax's jitted train_step with "
    "train.py's per-step host batch and one-step-late metric fetch; Tunix's DPOTrainer.train; "
    "TRL's DPOTrainer.train (gradient checkpointing off, as in the others; TRL defaults it on).",
    "First loss: log 2 = 0.6931 for a policy equal to its reference (TRL logs none here).",
    f"Host load average {env['load_average_at_start']:.2f} at the start (and at the end, "
    "above): a run above 0.75 per core is flagged as no result (report.py).",
  ]
  print(
    report.write(
      args.out,
      env,
      rows,
      notes,
      {
        "peer_versions": versions,
        "spec": spec,
        "chunk_seconds": {w.name: w.seconds for w in workers},
        "chunk_cpu_seconds": {w.name: w.cpu_seconds for w in workers},
      },
    )
  )


if __name__ == "__main__":
  main()
