"""Matching recommendations to ground truth, and the rank discounts.

Two title comparisons exist in SafeRec:
  * rewards (`exact=False`): titles equal after case-folding and whitespace
    collapse;
  * the paper's evaluation (`exact=True`): the exact title string.
Both need the year within +-`year_tolerance` (2) and let each ground-truth
entry be matched once: a recommendation takes the still-unmatched ground-truth
entry of that title with the nearest year (the same year first, then -1, +1,
-2, +2). Duplicated recommendations therefore hit at most as often as the
title appears in the ground truth.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

@functools.lru_cache(maxsize=1 << 16)
def fold_title(title: str) -> str:
  """Case-fold and collapse whitespace (the reward / catalog title comparison)."""
  return " ".join(str(title).split()).casefold()


@functools.lru_cache(maxsize=64)
def discounts(n: int) -> np.ndarray:
  """d_k = 1 / log2(k + 1) for ranks k = 1..n, as float64 [n] (d_1 = 1). Read-only."""
  d = 1.0 / np.log2(np.arange(n, dtype=np.float64) + 2.0)
  d.setflags(write=False)
  return d


def _year_offsets(tolerance: int) -> tuple[int, ...]:
  out = [0]
  for d in range(1, tolerance + 1):
    out += [-d, d]
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
               exact: bool = False, year_tolerance: int = 2) -> np.ndarray:
  """bool [k]: rank j (< k) of `items` hits an unmatched ground-truth entry."""
  hits = np.zeros(k, dtype=bool)
  if not groundtruth:
    return hits
  buckets = _gt_buckets(groundtruth, fold=not exact)
  offsets = _year_offsets(year_tolerance)
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


def hit_matrix(parsed_lists, groundtruths, k: int, *, exact: bool = False,
               year_tolerance: int = 2) -> np.ndarray:
  """bool [N, k]: `hit_vector` for each list against its ground truth."""
  if len(parsed_lists) != len(groundtruths):
    raise ValueError(f"{len(parsed_lists)} recommendation lists but {len(groundtruths)} ground truths")
  out = np.zeros((len(parsed_lists), k), dtype=bool)
  for n, (items, gt) in enumerate(zip(parsed_lists, groundtruths)):
    out[n] = hit_vector(items, gt, k, exact=exact, year_tolerance=year_tolerance)
  return out


def lengths(parsed_lists, k: int) -> np.ndarray:
  """int [N]: items present in the first k ranks of each list."""
  return np.fromiter((min(len(p), k) for p in parsed_lists), dtype=np.int64, count=len(parsed_lists))
