r"""Runs every point of a config's sweep: `python -m align_jax.sweep --config=configs/lipo.py --local`.

A config file may define `get_sweep(arg) -> list`, each entry one run: a config-arg string
(`"k=4,loss=listmle"`, passed to `get_config`) or a dict of dotted overrides
(`{"loss.beta": 0.1}`), where the key `"arg"` holds a config-arg string. Each point runs once per
seed in `--seeds`, in its own workdir `<root>/<point>/seed<s>`.

  python -m align_jax.sweep --config=configs/lipo.py                 # print the runs' commands
  python -m align_jax.sweep --config=configs/lipo.py --local         # run them here, one by one
  python -m align_jax.sweep --config=configs/bond.py --local --seeds=0,1,2 --set=total_steps=100

Without `--local` the sweep prints one `python -m align_jax.main` command per run (for a cluster
scheduler: each line is an independent job). With `--local` the runs execute in this process in
order; a run whose workdir already holds `summary.json` is complete and skipped, and an interrupted
one resumes from its checkpoint, so rerunning a sweep finishes it. `<root>/sweep.json` lists every
run with its arg, overrides, seed and workdir.
"""

import ast
import dataclasses
import importlib.util
import json
import os
import shlex
import sys
from typing import Any

import ml_collections as mlc
from absl import app, flags
from align_jax.errors import ConfigError, MissingFileError


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: `get_config(arg)` with `overrides` applied and `seed` set."""

  name: str  # The point's name: its arg and overrides, filesystem-safe.
  arg: str
  overrides: dict[str, Any]
  seed: int
  workdir: str

  def config(self, config_path: str) -> mlc.ConfigDict:
    cfg = load(config_path, self.arg)
    apply_overrides(cfg, {**self.overrides, "seed": self.seed})
    return cfg

  def command(self, config_path: str) -> str:
    parts = [
      sys.executable,
      "-m",
      "align_jax.main",
      f"--config={config_path}" + (f":{self.arg}" if self.arg else ""),
      f"--workdir={self.workdir}",
    ]
    parts += [
      f"--config.{k}={_flag_value(v)}" for k, v in {**self.overrides, "seed": self.seed}.items()
    ]
    return shlex.join(parts)


def module(config_path: str):
  """The config file as a module (what `--config=` loads)."""
  if not os.path.isfile(config_path):
    raise MissingFileError(f"config file {config_path} does not exist")
  name = "align_jax_config_" + os.path.splitext(os.path.basename(config_path))[0]
  spec = importlib.util.spec_from_file_location(name, config_path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load(config_path: str, arg: str | None = None) -> mlc.ConfigDict:
  """`get_config(arg)` of a config file, as the CLI builds it."""
  return module(config_path).get_config(arg or None)


def apply_overrides(cfg: mlc.ConfigDict, overrides: dict[str, Any]) -> None:
  """Sets dotted fields; an unknown field or a value of the wrong type is an error."""
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
      node = getattr(node, part, None)
      if not isinstance(node, mlc.ConfigDict):
        raise ConfigError(f"sweep override {key}: the config has no field {key}")
    if leaf not in node:
      raise ConfigError(f"sweep override {key}: the config has no field {key}")
    if isinstance(value, str) and not isinstance(node[leaf], str):
      value = _parse(key, value)
    with cfg.unlocked():
      try:
        node[leaf] = value
      except TypeError as e:
        raise ConfigError(f"sweep override {key}={value!r}: {e}") from None


def runs(
  config_path: str,
  arg: str = "",
  *,
  seeds=(0,),
  root: str = "",
  sets: dict[str, Any] | None = None,
  quick: bool = False,
  points: list | None = None,
) -> list[Run]:
  """The runs of `get_sweep` (each point × each seed), with `sets` applied to every run.

  `quick` passes `quick=True` to a `get_sweep` that accepts it (a reduced grid for tests).
  `points` (same form as get_sweep's) are run instead of get_sweep's, e.g. [{}]: the config.
  """
  mod = module(config_path)
  if points is None and not hasattr(mod, "get_sweep"):
    raise ConfigError(f"{config_path} defines no get_sweep()")
  if points is None:
    points = mod.get_sweep(arg or None, quick=True) if quick else mod.get_sweep(arg or None)
  if not points:
    raise ConfigError(f"{config_path}: get_sweep({arg!r}) returned no runs")
  stem = os.path.splitext(os.path.basename(config_path))[0]
  root = root or os.path.join("runs", "sweeps", stem)
  out, names = [], set()
  for point in points:
    point = {"arg": point} if isinstance(point, str) else dict(point)
    own_arg = point.pop("arg", "")
    point_arg = _merge_args(arg, own_arg)
    overrides = {**point, **(sets or {})}
    name = _name(own_arg, point)
    if name in names:
      raise ConfigError(f"{config_path}: get_sweep has the point {name} twice")
    names.add(name)
    out += [Run(name, point_arg, overrides, s, os.path.join(root, name, f"seed{s}")) for s in seeds]
  return out


def run_local(config_path: str, sweep: list[Run], log=print) -> list[dict]:
  """Runs (or resumes) each incomplete run in this process; returns every run's summary."""
  from align_jax import train  # Heavy: only when running.

  summaries = []
  for i, r in enumerate(sweep):
    path = os.path.join(r.workdir, "summary.json")
    if os.path.exists(path):
      log(f"[{i + 1}/{len(sweep)}] {r.name} seed {r.seed}: complete, skipped")
    else:
      log(f"[{i + 1}/{len(sweep)}] {r.name} seed {r.seed} -> {r.workdir}")
      train.run(r.config(config_path), r.workdir)
    with open(path) as f:
      summaries.append(json.load(f))
  return summaries


def write_index(root: str, config_path: str, sweep: list[Run]) -> None:
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"config": config_path, "runs": [dataclasses.asdict(r) for r in sweep]}, f, indent=1)


def _merge_args(base: str, extra: str) -> str:
  """Config args of the point override the command line's (`k=2` + `k=4,loss=x` -> k=4,...)."""
  items = {}
  for part in filter(None, (s.strip() for s in f"{base},{extra}".split(","))):
    items[part.partition("=")[0].strip()] = part
  return ",".join(items.values())


def _name(arg: str, overrides: dict) -> str:
  parts = [p.replace("=", "-") for p in arg.split(",") if p]
  parts += [f"{k}-{_flag_value(v)}" for k, v in overrides.items()]
  name = "_".join(parts) or "default"
  return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)


def _flag_value(value: Any) -> str:
  return str(value) if not isinstance(value, (tuple, list)) else str(tuple(value))


def _parse(key: str, raw: str) -> Any:
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise ConfigError(f"sweep override {key}={raw!r} is not a Python literal") from None


_CONFIG = flags.DEFINE_string("config", None, "Config file, optionally `path:arg`.")
_LOCAL = flags.DEFINE_bool("local", False, "Run every run here, one after another.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds; each point runs once per seed.")
_ROOT = flags.DEFINE_string(
  "root", None, "Runs go to <root>/<point>/seed<s> (default runs/sweeps/<config name>)."
)
_SET = flags.DEFINE_multi_string("set", [], "key=value applied to every run (repeatable).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _CONFIG.value:
    sys.exit("error: --config is required")
  config_path, _, arg = _CONFIG.value.partition(":")
  try:
    seeds = [int(s) for s in _SEEDS.value]
    sets = {}
    for item in _SET.value:
      key, sep, raw = item.partition("=")
      if not sep:
        raise ConfigError(f"--set {item!r} is not key=value")
      sets[key.strip()] = raw.strip()
    sweep = runs(config_path, arg, seeds=seeds, root=_ROOT.value or "", sets=sets)
    for r in sweep:  # Every run's config is built (and checked) before any run starts.
      r.config(config_path)
    root = os.path.dirname(os.path.dirname(sweep[0].workdir))
    write_index(root, config_path, sweep)
    if not _LOCAL.value:
      print("\n".join(r.command(config_path) for r in sweep))
      return
    run_local(config_path, sweep)
  except (ValueError, FileNotFoundError, TypeError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
