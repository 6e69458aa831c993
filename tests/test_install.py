"""The same install on every host: setup.py, constraints.txt and the imports agree.

constraints.txt pins the exact versions CI tested (.ci/refresh_constraints.py
writes it); every requirement of setup.py (the package and its tested extras)
must have a pin there that satisfies it, and every third-party module the
package imports must be declared.
"""
import ast
import importlib.metadata
import os
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Extras CI does not install (cloud buckets are tested against a fake bucket), so not pinned.
UNTESTED_EXTRAS = {"gcs"}
# Declared but not imported by name: needed at run time all the same.
RUNTIME_ONLY = {"jinja2": "transformers renders chat templates with it (tokens.prompt_ids)"}
# Imported only when a config asks for it, and declared in an extra.
OPTIONAL_IMPORTS = {"wandb": "wandb"}
PACKAGE_DIRS = ("safecrs_jax", "launch", "configs")


def _setup_kwargs():
  """The literal keyword arguments of setup() in setup.py (read, not run)."""
  tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "id", None) == "setup")
  out = {}
  for kw in call.keywords:
    try:
      out[kw.arg] = ast.literal_eval(kw.value)
    except ValueError:      # long_description=open(...): not a literal
      pass
  return out


def _pins(text):
  pins = {}
  for n, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
    assert m, f"constraints.txt line {n}: {line!r} is not name==version"
    name = canonicalize_name(m.group(1))
    assert name not in pins, f"constraints.txt pins {name} twice"
    pins[name] = Version(m.group(2))
  return pins


def _constraints():
  return open(os.path.join(REPO, "constraints.txt"), encoding="utf-8").read()


def _requirements(kwargs):
  reqs = [("install_requires", r) for r in kwargs["install_requires"]]
  for extra, items in kwargs["extras_require"].items():
    if extra not in UNTESTED_EXTRAS:
      reqs += [(f"extras_require[{extra!r}]", r) for r in items]
  return reqs


def _disagreements(kwargs, pins):
  bad = []
  for where, text in _requirements(kwargs):
    req = Requirement(text)
    name = canonicalize_name(req.name)
    if name not in pins:
      bad.append(f"{where}: {text} has no pin in constraints.txt")
    elif not req.specifier.contains(pins[name], prereleases=True):
      bad.append(f"{where}: {text} is not satisfied by the pin {name}=={pins[name]}")
  return bad


def test_every_requirement_is_pinned_and_satisfied():
  kwargs = _setup_kwargs()
  assert _disagreements(kwargs, _pins(_constraints())) == []


def test_disagreements_are_found():
  """The check above is not vacuous: a raised floor, a missing pin and a pin that does
  not satisfy are each reported."""
  kwargs = _setup_kwargs()
  pins = _pins(_constraints())
  raised = dict(kwargs, install_requires=["jax>=99.0", *kwargs["install_requires"][1:]])
  assert any("jax>=99.0 is not satisfied" in b for b in _disagreements(raised, pins))
  missing = dict(pins)
  del missing["transformers"]
  assert any("no pin" in b and "transformers" in b for b in _disagreements(kwargs, missing))
  with pytest.raises(AssertionError, match="not name==version"):
    _pins("jax>=0.10\n")


def test_python_requires_holds_the_tested_python():
  kwargs = _setup_kwargs()
  tested = re.search(r"Python (\d+\.\d+\.\d+)", _constraints())
  assert tested, "constraints.txt names the Python it was tested with"
  spec = SpecifierSet(kwargs["python_requires"])
  assert Version(tested.group(1)) in spec
  # the floor is the tested minor: no untested older Python is claimed
  floor = min(Version(s.version) for s in spec if s.operator == ">=")
  assert floor.release[:2] == Version(tested.group(1)).release[:2]


def _imported_modules():
  """Top-level names imported by the installed packages (absolute imports)."""
  mods = {}
  for root in PACKAGE_DIRS:
    for dirpath, _, files in os.walk(os.path.join(REPO, root)):
      for f in files:
        if not f.endswith(".py"):
          continue
        path = os.path.join(dirpath, f)
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
          if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
          elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
          else:
            continue
          for name in names:
            mods.setdefault(name.split(".")[0], os.path.relpath(path, REPO))
  return {m: p for m, p in mods.items()
          if m not in sys.stdlib_module_names and m not in PACKAGE_DIRS}


def test_imports_are_declared_and_declarations_imported():
  kwargs = _setup_kwargs()
  declared = {canonicalize_name(Requirement(r).name) for r in kwargs["install_requires"]}
  dists = importlib.metadata.packages_distributions()
  imported = set()
  for module, path in sorted(_imported_modules().items()):
    names = {canonicalize_name(d) for d in dists.get(module, [module])}
    imported |= names
    if module in OPTIONAL_IMPORTS:
      extra = OPTIONAL_IMPORTS[module]
      assert any(canonicalize_name(Requirement(r).name) in names
                 for r in kwargs["extras_require"][extra]), f"{module}: not in extra {extra}"
      continue
    assert names & declared, f"{path} imports {module} ({sorted(names)}): not in install_requires"
  unused = declared - imported - set(RUNTIME_ONLY)
  assert not unused, f"install_requires declares {sorted(unused)}, which nothing imports"


def test_install_commands_use_the_constraints():
  """README's commands, the launch guide and CI install with -c constraints.txt."""
  for name in ("README.md", ".ci/run", "docs/launch.md"):
    text = open(os.path.join(REPO, name), encoding="utf-8").read()
    code = "\n".join(line for line in text.splitlines()
                     if not line.lstrip().startswith("#"))      # shell comments describe
    installs = [line for line in re.findall(r"pip install[^\n&|;]*", code)
                if "-e" in line.split()]
    assert installs, name
    for line in installs:
      assert re.search(r"-c \S*constraints\.txt", line), f"{name}: {line!r} lacks the constraints"
