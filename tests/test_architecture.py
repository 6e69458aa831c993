"""The import rules of the package, read from the source with `ast` (nothing is imported).

Layers, lowest first; a module imports its own package and lower layers only:
  0  infra/; config (safecrs_jax/config.py or config/) and the safecrs_jax package itself,
     which every layer may import
  1  models/, saferec/          (two packages of one layer: neither imports the other)
  2  data/
  3  rl/
  4  train/
  5  evaluation/, plan/
  6  safecrs_jax/demo.py
  7  launch/ and `__main__` modules (entry points)
No stage (train/sft.py, train/gdpo.py) imports another, and neither plan/ nor evaluation/
imports a stage. No module uses another module's private (`_name`) attribute. Modules stay
small: at most MAX_LINES lines each, at most MAX_TOP_MODULES modules directly in safecrs_jax/.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("safecrs_jax", "launch")
LAYERS = {"infra": 0, "config": 0, "models": 1, "saferec": 1, "data": 2, "rl": 3, "train": 4,
          "evaluation": 5, "plan": 5, "demo": 6}
ENTRY_LAYER = 7
ANYONE = ("safecrs_jax", "config")    # importable from every layer (they import no layer)
STAGES = ("safecrs_jax.train.sft", "safecrs_jax.train.gdpo")
MAX_LINES = 350
MAX_TOP_MODULES = 10


def _name(path):
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for d in PACKAGES for p in sorted((ROOT / d).rglob("*.py"))}
TREES = {name: ast.parse(p.read_text(encoding="utf-8"), str(p)) for name, p in MODULES.items()}


def _bindings(name, tree=None):
  """(line, module, imported name or None, local name) of every import in module `name`,
  function-level ones included: `from pkg import mod` binds module pkg.mod, `from mod import x`
  binds x of mod, `import a.b` binds a (module a)."""
  is_pkg = MODULES[name].name == "__init__.py"
  for node in ast.walk(TREES[name] if tree is None else tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.asname:
          yield node.lineno, alias.name, None, alias.asname
        else:
          yield node.lineno, alias.name, None, alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".")[:len(name.split(".")) - node.level + is_pkg]
        base = ".".join(pkg + ([base] if base else []))
      for alias in node.names:
        full, local = f"{base}.{alias.name}", alias.asname or alias.name
        if full in MODULES:
          yield node.lineno, full, None, local
        else:
          yield node.lineno, base, alias.name, local


def _group_layer(name):
  """(group, layer) of a module: the subpackage (or top-level module) it belongs to."""
  parts = name.split(".")
  if parts[0] == "launch" or parts[-1] == "__main__":
    return parts[0] if parts[0] == "launch" else ".".join(parts[:-1]), ENTRY_LAYER
  if len(parts) == 1:
    return "safecrs_jax", 0
  if parts[1] not in LAYERS:
    raise AssertionError(f"{name}: safecrs_jax.{parts[1]} has no layer in LAYERS")
  return parts[1], LAYERS[parts[1]]


def _internal_imports():
  for name in MODULES:
    for line, target, _, _ in _bindings(name):
      if target.split(".")[0] in PACKAGES:
        yield name, line, target


def test_every_module_has_a_layer():
  for name in MODULES:
    _group_layer(name)


def test_layers_import_downwards_only():
  bad = []
  for name, line, target in _internal_imports():
    if target not in MODULES:
      bad.append(f"{name}:{line} imports {target}, which is not a module")
      continue
    (group, layer), (t_group, t_layer) = _group_layer(name), _group_layer(target)
    if t_group != group and t_group not in ANYONE and t_layer >= layer:
      bad.append(f"{name}:{line} (layer {layer}) imports {target} (layer {t_layer})")
  assert not bad, "\n".join(bad)


def test_infra_imports_only_infra_and_config():
  bad = [f"{name}:{line} imports {target}" for name, line, target in _internal_imports()
         if _group_layer(name)[0] == "infra"
         and _group_layer(target)[0] not in ("infra",) + ANYONE]
  assert not bad, "\n".join(bad)


def test_no_stage_imports_another_and_planner_and_evaluation_import_no_stage():
  bad = []
  for name, line, target in _internal_imports():
    stage = next((s for s in STAGES if target == s or target.startswith(s + ".")), None)
    if stage is None or stage == name:
      continue
    if name in STAGES or _group_layer(name)[0] in ("plan", "evaluation"):
      bad.append(f"{name}:{line} imports the stage {stage}")
  assert not bad, "\n".join(bad)


def _is_private(attr):
  return attr.startswith("_") and not attr.startswith("__")


def _private_uses(name, tree=None):
  """Where module `name` uses a private name of another module of the package: `from mod
  import _x`, or `m._x` on a local name m bound to a module."""
  tree = TREES[name] if tree is None else tree
  modules = {}
  for line, target, imported, local in _bindings(name, tree):
    if target.split(".")[0] not in PACKAGES:
      continue
    if imported is None:
      modules[local] = target
    elif _is_private(imported):
      yield f"{name}:{line} imports {target}.{imported}"
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and _is_private(node.attr)
        and isinstance(node.value, ast.Name) and modules.get(node.value.id, name) != name):
      yield f"{name}:{node.lineno} uses {modules[node.value.id]}.{node.attr}"


def test_no_private_name_used_across_modules():
  bad = [use for name in MODULES for use in _private_uses(name)]
  assert not bad, "\n".join(bad)


def test_the_private_name_check_catches_both_forms():
  tree = ast.parse("from safecrs_jax.models import layers\n"
                   "from safecrs_jax.models.layers import _secret\n"
                   "x = layers._attend\n"
                   "def f(self):\n  return self._own\n")
  assert list(_private_uses("safecrs_jax.rl.rollout", tree)) == [
      "safecrs_jax.rl.rollout:2 imports safecrs_jax.models.layers._secret",
      "safecrs_jax.rl.rollout:3 uses safecrs_jax.models.layers._attend"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
  lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
  assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines > {MAX_LINES}"


def test_few_modules_directly_in_the_package():
  top = sorted(p.name for p in (ROOT / "safecrs_jax").glob("*.py") if p.name != "__init__.py")
  assert len(top) <= MAX_TOP_MODULES, top
