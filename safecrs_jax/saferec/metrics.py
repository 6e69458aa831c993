"""Offline evaluation metrics for SafeRec (the paper's protocol by default).

Per row n, two lists are read from the parsed recommendations:
  * the ranked list (Recall, NDCG): items whose title is exactly one of the
    row's `seen_titles` dropped first (`drop_seen=True`, the paper), then
    its top K;
  * the safety list (SVR, S-DCG, unknown rate): the parsed list with seen
    titles kept, top K (the paper; `safety_drop_seen=True` scores the
    ranked list instead).
With hit_k / v_k the hit / violation flag of rank k in its list,
d_k = 1 / log2(k + 1), L = items in the top K of that list, G = ground-truth size:

  recall@K       sum_k hit_k / G                          (0 when G = 0)
  ndcg@K         sum_k d_k hit_k / IDCG; IDCG = sum of the first m discounts,
                 m = min(G, L, K) in the paper protocol, min(G, K) with
                 ideal="textbook"; 0 for an empty list
  svr@K          sum_k v_k / L (0 for an empty list or a user without constraints)
  sdcg@K         sum_k d_k v_k
  svr@K/<trait>  svr@K counting only violations of that trait, averaged over
                 the rows whose constraints include it
  unknown_rate@K share of the safety list's top-K items the oracle does not
                 know (micro average; unknown items count as safe above)
  catalog_match  catalog_protocol="per_row" (paper): per row, the share of the
                 first `catalog_top` (20) parsed items (seen kept) found in the
                 catalog (title lower-cased, year +-2), 0 for a row without
                 items, averaged over rows; "pooled": the
                 share of all ranked-list items in the top max(ks) found.
Hits follow the paper: exact, case-sensitive title and year +-2, assigned
ground-truth-major (`hit_assignment="ground_truth_major"`: each ground-truth
entry marks the first recommendation it matches; two entries may mark the
same one, which counts once). `hit_assignment="one_to_one"` lets each
recommendation consume one entry instead; title_match="casefold" compares
titles as the rewards do. K defaults to 5, 10, 15, 20.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from safecrs_jax.saferec.matching import ASSIGNMENTS, discounts, fold_title, hit_matrix
from safecrs_jax.saferec.parsing import parse_all
from safecrs_jax.saferec.safe_pickle import load as load_pickle

DEFAULT_KS = (5, 10, 15, 20)
CATALOG_PROTOCOLS = ("per_row", "pooled")
TITLE_FOLDS = ("lower", "casefold")


class Catalog:
  """Known (title, year) pairs; `contains` matches the folded title and year +-2.

  title_fold: "lower" (reference: `str.lower`) or "casefold" (case-fold and
  whitespace collapse, the reward comparison).
  """

  def __init__(self, items: Iterable[tuple[str, int]], year_tolerance: int = 2,
               title_fold: str = "lower"):
    if title_fold not in TITLE_FOLDS:
      raise ValueError(f"title_fold={title_fold!r}: expected one of {TITLE_FOLDS}")
    self.items = [(str(t), int(y)) for t, y in items]
    self.year_tolerance = year_tolerance
    self._fold = str.lower if title_fold == "lower" else fold_title
    self._years: dict[str, set[int]] = {}
    for t, y in self.items:
      self._years.setdefault(self._fold(t), set()).add(y)

  @classmethod
  def from_pickle(cls, path: str, **options) -> Catalog:
    items = load_pickle(path)     # no code runs from a data file
    if not isinstance(items, (list, tuple, set)):
      raise ValueError(f"{path}: expected a list of (title, year), got {type(items).__name__}")
    out = []
    for n, item in enumerate(items):
      if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f"{path} item {n}: expected (title, year), got {item!r}")
      try:
        out.append((item[0], int(str(item[1]).strip())))
      except ValueError:
        raise ValueError(f"{path} item {n}: year {item[1]!r} is not an integer") from None
    return cls(out, **options)

  def contains(self, title: str, year: int) -> bool:
    years = self._years.get(self._fold(str(title)))
    if not years:
      return False
    return any(abs(y - int(year)) <= self.year_tolerance for y in years)

  def flags(self, lists, width: int) -> np.ndarray:
    """bool [N, width]: item j of list n is in the catalog (False past the list's end)."""
    out = np.zeros((len(lists), width), bool)
    for n, items in enumerate(lists):
      for j, (title, year) in enumerate(items[:width]):
        out[n, j] = self.contains(title, year)
    return out

  def __len__(self):
    return len(self.items)

  def __contains__(self, item):
    return self.contains(*item)


def _check(ks, title_match, ideal, hit_assignment, catalog_protocol, n_comp, n_rows):
  if title_match not in ("exact", "casefold"):
    raise ValueError(f"title_match={title_match!r}: expected 'exact' or 'casefold'")
  if ideal not in ("paper", "textbook"):
    raise ValueError(f"ideal={ideal!r}: expected 'paper' or 'textbook'")
  if hit_assignment not in ASSIGNMENTS:
    raise ValueError(f"hit_assignment={hit_assignment!r}: expected one of {ASSIGNMENTS}")
  if catalog_protocol not in CATALOG_PROTOCOLS:
    raise ValueError(f"catalog_protocol={catalog_protocol!r}: expected one of {CATALOG_PROTOCOLS}")
  if n_comp != n_rows:
    raise ValueError(f"{n_comp} completions but {n_rows} rows")
  return tuple(sorted(set(int(k) for k in ks)))


def evaluate_recommendations(completions, rows: Sequence[dict], oracle, ks=DEFAULT_KS,
                             catalog=None, *, drop_seen: bool = True,
                             safety_drop_seen: bool = False, title_match: str = "exact",
                             hit_assignment: str = "ground_truth_major", ideal: str = "paper",
                             catalog_protocol: str = "per_row", catalog_top: int = 20,
                             per_row: bool = False) -> dict:
  """Metrics over N completions and their rows (see module docstring; defaults = paper).

  Args:
    completions: N texts / message lists / parsed lists.
    rows: N rows with groundtruth_with_release_year, seen_titles, constraints.
    oracle: SafetyOracle (None: safety metrics are 0 and nothing is unknown).
    catalog: Catalog or list of (title, year); adds "catalog_match".
    drop_seen: drop items whose title is exactly a seen title before Recall / NDCG.
    safety_drop_seen: also drop them before SVR / S-DCG / unknown rate (paper: False).
    title_match: "exact" (paper) or "casefold" (reward matching).
    hit_assignment: "ground_truth_major" (paper) or "one_to_one".
    ideal: "paper" (IDCG over min(G, L, K)) or "textbook" (min(G, K)).
    catalog_protocol: "per_row" (paper, over the first `catalog_top` parsed
      items) or "pooled".
    per_row: also return "per_row": metric@K arrays [N]; [N, max(ks)] flags
      aligned with "items" (the safety list): hits (the item's hit in the
      ranked list; False for dropped seen items), violations, unknown,
      catalog, seen; "length" [N]; and "ranked_items" with "ranked_hits".
  Returns:
    dict of floats keyed "recall@K", "ndcg@K", "svr@K", "sdcg@K",
    "unknown_rate@K", "svr@K/<trait>", "catalog_match", plus counts
    "num_rows", "parse_failures", "rows_without_gt", "rows_with_constraints",
    "mean_list_length" (safety list) (and "per_row" on request).
  """
  ks = _check(ks, title_match, ideal, hit_assignment, catalog_protocol, len(completions), len(rows))
  kmax, n_rows = ks[-1], len(rows)
  parsed = parse_all(completions)
  ranked_full = [_without_seen(p, row) for p, row in zip(parsed, rows)] if drop_seen else parsed
  ranked = [p[:kmax] for p in ranked_full]
  items = ranked if safety_drop_seen else [p[:kmax] for p in parsed]

  gts = [row.get("groundtruth_with_release_year") or [] for row in rows]
  num_gt = np.array([len(g) for g in gts], dtype=np.float64)
  hits = hit_matrix(ranked, gts, kmax, exact=title_match == "exact", assignment=hit_assignment)
  ranked_len = np.array([len(x) for x in ranked], dtype=np.int64)
  length = np.array([len(x) for x in items], dtype=np.int64)
  constraints = [row.get("constraints") or {} for row in rows]
  trait_v, masks, unknown, traits = _safety_flags(items, length, constraints, oracle, kmax)
  viol = trait_v.any(-1)

  out, rows_out = _at_k(ks, hits, num_gt, ranked_len, viol, trait_v, masks, unknown, length,
                        traits, ideal)
  if catalog is not None:
    _catalog_match(Catalog(catalog) if not isinstance(catalog, Catalog) else catalog,
                   parsed, ranked, items, kmax, catalog_protocol, catalog_top, out, rows_out)

  out["num_rows"] = n_rows
  out["parse_failures"] = int(sum(1 for p in parsed if not p))
  out["rows_without_gt"] = int((num_gt == 0).sum())
  out["rows_with_constraints"] = int(masks.any(1).sum())
  out["mean_list_length"] = float(length.mean()) if n_rows else 0.0
  if per_row:
    seen, item_hits = _align_hits(parsed, rows, hits, kmax, drop_seen and not safety_drop_seen)
    rows_out.update(hits=item_hits, seen=seen, violations=viol, unknown=unknown, length=length,
                    num_parsed=np.array([len(p) for p in parsed], dtype=np.int64), items=items,
                    ranked_items=ranked, ranked_hits=hits)
    out["per_row"] = rows_out
  return out


def _catalog_match(catalog, parsed, ranked, items, kmax, protocol, top, out, rows_out):
  """Adds "catalog_match" to `out` (and per-row flags to `rows_out`) by `protocol`."""
  n_rows = len(parsed)
  if protocol == "per_row":
    n_items = np.array([min(len(p), top) for p in parsed], dtype=np.float64)
    found = catalog.flags(parsed, top).sum(1)
    share = np.divide(found, n_items, out=np.zeros(n_rows), where=n_items > 0)
    out["catalog_match"] = float(share.mean()) if n_rows else 0.0
    rows_out["catalog_match"] = share
  else:
    total = sum(len(x) for x in ranked)
    out["catalog_match"] = float(catalog.flags(ranked, kmax).sum() / total) if total else 0.0
  rows_out["catalog"] = catalog.flags(items, kmax)


def _without_seen(items, row):
  seen = set(row.get("seen_titles") or ())
  return [it for it in items if it[0] not in seen] if seen else items


def _safety_flags(items, length, constraints, oracle, kmax):
  """(trait violations [N, K, T], masks [N, T], unknown [N, K], trait names) of the safety lists."""
  n_rows = len(items)
  if oracle is None:
    return (np.zeros((n_rows, kmax, 0), bool), np.zeros((n_rows, 0), bool),
            np.zeros((n_rows, kmax), bool), ())
  present = np.arange(kmax)[None, :] < length[:, None]
  db_rows = oracle.rows(items, kmax)
  masks = oracle.masks(constraints)
  trait_v = oracle.trait_violations(db_rows, masks)           # [N, K, T]
  unknown = (db_rows == oracle.unknown_row) & present
  return trait_v, masks, unknown, oracle.traits


def _at_k(ks, hits, num_gt, ranked_len, viol, trait_v, masks, unknown, length, traits, ideal):
  """The metric@K floats and their per-row arrays (module docstring)."""
  n_rows = len(num_gt)
  d = discounts(ks[-1])
  cum_d = np.concatenate([[0.0], np.cumsum(d)])
  out: dict = {}
  rows_out: dict = {}
  for k in ks:
    n_rank, n_safe = np.minimum(ranked_len, k), np.minimum(length, k)
    h, v = hits[:, :k], viol[:, :k]
    recall = np.divide(h.sum(1), num_gt, out=np.zeros(n_rows), where=num_gt > 0)
    dcg = (h * d[:k]).sum(1)
    m = np.minimum(num_gt, k) if ideal == "textbook" else np.minimum(num_gt, n_rank)
    idcg = cum_d[m.astype(np.int64)]
    ndcg = np.divide(dcg, idcg, out=np.zeros(n_rows), where=(idcg > 0) & (n_rank > 0))
    svr = np.divide(v.sum(1), n_safe, out=np.zeros(n_rows), where=n_safe > 0)
    sdcg = (v * d[:k]).sum(1)
    for name, arr in (("recall", recall), ("ndcg", ndcg), ("svr", svr), ("sdcg", sdcg)):
      out[f"{name}@{k}"] = float(arr.mean()) if n_rows else 0.0
      rows_out[f"{name}@{k}"] = arr
    total = n_safe.sum()
    out[f"unknown_rate@{k}"] = float(unknown[:, :k].sum() / total) if total else 0.0
    for t, trait in enumerate(traits):
      users = masks[:, t]
      if users.any():
        tv = np.divide(trait_v[:, :k, t].sum(1), n_safe, out=np.zeros(n_rows), where=n_safe > 0)
        out[f"svr@{k}/{trait}"] = float(tv[users].mean())
  return out, rows_out


def _align_hits(parsed, rows, hits, kmax, dropped):
  """(seen [N, K], hits [N, K]) aligned with the parsed top K: the hit an item earned at its
  rank in the ranked list; a seen item that was dropped from it is flagged and never a hit."""
  seen_flags = np.zeros((len(parsed), kmax), bool)
  if not dropped:
    return seen_flags, hits
  out = np.zeros_like(hits)
  for n, (items, row) in enumerate(zip(parsed, rows)):
    seen = set(row.get("seen_titles") or ())
    r = 0
    for j, (title, _) in enumerate(items[:kmax]):
      if title in seen:
        seen_flags[n, j] = True
        continue
      out[n, j] = hits[n, r]
      r += 1
  return seen_flags, out
