"""python -m safecrs_jax.saferec.relational --data_dir=DIR|mini --split=test --out=OUT"""
import argparse
import json
import sys

from safecrs_jax.data import assets
from safecrs_jax.saferec.relational.suite import PARTS, TURN_DISTANCES
from safecrs_jax.saferec.relational.writer import build_from_dir


def _tuple(text, cast=str):
  return tuple(cast(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Write the relational-safety suite of a SafeRec split.")
  p.add_argument("--data_dir", required=True, help="released-layout / jsonl dir, or 'mini'")
  p.add_argument("--mini_seed", type=int, default=0, help="SafeRec-mini seed for --data_dir=mini")
  p.add_argument("--split", default="test")
  p.add_argument("--stage", default="sft", help="sft (rows with completions) or grpo")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--parts", default=",".join(PARTS))
  p.add_argument("--phrasing_sets", default="A,B")
  p.add_argument("--turn_distances", default=",".join(map(str, TURN_DISTANCES)))
  p.add_argument("--max_rows", type=int, default=0, help="use the first N source rows (0: all)")
  p.add_argument("--pair_rows", type=int, default=0,
                 help="counterfactual twins from the first N source rows (0: as --max_rows); "
                      "more pairs for ofr / crg at a third of the rows per source")
  a = p.parse_args(argv)
  data_dir = assets.mini_dir(a.mini_seed) if a.data_dir == assets.MINI else a.data_dir
  caps, max_rows = None, a.max_rows
  if a.pair_rows and a.pair_rows != a.max_rows:
    caps = {part: a.max_rows or 10**9 for part in PARTS}
    caps["counterfactual"] = a.pair_rows
    max_rows = 0 if not a.max_rows else max(a.max_rows, a.pair_rows)
  manifest = build_from_dir(data_dir, a.out, a.split, a.stage, max_rows, seed=a.seed,
                            parts=_tuple(a.parts), phrasing_sets=_tuple(a.phrasing_sets),
                            turn_distances=_tuple(a.turn_distances, int), part_sources=caps)
  json.dump({k: manifest[k] for k in ("rows", "counts", "skipped", "files")}, sys.stdout, indent=1)
  print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
