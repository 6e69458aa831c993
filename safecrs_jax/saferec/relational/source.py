"""What the suite needs from each source row: its own statement removed, its traits, items.

A SafeRec-format row states its sensitivity in a user message (SafeRec-mini:
one `injection.PHRASINGS` sentence before the request; real data: wherever
the injector put it). `strip_statements` finds that sentence for each active
trait, in any user message, by trying every known phrasing of the trait (the
injector's and this suite's, longest first) as a case-insensitive pattern
whose spaces match any whitespace, and cuts the first match out. When one
trait's sentence is not found, the row's statement is "not located" and only
the parts that keep the source prompt as it is can use the row.

The reference list of a row (what an unconstrained teacher recommends):
`teacher_completion` (curation keeps the teacher's text there), else
`completion`, else the ground truth.

The choice disclosure offers titles that are not the row's own: `ItemPool`
holds every (title, year) of every source row's reference and ground truth
that the oracle knows, with its unsafe flags; rows that share a `genre` field
(SafeRec-mini has one) draw from their genre's items first.
"""
from __future__ import annotations

import copy
import dataclasses
import re

import numpy as np

from safecrs_jax.saferec import injection
from safecrs_jax.saferec.parsing import parse_recommendations
from safecrs_jax.saferec.relational.phrasings import SETS, TRAIT_TEXT
from safecrs_jax.saferec.traits import active_traits

NOT_LOCATED = "constraint_sentence_not_located"
NO_HAZARD = "no_constraint_and_no_hazard_in_reference"
NO_PHRASINGS = "trait_without_relational_phrasings"
MULTI_TURN = "multi_turn_source"


@dataclasses.dataclass
class Source:
  """One source row, analysed.

  index: position in the source split. row: the row. traits: the user's
  sensitivities to state (the row's active constraints, or for a row without
  constraints the trait its reference list violates most). base: the prompt
  without the row's own statement (None when not located). problem: why
  parts that need `base` cannot use the row (None: all can). reference: the
  reference list (parsed). single_turn: base has one non-system message.
  """
  index: int
  row: dict
  traits: list
  base: list | None
  problem: str | None
  reference: list
  single_turn: bool


def reference_list(row: dict) -> list[tuple[str, int]]:
  """The row's reference list: teacher_completion, else completion, else the ground truth."""
  for field in ("teacher_completion", "completion"):
    if row.get(field):
      return parse_recommendations(row[field])
  return [(str(t), int(y)) for t, y in row.get("groundtruth_with_release_year") or []]


def _pattern(sentence: str) -> re.Pattern:
  return re.compile(r"\s+".join(re.escape(w) for w in sentence.split()), re.IGNORECASE)


def _candidates(trait: str) -> list[str]:
  own = [s for i in range(len(SETS)) for s in TRAIT_TEXT[trait]["explicit"][i]] \
      if trait in TRAIT_TEXT else []
  phr = getattr(injection, "PHRASINGS", {}) or {}
  return sorted(set(list(phr.get(trait, ())) + own), key=len, reverse=True)


def cut(text: str, start: int, end: int) -> str:
  """`text` without [start, end), the two sides joined by one space (or their newline)."""
  left, right = text[:start].rstrip(" \t"), text[end:].lstrip(" \t")
  if left and right and not left.endswith("\n") and not right.startswith("\n"):
    return left + " " + right
  return (left + right).strip()


def strip_statements(prompt: list[dict], traits) -> list[dict] | None:
  """A copy of `prompt` with one statement of each trait cut out; None if one is not found."""
  messages = copy.deepcopy(list(prompt))
  for trait in traits:
    found = False
    for sentence in _candidates(trait):
      pat = _pattern(sentence)
      for msg in messages:
        m = pat.search(msg["content"]) if msg["role"] == "user" else None
        if m is not None:
          msg["content"] = cut(msg["content"], m.start(), m.end())
          found = True
          break
      if found:
        break
    if not found:
      return None
  return messages


def phrased_traits(oracle) -> list[str]:
  """The oracle's traits that have relational phrasings, in oracle order."""
  return [t for t in oracle.traits if t in TRAIT_TEXT]


def analyse(rows, oracle) -> list[Source]:
  """`Source` for every row (module docstring)."""
  phrased = phrased_traits(oracle)
  out = []
  for i, row in enumerate(rows):
    ref = reference_list(row)
    traits = active_traits(row.get("constraints"))
    base, problem = None, None
    if not traits:
      traits = injection.most_violated_traits(ref, oracle, phrased)[:1] if ref else []
      base = copy.deepcopy(row["prompt"]) if traits else None
      problem = None if traits else NO_HAZARD
    elif any(t not in TRAIT_TEXT for t in traits):
      problem = NO_PHRASINGS
    else:
      base = strip_statements(row["prompt"], traits)
      problem = None if base is not None else NOT_LOCATED
    turns = [m for m in (base or row["prompt"]) if m["role"] != "system"]
    single = len(turns) == 1 and turns[0]["role"] == "user"
    out.append(Source(i, row, traits, base, problem, ref, single))
  return out


def extra_traits(src: Source, oracle, rng: np.random.Generator) -> list[str]:
  """Further traits for the multi part: those the reference violates (most first), then
  a seeded shuffle of the other phrased traits the oracle marks unsafe for some item."""
  phrased = [t for t in phrased_traits(oracle) if t not in src.traits]
  first = injection.most_violated_traits(src.reference, oracle, phrased) if src.reference else []
  live = oracle.unsafe[:-1].any(0)
  rest = [t for t in phrased if t not in first and live[oracle.trait_index[t]]]
  return first + [rest[j] for j in rng.permutation(len(rest))]


class ItemPool:
  """Known (title, year) items of all source rows with their unsafe flags [P, T]."""

  def __init__(self, sources: list[Source], oracle):
    index, groups = {}, {}
    for s in sources:
      gt = [(str(t), int(y)) for t, y in s.row.get("groundtruth_with_release_year") or []]
      for item in s.reference + gt:
        j = index.setdefault(item, len(index))
        groups.setdefault(s.row.get("genre"), set()).add(j)
    self.items = list(index)
    self.titles = np.array([t for t, _ in self.items], dtype=object)
    db = oracle.rows([self.items])[0] if self.items else np.zeros(0, np.int64)
    self.known = db != oracle.unknown_row
    self.unsafe = oracle.unsafe[db]                                    # [P, T]
    self.groups = {g: np.array(sorted(js), np.int64) for g, js in groups.items()}
    self.oracle = oracle

  def offer(self, src: Source, traits, rng: np.random.Generator):
    """Three items to offer (shuffled) and which of them carry a hazard of `traits`,
    or None when the pool lacks them. 1-2 carry one; the rest are safe for every trait
    (or at least for `traits`). The row's own reference, ground truth and seen titles
    are never offered."""
    own = {t for t, _ in src.reference} | set(src.row.get("seen_titles") or ()) | {
        str(t) for t, _ in src.row.get("groundtruth_with_release_year") or []}
    cols = [self.oracle.trait_index[t] for t in traits]
    for cand in (self.groups.get(src.row.get("genre")), np.arange(len(self.items))):
      if cand is None:
        continue
      cand = cand[self.known[cand] & ~np.isin(self.titles[cand], list(own))]
      if not len(cand):
        continue
      hazard = cand[self.unsafe[cand][:, cols].any(1)]
      clean = cand[~self.unsafe[cand].any(1)]
      if len(clean) < 2:
        clean = cand[~self.unsafe[cand][:, cols].any(1)]
      n_h = int(rng.integers(1, 3))
      if len(hazard) >= n_h and len(clean) >= 3 - n_h:
        picks = [(int(j), True) for j in rng.choice(hazard, n_h, replace=False)] + [
            (int(j), False) for j in rng.choice(clean, 3 - n_h, replace=False)]
        picks = [picks[p] for p in rng.permutation(3)]
        return [self.items[j] for j, _ in picks], [h for _, h in picks]
    return None
