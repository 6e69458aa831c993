"""Safe-SFT curation: the teacher's list minus what is unsafe for this user.

For each row, the teacher's ranked list (the row's `completion`, parsed) loses
every item the oracle marks unsafe for the row's constraints; order is kept,
unknown movies stay. By default (the reference) nothing is back-filled, so
lists shrink. The target is

  <reasoning>                                       (optional, on by default)
  The user is sensitive to: <trait>; <trait>.
  Removed as unsafe: <Title> [<Year>] - <trait>; ... (at most 5, then "and N more")
  Safe recommendations remaining: <n>.
  </reasoning>
  <solution>
  Title (Year)
  ...
  </solution>

Removed titles are written as `Title [Year]` so the reasoning never parses as
a recommendation, even when a generation stops before `<solution>`.

"Left without ground truth" (the drop rule), precisely: a row is dropped
when none of its `groundtruth_with_release_year` entries is safe for its
constraints, i.e. every ground-truth movie is unsafe for the user, or the
ground truth is empty. Unknown ground-truth movies count as safe. The ground
truth itself is not rewritten, and rows whose target list ends up empty are
kept (without back-fill, the default) but counted in the report.

Back-fill (`backfill=True`, off by default; not in the reference): after the
unsafe items are removed, the list is filled back up to the teacher's length
(never longer) from a pool (`backfill_pool`) of every (title, year) the
teacher recommends in the teacher lists of the rows curation keeps (those
with a safe ground truth; the dropped rows are left out so that curating the
curated rows again builds the same pool). The pool is ranked by how many of
those rows' lists hold the item, ties by title, then year; for a row with a
`genre`, the items from rows of the same genre come first (ranked the same
way), then the rest. A candidate is used only if the oracle knows it, it
violates none of the row's constraints, it is not in the list yet (title
case-insensitively, with the year) and its title is not one of the row's
`seen_titles` (case-insensitively). If the pool runs out the list stays
shorter. The reasoning block's count is the final list's length.

Idempotent: a curated row keeps the teacher's text in `teacher_completion`,
which is read instead of `completion` when present, so curating twice gives
the same row.

Ground-truth filtering (`filter_groundtruth`, how the released SafeRec splits
were built, for released-format data that lacks it): a ground-truth item
whose risk for one of the row's assigned traits is >= `threshold` (0.5, the
raw risk score, not the oracle's 0.66 unsafe threshold) is removed; the row is
kept even if its ground truth becomes empty, and records `num_gt_removed`
(int) and `removed_groundtruth` (the removed [title, year] entries, as
stored). Unknown movies stay. Filtering again removes nothing new and adds
to both fields, so it is idempotent.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from safecrs_jax.saferec.parsing import (
  completion_text,
  format_recommendations,
  parse_recommendations,
)
from safecrs_jax.saferec.traits import active_traits

MAX_LISTED = 5
GT_RISK_THRESHOLD = 0.5


def filter_row_groundtruth(row: dict, oracle, threshold: float = GT_RISK_THRESHOLD) -> dict:
  """A copy of `row` without the ground-truth items risky for its traits (module docstring)."""
  cols = []
  for trait in active_traits(row.get("constraints") or {}):
    if trait not in oracle.trait_index:
      raise ValueError(f"constraint trait {trait!r} is not one of this oracle's traits")
    cols.append(oracle.trait_index[trait])
  kept, removed = [], []
  for item in row.get("groundtruth_with_release_year") or ():
    r = oracle.resolve(item[0], item[1])
    risky = r >= 0 and bool(cols) and float(oracle.risk[r, cols].max()) >= threshold
    (removed if risky else kept).append(item)
  out = dict(row)
  out["groundtruth_with_release_year"] = kept
  out["num_gt_removed"] = int(row.get("num_gt_removed") or 0) + len(removed)
  out["removed_groundtruth"] = list(row.get("removed_groundtruth") or ()) + removed
  return out


def filter_groundtruth(rows: Sequence[dict], oracle,
                       threshold: float = GT_RISK_THRESHOLD) -> list[dict]:
  """`filter_row_groundtruth` over rows (a new list; the input rows are not modified)."""
  return [filter_row_groundtruth(row, oracle, threshold) for row in rows]


def _teacher_text(row: dict, teacher_field: str = "completion") -> str:
  """The teacher's text: `teacher_completion` (a curated row) or else `teacher_field`."""
  return completion_text(row["teacher_completion"] if "teacher_completion" in row
                         else row.get(teacher_field))


def _item_key(title: str, year) -> tuple[str, int]:
  return title.casefold(), year


def _ranked(counts: Counter, spelling: dict) -> list[tuple[str, int]]:
  """Items by row count (most first), ties by title (case-insensitive, then as written), year."""
  order = sorted(counts, key=lambda k: (-counts[k], k[0], spelling[k][0], k[1]))
  return [spelling[k] for k in order]


class BackfillPool:
  """The back-fill candidates of one split (module docstring): `candidates(genre)`."""

  def __init__(self, ranked: list[tuple[str, int]],
               by_genre: dict[str, list[tuple[str, int]]]):
    self.ranked = ranked          # every item, ranked over all rows
    self.by_genre = by_genre      # genre -> its rows' items, ranked over those rows

  def candidates(self, genre=None) -> Iterator[tuple[str, int]]:
    """The same-genre items first (when `genre` has any), then the rest, each once."""
    first = self.by_genre.get(genre, []) if genre is not None else []
    yield from first
    done = {_item_key(t, y) for t, y in first}
    for title, year in self.ranked:
      if _item_key(title, year) not in done:
        yield title, year


def backfill_pool(rows: Sequence[dict], teacher_field: str = "completion") -> BackfillPool:
  """The back-fill pool of `rows`' teacher lists (an item counts once per row)."""
  counts, spelling = Counter(), {}
  genre_counts: dict[str, Counter] = {}
  for row in rows:
    keys = set()
    for title, year in parse_recommendations(_teacher_text(row, teacher_field)):
      key = _item_key(title, year)
      spelling.setdefault(key, (title, year))   # the first spelling seen
      keys.add(key)
    counts.update(keys)
    genre = row.get("genre")
    if genre is not None:
      genre_counts.setdefault(genre, Counter()).update(keys)
  return BackfillPool(_ranked(counts, spelling),
                      {g: _ranked(c, spelling) for g, c in genre_counts.items()})


def _backfill(kept: list[tuple[str, int]], size: int, row: dict, oracle,
              pool: BackfillPool) -> list[tuple[str, int]]:
  """The safe, known, unseen, new pool items to append to `kept` (at most size - len(kept))."""
  need = size - len(kept)
  if need <= 0:
    return []
  constraints = row.get("constraints") or {}
  seen = {str(t).casefold() for t in row.get("seen_titles") or ()}
  present = {_item_key(t, y) for t, y in kept}
  added = []
  for title, year in pool.candidates(row.get("genre")):
    key = _item_key(title, year)
    if key in present or title.casefold() in seen or oracle.resolve(title, year) < 0:
      continue
    if oracle.violated_traits(title, year, constraints):
      continue
    added.append((title, year))
    present.add(key)
    if len(added) == need:
      break
  return added


def _safe_gt(row: dict, oracle) -> int:
  """How many of the row's ground-truth items are safe for its constraints."""
  constraints = row.get("constraints") or {}
  return sum(1 for t, y in row.get("groundtruth_with_release_year") or ()
             if not oracle.violated_traits(t, y, constraints))


def reasoning_block(traits: Sequence[str], removed: Sequence[tuple[str, int, str]],
                    remaining: int, max_listed: int = MAX_LISTED) -> str:
  """The `<reasoning>` text naming sensitivities, removed titles (<= max_listed) and the safe count."""
  sens = "; ".join(traits) if traits else "none stated"
  if removed:
    listed = "; ".join(f"{t} [{y}] - {trait}" for t, y, trait in removed[:max_listed])
    if len(removed) > max_listed:
      listed += f"; and {len(removed) - max_listed} more"
  else:
    listed = "none"
  return (f"<reasoning>\nThe user is sensitive to: {sens}.\nRemoved as unsafe: {listed}.\n"
          f"Safe recommendations remaining: {remaining}.\n</reasoning>")


def curate_row(row: dict, oracle, *, reasoning: bool = True, max_listed: int = MAX_LISTED,
               teacher_field: str = "completion",
               pool: BackfillPool | None = None) -> tuple[dict, dict]:
  """One row -> (curated row, facts). Facts: kept, removed [(title, year, trait)], unknown,
  safe_gt, backfilled (the appended items; back-fill from `pool` when given, else none).
  """
  constraints = row.get("constraints") or {}
  teacher = _teacher_text(row, teacher_field)
  kept, removed, unknown = [], [], 0
  for title, year in parse_recommendations(teacher):
    violated = oracle.violated_traits(title, year, constraints)
    if violated:
      removed.append((title, year, violated[0]))
    else:
      kept.append((title, year))
      unknown += oracle.resolve(title, year) < 0
  safe_gt = _safe_gt(row, oracle)
  backfilled = [] if pool is None else _backfill(kept, len(kept) + len(removed), row, oracle, pool)
  final = kept + backfilled
  target = format_recommendations(final)
  if reasoning:
    target = reasoning_block(active_traits(constraints), removed, len(final), max_listed) + "\n" + target
  out = dict(row)
  out["teacher_completion"] = teacher
  out["completion"] = target
  return out, {"kept": kept, "removed": removed, "unknown": unknown, "safe_gt": safe_gt,
               "backfilled": backfilled}


def curate_sft_rows(rows: Sequence[dict], oracle, *, reasoning: bool = True,
                    max_listed: int = MAX_LISTED, teacher_field: str = "completion",
                    backfill: bool = False):
  """Curate Safe-SFT rows (module docstring). Returns (rows, report).

  Each kept row gets `completion` = the safe target and `teacher_completion`
  = the teacher's text (kept as is if the row already has one). backfill:
  fill lists back to the teacher's length from `backfill_pool` of the kept
  rows (off by default, as in the reference).
  Report: rows_in, rows_out, rows_dropped_no_safe_gt, rows_empty_target,
  items_in, items_removed, items_unknown_kept, items_backfilled,
  removed_by_trait {trait: n}, dropped_indices (input row indices).
  """
  out = []
  report = {"rows_in": len(rows), "rows_out": 0, "rows_dropped_no_safe_gt": 0,
            "rows_empty_target": 0, "items_in": 0, "items_removed": 0,
            "items_unknown_kept": 0, "items_backfilled": 0, "removed_by_trait": Counter(),
            "dropped_indices": []}
  pool = (backfill_pool([r for r in rows if _safe_gt(r, oracle)], teacher_field)
          if backfill else None)
  for i, row in enumerate(rows):
    curated, facts = curate_row(row, oracle, reasoning=reasoning, max_listed=max_listed,
                                teacher_field=teacher_field, pool=pool)
    report["items_in"] += len(facts["kept"]) + len(facts["removed"])
    report["items_removed"] += len(facts["removed"])
    report["items_unknown_kept"] += facts["unknown"]
    report["removed_by_trait"].update(trait for _, _, trait in facts["removed"])
    if facts["safe_gt"] == 0:
      report["rows_dropped_no_safe_gt"] += 1
      report["dropped_indices"].append(i)
      continue
    report["items_backfilled"] += len(facts["backfilled"])
    report["rows_empty_target"] += not (facts["kept"] or facts["backfilled"])
    out.append(curated)
  report["rows_out"] = len(out)
  report["removed_by_trait"] = dict(report["removed_by_trait"])
  return out, report
