"""Mesh construction, logical-axis rules and the helpers that apply them.

Models name axes logically (`embed`, `mlp`, `act_batch`, ...); one rules table in the config maps
names to mesh axes. `use_rules` puts a table in context for `shard`, the activation constraint.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from align_jax.errors import ConfigError

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_RULES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rules", default=None)


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """A mesh with Auto axis types; one entry of `shape` may be -1 (all remaining devices)."""
  devices = jax.devices() if devices is None else devices
  shape, axes = list(shape), tuple(axes)
  if len(shape) != len(axes):
    raise ConfigError(f"mesh.shape {tuple(shape)} and mesh.axes {axes} differ in length")
  if shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
    raise ConfigError(f"mesh.shape {tuple(shape)}: sizes must be >= 1 with at most one -1")
  if -1 in shape:
    rest = -math.prod(shape)
    if len(devices) % rest:
      raise ConfigError(f"mesh.shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) > len(devices):
    raise ConfigError(
      f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices; {len(devices)} are present"
    )
  if math.prod(shape) < len(devices):  # E.g. (1,1,1) on a multi-device host: use the first.
    if jax.process_count() > 1:
      raise ConfigError(
        f"mesh.shape {tuple(shape)} must use all {len(devices)} devices of a multi-process run"
      )
    logging.warning(
      "mesh.shape %s uses %d of %d devices", tuple(shape), math.prod(shape), len(devices)
    )
    devices = devices[: math.prod(shape)]
  device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, axes, axis_types=(AxisType.Auto,) * len(axes))


def check_rules(rules: Rules, mesh: Mesh, used_names: set[str] = frozenset()) -> dict:
  """Validates the rules table against the mesh and the names in use; returns it as a dict."""
  names = [name for name, _ in rules]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ConfigError(f"rules: each logical axis may appear once; repeated: {dupes}")
  table = {}
  for name, target in rules:
    targets = target if isinstance(target, (tuple, list)) else (target,)
    for axis in targets:
      if axis is not None and axis not in mesh.axis_names:
        raise ConfigError(
          f"rules: {name!r} maps to unknown mesh axis {axis!r}; mesh axes are {mesh.axis_names}"
        )
    table[name] = tuple(a for a in targets if a is not None) or None
  missing = sorted(set(used_names) - set(table))
  if missing:
    raise ConfigError(f"rules: logical axes {missing} are used by the model but have no rule")
  return table


def check_batch(batch_size: int, mesh: Mesh, table: dict) -> None:
  """The global batch splits evenly over the mesh axes of the `act_batch` rule."""
  axes = table.get("act_batch") or ()
  parts = math.prod(mesh.shape[a] for a in axes)
  if batch_size % parts:
    raise ConfigError(
      f"data.batch_size={batch_size} does not split over the {parts} devices of the mesh axes "
      f"{' x '.join(axes)} (rules act_batch; mesh.shape={tuple(mesh.shape.values())}): use a "
      f"multiple of {parts}"
    )


def spec(names: Sequence[str | None], table: dict) -> P:
  """Resolves logical names to a PartitionSpec; a mesh axis is used at most once per spec."""
  out, seen = [], set()
  for name in names:
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    if seen & set(axes):
      raise ConfigError(
        f"logical axes {tuple(names)} map mesh axes {sorted(seen & set(axes))} twice"
      )
    seen |= set(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


@contextlib.contextmanager
def use_rules(table: dict) -> Iterator[None]:
  """Makes `table` (from check_rules) the one `shard` resolves names with."""
  token = _RULES.set(table)
  try:
    yield
  finally:
    _RULES.reset(token)


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation by logical names; a no-op when no rules are in context."""
  table = _RULES.get()
  if table is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec(names, table))


def tree_shardings(names_tree, mesh: Mesh, table: dict):
  """NamedShardings for a pytree whose leaves are tuples of logical names."""
  return jax.tree.map(
    lambda n: NamedSharding(mesh, spec(n, table)),
    names_tree,
    is_leaf=lambda n: isinstance(n, tuple),
  )


def batch_sharding(mesh: Mesh, ndim: int, table: dict | None = None) -> NamedSharding:
  """Rows over the mesh axes of the `act_batch` rule, every other dimension replicated.

  The rules are `table`, or the table `use_rules` put in context.
  """
  table = _RULES.get() if table is None else table
  if table is None:
    raise RuntimeError("batch_sharding needs the rules table: pass it, or call within use_rules")
  return NamedSharding(mesh, spec(("act_batch",) + (None,) * (ndim - 1), table))


def batch_shards(mesh: Mesh, table: dict | None = None) -> int:
  """How many ways `batch_sharding` splits the rows: the product of its mesh axes' sizes."""
  axes = batch_sharding(mesh, 1, table).spec[0] or ()
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def log_param_shardings(shapes, shardings) -> None:
  """One line per parameter: path, shape, dtype and resolved PartitionSpec."""
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_shardings = jax.tree.leaves(shardings)
  for (path, leaf), sh in zip(flat_shapes, flat_shardings):
    logging.info(
      "param %-48s %-18s %-8s %s",
      jax.tree_util.keystr(path),
      tuple(leaf.shape),
      leaf.dtype,
      sh.spec,
    )
