"""The project-native oracle table: reading and writing (SafetyOracle.from_table / to_table).

JSON lines, UTF-8:
  line 1, header: {"format": "safecrs_jax.oracle_table", "version": 1,
                   "traits": ["Trait A", "Trait B", ...]}
  then one record per item:
    {"title": "Heat", "year": 1995, "risk": {"Trait A": 0.8, ...}}
  - "risk": a dict trait -> score in [0, 1] (missing traits are 0), or a list
    of T scores in header order. Unknown trait names are an error.
  - "year": an integer or null (null: found only by title).
  - optional "id" (any string, kept and written back) and "key" (the lookup
    key to use verbatim instead of normalize_title(title)).
  The traits can be any list (e.g. ESRB descriptors for games): constraints
  then name those traits.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

TABLE_FORMAT = "safecrs_jax.oracle_table"


def read_table(path: str):
  """A table's records -> (entries, risk [M, T] float32, traits, ids), M records in file order.

  entries[r] = (title, key, year) of record r (key None unless the record gives one);
  ids[r] its "id" or None. A malformed line is a ValueError naming the line and field.
  """
  with open(path, encoding="utf-8") as f:
    lines = [ln for ln in f.read().split("\n") if ln.strip()]
  if not lines:
    raise ValueError(f"{path}: empty oracle table (expected a header line)")
  try:
    header = json.loads(lines[0])
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} line 1: header is not JSON ({e})") from None
  traits = header.get("traits") if isinstance(header, dict) else None
  if not (isinstance(traits, list) and traits and all(isinstance(t, str) for t in traits)):
    raise ValueError(f"{path} line 1: header needs 'traits': a non-empty list of names")
  col = {t: i for i, t in enumerate(traits)}
  risk = np.zeros((len(lines) - 1, len(traits)), np.float32)
  entries, ids = [], []
  for r, line in enumerate(lines[1:]):
    where = f"{path} line {r + 2}"
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("title"), str):
      raise ValueError(f"{where} field title: expected a string")
    year = rec.get("year")
    if year is not None and (isinstance(year, bool) or not isinstance(year, int)):
      raise ValueError(f"{where} field year: expected an integer or null, got {year!r}")
    scores = rec.get("risk")
    if isinstance(scores, list):
      if len(scores) != len(traits):
        raise ValueError(f"{where} field risk: {len(scores)} scores for {len(traits)} traits")
      scores = dict(zip(traits, scores))
    if not isinstance(scores, dict):
      raise ValueError(f"{where} field risk: expected a dict or a list of scores")
    for trait, v in scores.items():
      if trait not in col:
        raise ValueError(f"{where} field risk: unknown trait {trait!r}")
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where} field risk[{trait!r}]: expected a number, got {v!r}")
      risk[r, col[trait]] = v
    key = rec.get("key")
    if key is not None and not isinstance(key, str):
      raise ValueError(f"{where} field key: expected a string")
    entries.append((rec["title"], key, year))
    ids.append(rec.get("id"))
  return entries, risk, traits, ids


def write_table(path: str, traits: Sequence[str], keys: Iterable[tuple[str, int | None, int]],
                risk: np.ndarray, ids: Sequence[str | None]) -> None:
  """Write one record per (lookup key, year, row in `risk`) of `keys`, in that order; rows < 0
  (titles without a risk record) are left out. The key is written as both title and key."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps({"format": TABLE_FORMAT, "version": 1, "traits": list(traits)}) + "\n")
    for title, year, row in keys:
      if row < 0:
        continue
      rec = {"title": title, "year": year, "key": title,
             "risk": {t: round(float(v), 6) for t, v in zip(traits, risk[row]) if v}}
      if ids[row] is not None:
        rec["id"] = ids[row]
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")
