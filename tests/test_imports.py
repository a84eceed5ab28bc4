"""Imports flow one way: main / sweep / export → train → {checkpoint, step, rollout, data, testbed}
→ {objectives, sampling, logps} → models → sharding.

The package's own imports (module level and inside functions) are read with `ast` and every edge
is checked against the layer table below: a module may import its own layer or a lower one, never a
higher one, and the module graph has no cycle. `checkpoint`, `workdir` (the run's lock and
fingerprint) and `errors` are leaves (they import no other module of the project but `errors`), so
they sit at the bottom where any room may use them: the models' loader reads Orbax parameters
through `checkpoint`. A few edges the layers would allow are
forbidden outright: export does not import the trainer, the step no particular objective, data no
objective.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "align_jax")

LAYERS = (
  ("main", "sweep", "export", "plan"),
  ("train",),
  ("step", "rollout", "rewards", "data", "testbed", "metrics", "preemption", "validate"),
  ("objectives", "sampling", "logps", "targets"),
  ("models", "config_lib"),
  ("sharding", "checkpoint", "workdir", "errors"),
)
FORBIDDEN = (  # (importer prefix, imported prefix)
  ("export", "train"),
  ("step", "objectives."),
  ("data", "objectives"),
  ("objectives", "testbed"),
)


def _module(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _layer(module: str) -> int:
  top = module.split(".")[0]
  for i, names in enumerate(LAYERS):
    if top in names:
      return i
  raise AssertionError(f"align_jax.{module} is in no layer of tests/test_imports.py: add it")


def _edges() -> dict[str, set[str]]:
  """module -> the align_jax modules it imports (names relative to the package)."""
  edges = {}
  for directory, _, files in os.walk(ROOT):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      module = _module(path)
      targets = set()
      for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
          targets |= {a.name for a in node.names if a.name.startswith("align_jax.")}
        elif (
          isinstance(node, ast.ImportFrom)
          and node.module
          and (node.module == "align_jax" or node.module.startswith("align_jax."))
        ):
          if node.module == "align_jax":  # from align_jax import train, step
            targets |= {f"align_jax.{a.name}" for a in node.names}
          else:  # from align_jax.data import records: the submodule if it is one.
            for a in node.names:
              sub = os.path.join(ROOT, *node.module.split(".")[1:], a.name)
              is_module = os.path.exists(sub + ".py") or os.path.isdir(sub)
              targets.add(f"{node.module}.{a.name}" if is_module else node.module)
      edges[module] = {t[len("align_jax.") :] for t in targets} - {module}
  return edges


EDGES = _edges()


def test_the_package_is_read():
  assert {"train", "step", "data.records", "testbed.evaluate", "models.loading"} <= set(EDGES)
  assert "data.records" in EDGES["train"] and "step" in EDGES["train"]


@pytest.mark.parametrize("module", sorted(EDGES))
def test_imports_flow_down_the_layers(module):
  for target in sorted(EDGES[module]):
    assert _layer(target) >= _layer(module), (
      f"align_jax.{module} (layer {_layer(module)}) imports align_jax.{target} "
      f"(layer {_layer(target)}): imports must flow down {LAYERS}"
    )
    for importer, imported in FORBIDDEN:
      assert not (
        (module == importer or module.startswith(importer + "."))
        and (
          target == imported.rstrip(".")
          and not imported.endswith(".")
          or target.startswith(imported.rstrip(".") + ".")
        )
      ), f"align_jax.{module} imports align_jax.{target}: forbidden ({importer} -> {imported})"


def test_no_import_cycles():
  """Depth-first search over the module graph (package __init__ re-exports included)."""
  state = {}

  def visit(module, path):
    state[module] = "open"
    for target in EDGES.get(module, ()):
      if state.get(target) == "open":
        raise AssertionError(f"import cycle: {' -> '.join(path + [module, target])}")
      if target not in state:
        visit(target, path + [module])
    state[module] = "done"

  for module in sorted(EDGES):
    if module not in state:
      visit(module, [])


def test_the_checker_rejects_an_upward_edge():
  """The check itself can fail: a sampling -> train edge is against the layers."""
  assert _layer("train") < _layer("sampling")
  assert _layer("testbed.evaluate") < _layer("objectives.bond")
