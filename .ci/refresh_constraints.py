#!/usr/bin/env python3
"""Rewrites constraints.txt: the exact versions of a fresh `pip install -e ".[test,plan]"`.

    python .ci/refresh_constraints.py                 # new venv in a temp dir (a few minutes)
    python .ci/refresh_constraints.py --python=PY     # freeze PY's environment instead

Run it to move the tested stack forward, then run .ci/run (which installs with
`-c constraints.txt`) and commit the file with the results. The file is what
CI tested: every host that installs with it gets the same stack. The package
itself and pip's own tools are left out; local version labels (torch's `+cpu`)
are dropped so the pins resolve on any index (a local `+cpu` wheel still
satisfies `==2.13.0`). tests/test_install.py fails when setup.py asks for a
version the file does not pin.
"""
import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = "test,plan"
SKIP = {"safecrs-jax", "safecrs_jax", "pip", "setuptools", "wheel"}


def pins(freeze_text: str) -> list[str]:
  """`pip freeze` output -> sorted `name==version` lines (module docstring)."""
  out = []
  for line in freeze_text.splitlines():
    line = line.strip()
    m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^+\s;]+)(\+\S+)?", line)
    if not m or m.group(1).lower().replace("_", "-") in SKIP:
      continue                     # comments, `-e` lines, the package itself
    out.append(f"{m.group(1)}=={m.group(2)}")
  return sorted(out, key=str.lower)


def fresh_freeze(python: str) -> str:
  """Installs the package with EXTRAS into a new venv made by `python`; its pip freeze."""
  with tempfile.TemporaryDirectory() as tmp:
    venv = os.path.join(tmp, "venv")
    subprocess.run([python, "-m", "venv", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "-e", f"{ROOT}[{EXTRAS}]"], check=True)
    return subprocess.run([py, "-m", "pip", "freeze"], check=True, capture_output=True,
                          text=True).stdout


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--python", help="freeze this interpreter's environment (no new venv)")
  ap.add_argument("--out", default=os.path.join(ROOT, "constraints.txt"))
  args = ap.parse_args()
  if args.python:
    text = subprocess.run([args.python, "-m", "pip", "freeze"], check=True,
                          capture_output=True, text=True).stdout
    source = f"pip freeze of {args.python}"
  else:
    text = fresh_freeze(sys.executable)
    source = f'a fresh `pip install -e ".[{EXTRAS}]"`'
  lines = pins(text)
  header = [
      "# The exact versions CI tested (.ci/run installs with -c constraints.txt).",
      f"# Written by .ci/refresh_constraints.py from {source},",
      f"# Python {platform.python_version()}, {datetime.date.today().isoformat()}. "
      "Do not edit by hand.",
  ]
  with open(args.out, "w", encoding="utf-8") as f:
    f.write("\n".join(header + lines) + "\n")
  print(f"{args.out}: {len(lines)} pins")


if __name__ == "__main__":
  main()
