"""Writing a suite to disk: `<out>/relational.jsonl` plus `<out>/manifest.json`.

The JSON-lines file sits where `saferec.load_split(out, "relational")` finds
a split (`<data_dir>/<split>.jsonl`); rows keep `completion` when the source
split had one, so stage "sft" loads them, else load with stage="grpo".
"""
from __future__ import annotations

import json
import os

from safecrs_jax.infra import storage
from safecrs_jax.saferec import data
from safecrs_jax.saferec.relational.suite import make_suite

SPLIT = "relational"


def write_suite(out_dir: str, rows, manifest: dict) -> dict:
  """Write the rows and the manifest; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"rows": os.path.join(out_dir, f"{SPLIT}.jsonl"),
           "manifest": os.path.join(out_dir, "manifest.json")}
  with storage.open(paths["rows"], "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  with storage.open(paths["manifest"], "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return paths


def build_from_dir(data_dir: str, out_dir: str, split: str = "test", stage: str = "sft",
                   max_rows: int = 0, **suite_kwargs) -> dict:
  """Load `split` and the oracle of `data_dir`, build the suite, write it; returns the
  manifest (with the source path, split and stage, and the written paths)."""
  rows = data.load_split(data_dir, split, stage)
  if max_rows:
    rows = rows[:max_rows]
  oracle = data.load_oracle(data_dir)
  suite_rows, manifest = make_suite(rows, oracle, return_manifest=True, **suite_kwargs)
  manifest["source"].update(data_dir=os.path.abspath(data_dir), split=split, stage=stage,
                            path=data.find_split(data_dir, split, stage), max_rows=max_rows)
  manifest["files"] = write_suite(out_dir, suite_rows, manifest)
  return manifest
