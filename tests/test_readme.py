"""The README and the docs/ pages stay true.

For README.md and every docs/*.md page:
- every `python -m launch.<entry>` command in a bash block parses with the entry
  point's real flags (the config file loads with its argument, every override
  names a real field); lines of bare `--config.` overrides are checked against
  the demo SFT command;
- every `--flag` named after `launch.<entry>` in inline code is a flag of that
  entry, and every inline `--config.a.b=` names a real config field;
- every `configs/x.py:arg=...` shown loads;
- every relative link, and its `#anchor`, resolves;
- every repository path shown (`safecrs_jax/...`, `tests/...`, `bench/...`,
  `python -m <module>`) exists;
- docs/architecture.md's tree lists every module of the package.
The CPU commands are also run for real by other tests (test_sft,
test_gdpo_loop, test_evaluation, test_demo) and by .ci/run.
"""
import glob
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS_DIR = os.path.join(ROOT, "docs")
ARCHITECTURE = os.path.join(DOCS_DIR, "architecture.md")
BASE_SFT = "python -m launch.train_sft --config=configs/demo.py --workdir=/tmp/x"
ENTRIES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "launch", "*.py"))
                 if not p.endswith("__init__.py"))
REPO_DIRS = ("safecrs_jax", "tests", "bench", "configs", "launch", "docs", ".ci")
REPO_PATH = re.compile(r"(?<![\w/.<$-])((?:" + "|".join(map(re.escape, REPO_DIRS)) + r")/[\w./-]*)")

# Parses flags exactly as the entry point would (loading the config and
# applying overrides), then stops before main(). Prints, last, one line
# `RESULT {"bad": [commands that failed], "flags": [the entry's flag names]}`.
_CHECK = r"""
import importlib, json, os, sys
from absl import app, flags
entry, cmds = sys.argv[1], json.loads(sys.argv[2])
mod = importlib.import_module(entry)  # the slow imports, once
app.define_help_flags()
names = sorted(flags.FLAGS)
bad = []
for argv in cmds:
  pid = os.fork()  # a fresh flag state per command
  if pid == 0:
    code = 3
    # config_flags reads its --config.x overrides from sys.argv itself.
    sys.argv = [argv[2]] + argv[3:] + ["--only_check_args"]
    try:
      app.run(mod.main)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001
      code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    bad.append(" ".join(argv))
print("RESULT " + json.dumps({"bad": bad, "flags": names}))
"""


def _pages():
  return [README] + sorted(glob.glob(os.path.join(DOCS_DIR, "*.md")))


def _read(path):
  return open(path, encoding="utf-8").read()


def _rel(path):
  return os.path.relpath(path, ROOT)


def _bash_blocks(text):
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _strip_blocks(text):
  """The text outside fenced code blocks (where inline code and links live)."""
  return re.sub(r"```.*?```", "", text, flags=re.S)


def _inline_code(text):
  return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", _strip_blocks(text))]


def block_commands(text):
  """(python -m launch.X commands, bare override lines) from a page's bash blocks."""
  commands, overrides = [], []
  for block in _bash_blocks(text):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.strip()
      if "python -m launch." in line:
        line = line[line.index("python -m launch."):]
        commands.append(shlex.split(line, comments=True))
      elif line.startswith("--config."):
        overrides.append(shlex.split(line, comments=True))
  return commands, overrides


def _check_entry(entry, cmds):
  proc = subprocess.run([sys.executable, "-c", _CHECK, f"launch.{entry}", json.dumps(cmds)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and results, f"{entry}:\n{proc.stdout}\n{proc.stderr[-2000:]}"
  return json.loads(results[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def parsed():
  """Every bash-block launch command of every page, parsed by its entry point."""
  commands, where = [], {}
  for page in _pages():
    cmds, overrides = block_commands(_read(page))
    cmds += [shlex.split(BASE_SFT) + line for line in overrides]
    for argv in cmds:
      where.setdefault(" ".join(argv), _rel(page))
    commands += cmds
  by_entry = {entry: [] for entry in ENTRIES}
  for argv in commands:
    entry = argv[2].removeprefix("launch.")
    assert entry in by_entry, f"{where[' '.join(argv)]}: no entry point launch.{entry}"
    by_entry[entry].append(argv)
  results = {entry: _check_entry(entry, cmds) for entry, cmds in by_entry.items()}
  return commands, where, results


def _config_has(path):
  """Whether `a.b.c` names a field of the config tree (the demo's, which has every section)."""
  from configs import demo
  node = demo.get_config()
  for key in path.split("."):
    if not hasattr(node, "keys") or key not in node:
      return False
    node = node[key]
  return True


# --- the README itself -----------------------------------------------------

def test_readme_opens_with_the_two_fresh_machine_commands():
  blocks = _bash_blocks(_read(README))
  assert blocks[0].strip() == ("pip install -e . -c constraints.txt && "
                              "python -m launch.demo --workdir=runs/demo")
  test_cmd = blocks[1].strip()
  assert test_cmd.startswith('pip install -e ".[test]" -c constraints.txt && python -m pytest')
  ci = _read(os.path.join(ROOT, ".ci", "run"))
  assert test_cmd.split(" && ", 1)[1] in ci.splitlines()
  # the first command runs in its own venv holding only the plain install (no test extra)
  plain = ci[ci.index("python -m venv"):ci.index('pip install -q -e ".[test]"')]
  assert 'pip install -q -e "$OLDPWD"' in plain and "python -m launch.demo" in plain


def test_readme_is_one_screen_that_indexes_every_docs_page():
  text = _read(README)
  assert len(text.splitlines()) <= 160
  linked = {os.path.normpath(t.split("#")[0]) for t in re.findall(r"\]\((docs/[^)]+)\)", text)}
  pages = {_rel(p) for p in glob.glob(os.path.join(DOCS_DIR, "*.md"))}
  assert pages and pages <= linked, f"docs pages the README does not link: {pages - linked}"


# --- commands and flags ----------------------------------------------------

def test_every_launch_command_shown_parses(parsed):
  commands, where, results = parsed
  assert {argv[2] for argv in commands} >= {f"launch.{e}" for e in ENTRIES}
  assert len(commands) >= 20
  bad = [f"{where[cmd]}: {cmd}" for r in results.values() for cmd in r["bad"]]
  assert not bad, "commands that do not parse:\n" + "\n".join(bad)


def inline_flag_errors(text, flags_of):
  """`launch.<entry> --flag` / `--config.a.b` in inline code that the entry does not know."""
  errors = []
  for span in _inline_code(text):
    for m in re.finditer(r"\blaunch\.(\w+)", span):
      entry = m.group(1)
      if entry not in flags_of:
        errors.append(f"no entry point launch.{entry}: {span}")
        continue
      rest = span[m.end():]
      rest = rest[:rest.index("launch.")] if "launch." in rest else rest
      for name in re.findall(r"(?<![\w-])--([\w.]+)", rest):
        if name.startswith("config."):
          ok = "config" in flags_of[entry] and _config_has(name[len("config."):])
        else:
          known = flags_of[entry]
          ok = name in known or (name.startswith("no") and name[2:] in known)
        if not ok:
          errors.append(f"launch.{entry} has no --{name}: {span}")
  for span in _inline_code(text):
    if "launch." not in span:
      for name in re.findall(r"(?<![\w-])--config\.([\w.]+)=", span):
        if not _config_has(name):
          errors.append(f"no config field {name}: {span}")
  return errors


def test_every_flag_named_in_the_text_exists(parsed):
  _, _, results = parsed
  flags_of = {entry: set(r["flags"]) for entry, r in results.items()}
  errors = [f"{_rel(p)}: {e}" for p in _pages() for e in inline_flag_errors(_read(p), flags_of)]
  assert not errors, "\n".join(errors)
  # the checker itself catches a flag the entry point does not have
  assert inline_flag_errors("`launch.demo --chek`", flags_of)
  assert inline_flag_errors("`--config.sft.batchsize=3`", flags_of)
  assert not inline_flag_errors("`launch.demo --noprogress --check`", flags_of)


def config_args(text):
  """Every `configs/<name>.py:<arg>` and bare `configs/<name>.py` a page shows."""
  return sorted(set(re.findall(r"configs/(\w+)\.py(?::([\w=,/.\-]*\w))?", text)))


def test_every_config_argument_shown_loads():
  shown = [(p, name, arg) for p in _pages() for name, arg in config_args(_read(p))]
  assert any(arg for _, _, arg in shown)
  for page, name, arg in shown:
    if name == "common":
      continue
    mod = importlib.import_module(f"configs.{name}")
    try:
      mod.get_config(arg or None)
    except Exception as e:  # noqa: BLE001
      pytest.fail(f"{_rel(page)}: configs/{name}.py:{arg} does not load: {e}")
  with pytest.raises(ValueError):
    importlib.import_module("configs.demo").get_config("stge=gdpo")


# --- links, anchors and paths ----------------------------------------------

def slug(heading):
  """GitHub's anchor for a heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors(text):
  return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", _strip_blocks(text), flags=re.M)}


def link_errors(page, text):
  errors = []
  for target in re.findall(r"\]\(([^)\s]+)\)", _strip_blocks(text)):
    if re.match(r"[a-z]+:", target):
      continue   # http(s), mailto
    path, _, anchor = target.partition("#")
    file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(file):
      errors.append(f"{target}: no such file")
    elif anchor and file.endswith(".md") and anchor not in anchors(_read(file)):
      errors.append(f"{target}: no heading with that anchor")
  return errors


def test_every_link_and_anchor_resolves():
  errors = [f"{_rel(p)}: {e}" for p in _pages() for e in link_errors(p, _read(p))]
  assert not errors, "\n".join(errors)
  page = os.path.join(DOCS_DIR, "scaling.md")
  assert link_errors(page, "[a](evaluation.md#what-the-metrics-mean) [b](#will-it-fit) "
                           "[c](#nowhere) [d](evaluation.md#nowhere)") == [
      "#nowhere: no heading with that anchor", "evaluation.md#nowhere: no heading with that anchor"]
  assert link_errors(page, "[a](missing.md)") == ["missing.md: no such file"]


def path_errors(text):
  """Repository paths in inline code and bash blocks, and `python -m` modules, that do not exist."""
  errors = []
  spans = _inline_code(text) + _bash_blocks(text)
  for span in spans:
    for path in REPO_PATH.findall(span):
      if not os.path.exists(os.path.join(ROOT, path.rstrip("./"))):
        errors.append(f"no {path}")
    for path in re.findall(r"(?<![\w/.<-])((?:\w+/)+\w+\.py)\b", span):
      if not any(os.path.exists(os.path.join(ROOT, d, path)) for d in ("", "safecrs_jax")):
        errors.append(f"no {path}")
    for module in re.findall(r"python -m ((?:safecrs_jax|launch|bench)(?:\.\w+)*)", span):
      if importlib.util.find_spec(module) is None:
        errors.append(f"no module {module}")
  return sorted(set(errors))


def test_every_repository_path_shown_exists():
  errors = [f"{_rel(p)}: {e}" for p in _pages() for e in path_errors(_read(p))]
  assert not errors, "\n".join(errors)
  assert path_errors("`safecrs_jax/train/nowhere.py` `saferec/gone.py`") == [
      "no safecrs_jax/train/nowhere.py", "no saferec/gone.py"]
  assert not path_errors("`safecrs_jax/infra/storage.py` `saferec/rewards.py` `<workdir>/tb/`")


# --- the architecture page -------------------------------------------------

def tree_entries(text):
  """Paths named by the first tree block of the architecture page (`name/` or `name.py`)."""
  block = re.search(r"```\n(safecrs_jax/\n.*?)```", text, flags=re.S).group(1)
  stack, paths = [], set()
  for line in block.splitlines():
    name = line.split()[0] if line.strip() else ""
    if not (name.endswith("/") or name.endswith(".py")):
      continue   # a wrapped description
    depth = (len(line) - len(line.lstrip(" "))) // 2
    stack = stack[:depth] + [name.rstrip("/")]
    paths.add("/".join(stack))
  return paths


def test_architecture_tree_lists_every_module():
  text = _read(ARCHITECTURE)
  listed = tree_entries(text)
  actual = set()
  for path in glob.glob(os.path.join(ROOT, "safecrs_jax", "**", "*.py"), recursive=True):
    rel = _rel(path)
    actual.add(os.path.dirname(rel))
    if os.path.basename(rel) != "__init__.py":
      actual.add(rel)
  missing = sorted(actual - listed)
  assert not missing, ("docs/architecture.md: add a line (name and one-line job) to the tree "
                       f"for each of {missing}")
  assert {"configs", "launch", "bench", "docs", "tests"} <= listed
  launch_line = next(line for line in text.splitlines() if line.startswith("launch/"))
  assert all(entry in launch_line for entry in ENTRIES), launch_line
  # the parser itself sees nesting, so a module listed under the wrong package is missing
  assert tree_entries("```\nsafecrs_jax/\n  rl/\n    steps.py  x\n  train/\n```") == {
      "safecrs_jax", "safecrs_jax/rl", "safecrs_jax/rl/steps.py", "safecrs_jax/train"}


def test_a_misspelled_override_is_caught():
  argv = shlex.split(BASE_SFT + " --config.sft.batchsize=3")
  proc = subprocess.run([sys.executable, "-c", _CHECK, "launch.train_sft", json.dumps([argv])],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert json.loads(result[-1][len("RESULT "):])["bad"] == [" ".join(argv)]
  assert "batchsize" in proc.stdout + proc.stderr


def doc_reference_errors(source):
  """`docs/<page>.md` (and a quoted heading after it) named in code that does not exist."""
  errors = []
  for page, heading in re.findall(r"\b(docs/[\w-]+\.md)(?:,\s*#?\s*\"([^\"]+)\")?", source):
    path = os.path.join(ROOT, page)
    heading = re.sub(r"\s*\n\s*#?\s*", " ", heading)   # a heading wrapped over comment lines
    if not os.path.exists(path):
      errors.append(f"no {page}")
    elif heading and slug(heading) not in anchors(_read(path)):
      errors.append(f"{page} has no heading {heading!r}")
  return errors


def test_code_points_at_docs_that_exist():
  files = [os.path.join(ROOT, "setup.py"), os.path.join(ROOT, ".ci", "run")]
  for d in ("safecrs_jax", "configs", "launch", "bench", "tests"):
    files += glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)
  files.remove(os.path.abspath(__file__))   # its own examples below
  errors = [f"{_rel(f)}: {e}" for f in files for e in doc_reference_errors(_read(f))]
  assert not errors, "\n".join(errors)
  assert doc_reference_errors('docs/scaling.md, "Watching a run" docs/relational-safety.md, '
                              '"No such heading" docs/gone.md') == [
      "docs/relational-safety.md has no heading 'No such heading'", "no docs/gone.md"]
