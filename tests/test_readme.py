"""The README's commands stay true.

Every `python -m launch.<entry>` command in the README's bash blocks (the
paper-model, pod and GPU ones included) must parse: the entry point exists,
its flags exist, the config file loads with its argument and every override
names a real field. Lines of bare `--config.` overrides are checked against
the demo SFT command. The CPU commands are also run for real by other tests
(test_sft, test_gdpo_loop, test_evaluation, test_demo) and by .ci/run.
"""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BASE_SFT = "python -m launch.train_sft --config=configs/demo.py --workdir=/tmp/x"

# Parses flags exactly as the entry point would (loading the config and
# applying overrides), then stops before main().
_CHECK = r"""
import importlib, json, os, sys
from absl import app
cmds = json.loads(sys.argv[1])
mod = importlib.import_module(cmds[0][2])  # the slow imports, once
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
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""


def _bash_blocks(text):
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def readme_commands():
  """(python -m launch.X commands, bare override lines) from the README's bash blocks."""
  commands, overrides = [], []
  for block in _bash_blocks(open(README, encoding="utf-8").read()):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.strip()
      if "python -m launch." in line:
        line = line[line.index("python -m launch."):]
        commands.append(shlex.split(line, comments=True))
      elif line.startswith("--config."):
        overrides.append(shlex.split(line, comments=True))
  return commands, overrides


def test_readme_opens_with_the_two_fresh_machine_commands():
  blocks = _bash_blocks(open(README, encoding="utf-8").read())
  assert blocks[0].strip() == "pip install -e . && python -m launch.demo --workdir=runs/demo"
  test_cmd = blocks[1].strip()
  assert test_cmd.startswith('pip install -e ".[test]" && python -m pytest')
  ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
  assert test_cmd.split(" && ", 1)[1] in ci.splitlines()
  # the first command runs in its own venv holding only the plain install (no test extra)
  plain = ci[ci.index("python -m venv"):ci.index('pip install -q -e ".[test]"')]
  assert 'pip install -q -e "$OLDPWD"' in plain and "python -m launch.demo" in plain


def test_every_readme_launch_command_parses():
  commands, overrides = readme_commands()
  entries = {c[2] for c in commands}
  assert {"launch.train_sft", "launch.train_gdpo", "launch.evaluate", "launch.export_hf",
          "launch.demo"} <= entries, entries
  for line in overrides:
    commands.append(shlex.split(BASE_SFT) + line)
  assert len(commands) >= 12
  by_entry = {}
  for argv in commands:
    by_entry.setdefault(argv[2], []).append(argv)
  import json
  for entry, cmds in sorted(by_entry.items()):
    proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(cmds)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{entry}:\n{proc.stdout}\n{proc.stderr[-2000:]}"


def test_a_misspelled_override_is_caught():
  import json
  argv = shlex.split(BASE_SFT + " --config.sft.batchsize=3")
  proc = subprocess.run([sys.executable, "-c", _CHECK, json.dumps([argv])], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "batchsize" in proc.stdout + proc.stderr
