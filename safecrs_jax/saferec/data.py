"""Loaders for the released SafeRec layout (and JSON-lines files with the same fields).

Released layout (SafeCRS-datasets), relative to a root `data_dir`:

  downloaded_datasets/movie_trait_sensitivity.json
  downloaded_datasets/processed_datasets/saferec_sft_dataset/{train,validation,test}/
  downloaded_datasets/processed_datasets/saferec_grpo_dataset/train/
  data/phase1_mapping/title_to_imdb.pkl
  gt_catalog_complete.pkl

`data_dir` may also be `downloaded_datasets/` itself or a directory holding
the split directories directly. A split may instead be a JSON-lines file
(`<split>.jsonl`, same places, or `data_dir` itself a .jsonl file). A
project-native oracle table `oracle_table.jsonl` in `data_dir` replaces the
JSON + pickle pair.

Rows are validated and normalised:
  prompt                         non-empty list of {"role": str, "content": str}
  completion (required for sft)  str, or a message / message list -> the
                                 (last) assistant message's text
  groundtruth_with_release_year  list of [title: str, year: int or digit str] -> [str, int]
  seen_titles                    list of str
  constraints                    dict trait -> bool (None values, as Arrow
                                 writes absent struct keys, are dropped;
                                 trait names must be known)
Every extra field (e.g. `num_gt_removed`, `removed_groundtruth`, `genre`) is
kept unchanged. A missing or mistyped field, a line that is not JSON or not
UTF-8, is a `SafeRecDataError` naming the file, row index, line number (JSON
lines: 1-based, blank lines counted) and field; with strict=False such rows
are skipped, counted and logged with the first five errors (nothing is dropped
silently).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from safecrs_jax.infra import local_cache, storage
from safecrs_jax.saferec.metrics import Catalog
from safecrs_jax.saferec.oracle import SafetyOracle
from safecrs_jax.saferec.traits import TRAITS

log = logging.getLogger(__name__)

STAGES = ("sft", "grpo")
REQUIRED = {
    "sft": ("prompt", "completion", "groundtruth_with_release_year", "seen_titles", "constraints"),
    "grpo": ("prompt", "groundtruth_with_release_year", "seen_titles", "constraints"),
}
TRAIT_JSON = "movie_trait_sensitivity.json"
TITLE_PKL = os.path.join("data", "phase1_mapping", "title_to_imdb.pkl")
CATALOG_PKLS = ("gt_catalog_complete.pkl", "gt_catalog.pkl")
ORACLE_TABLE = "oracle_table.jsonl"


class SafeRecDataError(ValueError):
  """A row or file that does not follow the SafeRec schema."""


# ------------------------------------------------------------------ rows
def _fail(where: str, field: str, problem: str):
  raise SafeRecDataError(f"{where} field {field!r}: {problem}")


def _messages(value, where, field):
  if not isinstance(value, (list, tuple)) or not value:
    _fail(where, field, f"expected a non-empty list of {{role, content}} messages, got {_short(value)}")
  out = []
  for j, msg in enumerate(value):
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
        or not isinstance(msg.get("content"), str):
      _fail(where, f"{field}[{j}]", f"expected {{'role': str, 'content': str}}, got {_short(msg)}")
    out.append({"role": msg["role"], "content": msg["content"]})
  return out


def _completion(value, where):
  if isinstance(value, str):
    return value
  if isinstance(value, dict):
    value = [value]
  msgs = _messages(value, where, "completion")
  assistant = [m for m in msgs if m["role"] == "assistant"]
  return (assistant or msgs)[-1]["content"]


def _year(value, where, field):
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str) and value.strip().isdigit():
    return int(value.strip())
  _fail(where, field, f"expected a year (int or digits), got {_short(value)}")


def normalize_row(raw, where: str, stage: str = "sft", traits: Sequence[str] | None = TRAITS) -> dict:
  """Validate and normalise one row (module docstring); raise SafeRecDataError naming `where`."""
  if not isinstance(raw, dict):
    raise SafeRecDataError(f"{where}: expected a JSON object / dict row, got {_short(raw)}")
  for field in REQUIRED[stage]:
    if field not in raw or (raw[field] is None and field != "constraints"):
      _fail(where, field, "missing")
  row = dict(raw)
  row["prompt"] = _messages(raw["prompt"], where, "prompt")
  if raw.get("completion") is not None:
    row["completion"] = _completion(raw["completion"], where)
  gt = raw["groundtruth_with_release_year"]
  if not isinstance(gt, (list, tuple)):
    _fail(where, "groundtruth_with_release_year", f"expected a list of [title, year], got {_short(gt)}")
  norm_gt = []
  for j, item in enumerate(gt):
    field = f"groundtruth_with_release_year[{j}]"
    if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
      _fail(where, field, f"expected [title, year], got {_short(item)}")
    norm_gt.append([item[0], _year(item[1], where, field)])
  row["groundtruth_with_release_year"] = norm_gt
  seen = raw["seen_titles"]
  if not isinstance(seen, (list, tuple)) or not all(isinstance(t, str) for t in seen):
    _fail(where, "seen_titles", f"expected a list of strings, got {_short(seen)}")
  row["seen_titles"] = list(seen)
  cons = raw["constraints"]
  if cons is None:
    cons = {}
  if not isinstance(cons, dict):
    _fail(where, "constraints", f"expected a dict trait -> bool, got {_short(cons)}")
  norm_cons = {}
  for trait, on in cons.items():
    if on is None:
      continue
    if not isinstance(on, bool):
      _fail(where, f"constraints[{trait!r}]", f"expected a bool, got {_short(on)}")
    if traits is not None and trait not in traits:
      _fail(where, "constraints", f"unknown trait {trait!r}")
    norm_cons[trait] = on
  row["constraints"] = norm_cons
  return row


def _short(value, n: int = 80) -> str:
  s = repr(value)
  return s if len(s) <= n else s[:n] + "..."


# ------------------------------------------------------------------ paths
def _split_candidates(data_dir: str, split: str, stage: str) -> list[str]:
  name = f"saferec_{stage}_dataset"
  roots = [os.path.join(data_dir, "downloaded_datasets", "processed_datasets", name),
           os.path.join(data_dir, "processed_datasets", name),
           os.path.join(data_dir, name), data_dir]
  return [os.path.join(r, split) for r in roots] + [os.path.join(r, f"{split}.jsonl") for r in roots]


def find_split(data_dir: str, split: str, stage: str = "sft") -> str:
  """Path of a split: a `save_to_disk` directory or a .jsonl file (see module docstring)."""
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
  if storage.isfile(data_dir) and data_dir.endswith(".jsonl"):
    return data_dir
  tried = _split_candidates(data_dir, split, stage)
  for path in tried:
    if storage.isdir(path) and storage.exists(os.path.join(path, "dataset_info.json")):
      return path
    if storage.isfile(path):
      return path
  roots = sorted({os.path.dirname(p) for p in tried})
  found = sorted({n.removesuffix(".jsonl") for r in roots if storage.isdir(r)
                  for n in storage.listdir(r)
                  if (n.endswith(".jsonl") and n != ORACLE_TABLE)
                  or storage.exists(os.path.join(r, n, "dataset_info.json"))})
  raise FileNotFoundError(
      f"no {stage} split {split!r} under {data_dir} (splits there: "
      f"{', '.join(found) if found else 'none'}; looked for {split} and {split}.jsonl in "
      f"{', '.join(roots)})")


def read_raw_rows(path: str, line_numbers: bool = False):
  """Rows of a split as stored (datasets directory or JSON lines), before validation.

  line_numbers: also return each row's 1-based line in a JSON-lines file
  (None for a datasets directory). A line that is not UTF-8 / JSON becomes a
  bad-line marker that load_split reports.
  """
  if storage.isdir(path):
    import datasets  # heavy: only for released-format directories
    ds = datasets.load_from_disk(local_cache.local_copy(path))
    if isinstance(ds, datasets.DatasetDict):
      raise SafeRecDataError(f"{path}: holds several splits {list(ds)}; point at one split directory")
    rows = ds.to_list()
    return (rows, [None] * len(rows)) if line_numbers else rows
  rows, lines = [], []
  with storage.open(path, "rb") as f:
    for i, raw in enumerate(f):
      if not raw.strip():
        continue
      lines.append(i + 1)
      try:
        rows.append(json.loads(raw.decode("utf-8")))
      except UnicodeDecodeError as e:
        rows.append(_BadLine(i + 1, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                    f"{e.start + 1})", _replaced_field(raw)))
      except json.JSONDecodeError as e:
        rows.append(_BadLine(i + 1, f"not valid JSON ({e})"))
  return (rows, lines) if line_numbers else rows


def _replaced_field(raw: bytes):
  """The field holding an undecodable byte (decoded with U+FFFD), when the line parses."""
  try:
    obj = json.loads(raw.decode("utf-8", errors="replace"))
  except ValueError:
    return None
  def find(node, path):
    if isinstance(node, str):
      return path if "\ufffd" in node else None
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for k, v in items:
      hit = find(v, f"{path}[{k!r}]" if path else str(k))
      if hit:
        return hit
    return None
  return find(obj, "")


class _BadLine:
  def __init__(self, line: int, error: str, field=None):
    self.line, self.error, self.field = line, error, field


def load_split(data_dir: str, split: str, stage: str = "sft", strict: bool = True,
               return_report: bool = False, traits: Sequence[str] | None = TRAITS):
  """Validated, normalised rows of one split (module docstring).

  Args:
    data_dir: released root, `downloaded_datasets/`, a directory of splits,
      or a .jsonl file.
    split: "train" | "validation" | "test".
    stage: "sft" (completion required) or "grpo".
    strict: raise on the first bad row; else skip bad rows and count them.
    return_report: also return {"path", "rows_read", "rows_ok",
      "rows_skipped", "errors": [first 20 messages]}.
    traits: allowed constraint names (None: any).
  """
  path = find_split(data_dir, split, stage)
  raw_rows, lines = read_raw_rows(path, line_numbers=True)
  rows, errors = [], []
  for i, (raw, line) in enumerate(zip(raw_rows, lines)):
    where = f"{path} row {i}" + (f" (line {line})" if line else "")
    try:
      if isinstance(raw, _BadLine):
        field = f" field {raw.field!r}" if raw.field else ""
        raise SafeRecDataError(f"{where}{field}: {raw.error}")
      rows.append(normalize_row(raw, where, stage, traits))
    except SafeRecDataError as e:
      if strict:
        raise
      errors.append(str(e))
  report = {"path": path, "rows_read": len(raw_rows), "rows_ok": len(rows),
            "rows_skipped": len(errors), "errors": errors[:20]}
  if errors:
    log.warning("load_split: skipped %d of %d rows in %s; first errors:\n  %s",
                len(errors), len(raw_rows), path, "\n  ".join(errors[:5]))
  return (rows, report) if return_report else rows


# ------------------------------------------------------------------ oracle / catalog
def _first_existing(paths: Sequence[str], what: str) -> str:
  for p in paths:
    if storage.isfile(p):
      return local_cache.local_file(p)   # the oracle / catalog readers open local files
  raise FileNotFoundError(f"no {what} found; tried:\n  " + "\n  ".join(paths))


def _roots(data_dir: str) -> list[str]:
  """Where the root-level files (pickles) of the released layout may lie: `data_dir`, and
  its parent only when `data_dir` is the layout's own `downloaded_datasets/` (never an
  arbitrary parent directory: a stray pickle there is not this data set's)."""
  roots = [data_dir]
  resolved = storage.resolve(data_dir).rstrip("/")
  if os.path.basename(resolved) == "downloaded_datasets":
    roots.append(os.path.dirname(resolved))
  return roots


def load_oracle(data_dir: str, risk_threshold: float = 0.66, *, title_fallback: str = "first",
                duplicate_ids: str = "last") -> SafetyOracle:
  """The safety oracle of a released-layout root (or its `downloaded_datasets/`), or of
  an `oracle_table.jsonl` (project-native table) in `data_dir`. The options are
  `SafetyOracle`'s (defaults: the reference lookups)."""
  table = os.path.join(data_dir, ORACLE_TABLE)
  if storage.isfile(table):
    return SafetyOracle.from_table(local_cache.local_file(table), risk_threshold, title_fallback=title_fallback)
  trait_json = _first_existing(
      [os.path.join(data_dir, "downloaded_datasets", TRAIT_JSON), os.path.join(data_dir, TRAIT_JSON)],
      TRAIT_JSON)
  title_pkl = _first_existing(
      [os.path.join(d, TITLE_PKL) for d in _roots(data_dir)]
      + [os.path.join(data_dir, "title_to_imdb.pkl")], "title_to_imdb.pkl")
  return SafetyOracle.from_files(trait_json, title_pkl, risk_threshold,
                                 title_fallback=title_fallback, duplicate_ids=duplicate_ids)


def load_catalog(data_dir: str) -> Catalog:
  """The ground-truth catalog (`gt_catalog_complete.pkl`: list of (title, year))."""
  paths = [os.path.join(d, name) for d in _roots(data_dir) for name in CATALOG_PKLS]
  return Catalog.from_pickle(_first_existing(paths, "catalog pickle"))
