"""python -m safecrs_jax.saferec.relational --data_dir=DIR|mini --split=test --out=OUT"""
import argparse
import json
import sys

from safecrs_jax.data import assets
from safecrs_jax.infra import errors, storage
from safecrs_jax.saferec.data import STAGES, find_split
from safecrs_jax.saferec.relational.phrasings import SETS
from safecrs_jax.saferec.relational.suite import PARTS, TURN_DISTANCES
from safecrs_jax.saferec.relational.writer import build_from_dir


class _Parser(argparse.ArgumentParser):
  """argparse with a bad argument as one `error:` line and exit status 1 (as launch/)."""

  def error(self, message):
    sys.exit(f"error: {message}")


def _tuple(text, flag, allowed=None, cast=str):
  """`text` split at commas; one `error:` line for an empty list, an unknown or a bad value."""
  try:
    items = tuple(cast(x.strip()) for x in text.split(",") if x.strip())
  except ValueError:
    sys.exit(f"error: {flag}={text}: expected comma-separated {cast.__name__} values")
  bad = [x for x in items if (allowed is not None and x not in allowed)
         or (cast is int and x < 0)]
  if not items or bad:
    known = f" from {', '.join(map(str, allowed))}" if allowed is not None else " (>= 0)"
    sys.exit(f"error: {flag}={text}: expected a non-empty list{known}"
             + (f"; not allowed: {', '.join(map(str, bad))}" if bad else ""))
  return items


def _count(value, flag):
  """A row count: n >= 0, or -1 for all (0 also means all)."""
  if value < -1:
    sys.exit(f"error: {flag}={value}: expected a count >= 0, or -1 for all rows")
  return max(value, 0)


def main(argv=None) -> int:
  try:
    return _main(argv)
  except Exception as e:  # noqa: BLE001 - known errors as one line (infra/errors.py)
    message = errors.describe(e)
    if message is None:
      raise
    sys.exit(f"error: {message}")


def _main(argv=None) -> int:
  p = _Parser(description="Write the relational-safety suite of a SafeRec split.")
  p.add_argument("--data_dir", required=True, help="released-layout / jsonl dir, or 'mini'")
  p.add_argument("--mini_seed", type=int, default=0, help="SafeRec-mini seed for --data_dir=mini")
  p.add_argument("--split", default="test")
  p.add_argument("--stage", default="sft", help="sft (rows with completions) or grpo")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--parts", default=",".join(PARTS))
  p.add_argument("--phrasing_sets", default="A,B")
  p.add_argument("--turn_distances", default=",".join(map(str, TURN_DISTANCES)))
  p.add_argument("--max_rows", type=int, default=0,
                 help="use the first N source rows (0 or -1: all)")
  p.add_argument("--pair_rows", type=int, default=0,
                 help="counterfactual twins from the first N source rows (0: as --max_rows); "
                      "more pairs for ofr / crg at a third of the rows per source")
  a = p.parse_args(argv)
  a.max_rows, a.pair_rows = _count(a.max_rows, "--max_rows"), _count(a.pair_rows, "--pair_rows")
  parts = _tuple(a.parts, "--parts", PARTS)
  phrasing_sets = _tuple(a.phrasing_sets, "--phrasing_sets", SETS)
  turn_distances = _tuple(a.turn_distances, "--turn_distances", cast=int)
  if a.stage not in STAGES:
    p.error(f"--stage={a.stage}: expected one of {', '.join(STAGES)}")
  if a.data_dir != assets.MINI and not (storage.isdir(a.data_dir) or storage.isfile(a.data_dir)):
    p.error(f"--data_dir={a.data_dir}: no such directory (or 'mini' for SafeRec-mini)")
  data_dir = assets.mini_dir(a.mini_seed) if a.data_dir == assets.MINI else a.data_dir
  try:                                        # a missing split: one line, before any work
    find_split(data_dir, a.split, a.stage)
  except FileNotFoundError as e:
    p.error(f"--split={a.split}: {e}")
  caps, max_rows = None, a.max_rows
  if a.pair_rows and a.pair_rows != a.max_rows:
    caps = {part: a.max_rows or 10**9 for part in PARTS}
    caps["counterfactual"] = a.pair_rows
    max_rows = 0 if not a.max_rows else max(a.max_rows, a.pair_rows)
  manifest = build_from_dir(data_dir, a.out, a.split, a.stage, max_rows, seed=a.seed,
                            parts=parts, phrasing_sets=phrasing_sets,
                            turn_distances=turn_distances, part_sources=caps)
  json.dump({k: manifest[k] for k in ("rows", "counts", "skipped", "files")}, sys.stdout, indent=1)
  print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
