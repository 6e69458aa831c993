"""Matching recommendations to ground truth, and the rank discounts.

Two title comparisons exist in SafeRec:
  * rewards (`exact=False`): titles equal after case-folding and whitespace
    collapse;
  * the paper's evaluation (`exact=True`): the exact title string.
Both need the year within +-`year_tolerance` (2). Two assignments exist:
  * "one_to_one" (rewards, the reference reward matching): ranks are read in
    order and each takes a still-unmatched ground-truth entry of its title,
    trying the years y, y+1, y-1, y+2, y-2 (`year_order="later_first"`, the
    reference; "earlier_first" tries y, y-1, y+1, y-2, y+2). Each
    ground-truth entry is matched once, so duplicated recommendations hit at
    most as often as the title appears in the ground truth.
  * "ground_truth_major" (the paper's evaluation): each ground-truth entry
    marks the first recommendation (within the top k) that matches it; two
    entries may mark the same recommendation, which then counts once.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


@functools.lru_cache(maxsize=1 << 16)
def fold_title(title: str) -> str:
  """Case-fold and collapse whitespace (the reward title comparison)."""
  return " ".join(str(title).split()).casefold()


@functools.lru_cache(maxsize=64)
def discounts(n: int) -> np.ndarray:
  """d_k = 1 / log2(k + 1) for ranks k = 1..n, as float64 [n] (d_1 = 1). Read-only."""
  d = 1.0 / np.log2(np.arange(n, dtype=np.float64) + 2.0)
  d.setflags(write=False)
  return d


ASSIGNMENTS = ("one_to_one", "ground_truth_major")
YEAR_ORDERS = ("later_first", "earlier_first")


@functools.lru_cache(maxsize=16)
def year_offsets(tolerance: int, year_order: str = "later_first") -> tuple[int, ...]:
  """Year offsets in the order they are tried: (0, 1, -1, 2, -2) for later_first, tolerance 2."""
  if year_order not in YEAR_ORDERS:
    raise ValueError(f"year_order={year_order!r}: expected one of {YEAR_ORDERS}")
  sign = 1 if year_order == "later_first" else -1
  out = [0]
  for d in range(1, tolerance + 1):
    out += [sign * d, -sign * d]
  return tuple(out)


def _gt_buckets(groundtruth, fold: bool) -> dict[str, dict[int, int]]:
  buckets: dict[str, dict[int, int]] = {}
  for title, year in groundtruth:
    key = fold_title(title) if fold else title
    bucket = buckets.setdefault(key, {})
    year = int(year)
    bucket[year] = bucket.get(year, 0) + 1
  return buckets


def hit_vector(items: Sequence[tuple[str, int]], groundtruth, k: int, *,
               exact: bool = False, year_tolerance: int = 2, year_order: str = "later_first",
               assignment: str = "one_to_one") -> np.ndarray:
  """bool [k]: rank j (< k) of `items` is a hit under `assignment` (module docstring)."""
  if assignment not in ASSIGNMENTS:
    raise ValueError(f"assignment={assignment!r}: expected one of {ASSIGNMENTS}")
  hits = np.zeros(k, dtype=bool)
  if not groundtruth:
    return hits
  if assignment == "ground_truth_major":
    return _ground_truth_major(items, groundtruth, hits, exact, year_tolerance)
  buckets = _gt_buckets(groundtruth, fold=not exact)
  offsets = year_offsets(year_tolerance, year_order)
  for j, (title, year) in enumerate(items[:k]):
    bucket = buckets.get(title if exact else fold_title(title))
    if not bucket:
      continue
    for off in offsets:
      y = year + off
      if bucket.get(y, 0) > 0:
        bucket[y] -= 1
        hits[j] = True
        break
  return hits


def _ground_truth_major(items, groundtruth, hits, exact, year_tolerance) -> np.ndarray:
  """Each ground-truth entry marks the first of the top-k items with its title and a near year."""
  ranks: dict[str, list[tuple[int, int]]] = {}
  for j, (title, year) in enumerate(items[:len(hits)]):
    ranks.setdefault(title if exact else fold_title(title), []).append((j, int(year)))
  for title, year in groundtruth:
    year = int(year)
    for j, y in ranks.get(title if exact else fold_title(title), ()):
      if abs(y - year) <= year_tolerance:
        hits[j] = True
        break
  return hits


def hit_matrix(parsed_lists, groundtruths, k: int, *, exact: bool = False,
               year_tolerance: int = 2, year_order: str = "later_first",
               assignment: str = "one_to_one") -> np.ndarray:
  """bool [N, k]: `hit_vector` for each list against its ground truth."""
  if len(parsed_lists) != len(groundtruths):
    raise ValueError(f"{len(parsed_lists)} recommendation lists but {len(groundtruths)} ground truths")
  out = np.zeros((len(parsed_lists), k), dtype=bool)
  for n, (items, gt) in enumerate(zip(parsed_lists, groundtruths)):
    out[n] = hit_vector(items, gt, k, exact=exact, year_tolerance=year_tolerance,
                        year_order=year_order, assignment=assignment)
  return out


def lengths(parsed_lists, k: int) -> np.ndarray:
  """int [N]: items present in the first k ranks of each list."""
  return np.fromiter((min(len(p), k) for p in parsed_lists), dtype=np.int64, count=len(parsed_lists))
