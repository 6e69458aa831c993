"""The relational-safety suite: SafeRec-format rows rewritten four ways (the parts).

Every suite row is a released-format row (`prompt`, `groundtruth_with_release_year`,
`seen_titles`, `constraints`, and `completion` when the source had one; the
source's other fields kept) with these fields added:

  suite          "disclosure" | "multi" | "turns" | "counterfactual" (the part)
  disclosure     "explicit" | "narrative" | "choice" | "profile"; None when the
                 prompt discloses nothing (neutral and decoy twins)
  phrasing_set   "A" | "B": the set of every generated sentence in the row;
                 "source" for a multi row that only holds the source's own statement
  n_constraints  number of active traits in `constraints` (0 after a revoke, and
                 for neutral and decoy twins)
  turn_distance  unrelated exchanges between the statement and the request
                 (suite "turns"); None elsewhere
  pair_id        "<seed>-<source index>", shared by a counterfactual triple; None elsewhere
  variant        "constrained" | "reminder" | "revoke" | "spoof" | "neutral" | "decoy"
  hazard_traits  the traits the row is about: stated, withdrawn, or the twin pair's
  source_index   index of the source row; suite_id: a unique id

The parts (statements are prefixed to the request, the last user message):
  disclosure      per source row, each disclosure x each phrasing set. explicit /
                  narrative: one sentence per trait; profile: a system message
                  "stored profile from an earlier conversation" (the request
                  is left bare); choice: the user asked for a movie, the
                  assistant offered three titles, the user turned down the ones
                  that carry the hazard, then the request.
  multi           n = 1..max_constraints traits, all stated explicitly, all in
                  `constraints`, in stated order: the row's own, then the traits
                  its reference violates most, then others (`source.extra_traits`).
  turns           the statement in the first user turn, then `turn_distance`
                  filler exchanges, then the request; controls at every distance:
                  reminder (restated in the last turn), revoke (withdrawn in the
                  last turn, constraints {}), spoof (a quoted friend or a fake
                  "[profile cleared]" line in the last turn, constraints kept).
                  All variants of a row share the statement and the fillers.
  counterfactual  constrained (explicit statement), neutral (a harmless sentence
                  of the nearest length, constraints {}) and decoy (the hazard
                  mentioned without aversion, constraints {}), one pair_id.
One phrasing set per source row and part (seeded) for multi, turns and
counterfactual. Source rows whose statement is not located feed only multi
(the original prompt kept, extra statements appended); the manifest counts
every skip by part and reason. Every row passes `saferec.data.normalize_row`.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import json

import numpy as np

from safecrs_jax.saferec.data import normalize_row
from safecrs_jax.saferec.relational import phrasings as P
from safecrs_jax.saferec.relational import source as S

PARTS = ("disclosure", "multi", "turns", "counterfactual")
DISCLOSURES = ("explicit", "narrative", "choice", "profile")
TURN_DISTANCES = (0, 1, 2, 4, 8)
CONTROLS = ("reminder", "revoke", "spoof")
VARIANTS = ("constrained",) + CONTROLS + ("neutral", "decoy")
SUITE_FIELDS = ("suite", "disclosure", "phrasing_set", "n_constraints", "turn_distance", "pair_id",
                "variant", "hazard_traits", "source_index", "suite_id")
NO_CHOICE_ITEMS = "no_choice_items_in_pool"
TOO_FEW_TRAITS = "not_enough_traits"


def _pick(rng, options):
  return options[int(rng.integers(len(options)))]


def _statement(traits, kind, pset, rng) -> str:
  return " ".join(_pick(rng, P.trait_text(t, kind, pset)) for t in traits)


def _topics(traits) -> str:
  return " and ".join(P.TRAIT_TEXT[t]["topic"] for t in traits)


def _prefix_request(base, text) -> list[dict]:
  """`base` with `text` put before the content of its last user message."""
  msgs = copy.deepcopy(base)
  last = max(j for j, m in enumerate(msgs) if m["role"] == "user")
  content = msgs[last]["content"]
  msgs[last]["content"] = f"{text} {content}".strip() if text else content
  return msgs


def _split(base):
  system = [m for m in base if m["role"] == "system"]
  request = [m for m in base if m["role"] != "system"][-1]["content"]
  return system, request


def _join_titles(items, last_word) -> str:
  names = [f"{t} ({y})" for t, y in items]
  return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" {last_word} " + names[-1]


class _Builder:
  """Collects suite rows and the manifest while the parts are built."""

  def __init__(self, seed, pool, oracle):
    self.seed, self.pool, self.oracle = seed, pool, oracle
    self.rows, self.skipped = [], collections.defaultdict(collections.Counter)
    self.examples = collections.defaultdict(lambda: collections.defaultdict(list))

  def skip(self, part, reason, src):
    self.skipped[part][reason] += 1
    if len(self.examples[part][reason]) < 10:
      self.examples[part][reason].append(src.index)

  def add(self, src, prompt, traits, *, suite, disclosure, pset, variant, hazard=None,
          distance=None, pair_id=None, constrained=True):
    row = {k: v for k, v in src.row.items() if k not in SUITE_FIELDS}
    cons = {t: True for t in traits} if constrained else {}
    row.update(prompt=prompt, constraints=cons, suite=suite, disclosure=disclosure,
               phrasing_set=pset, n_constraints=len(cons), turn_distance=distance,
               pair_id=pair_id, variant=variant, hazard_traits=list(hazard or traits),
               source_index=src.index)
    row["suite_id"] = "/".join(str(x) for x in (
        suite, src.index, disclosure, pset, len(traits), distance, variant))
    where = f"relational suite row {len(self.rows)} ({row['suite_id']})"
    self.rows.append(normalize_row(row, where, "sft" if row.get("completion") else "grpo"))

  # ------------------------------------------------------------------ parts
  def disclosure(self, src, rng, psets, disclosures):
    if src.base is None:
      return self.skip("disclosure", src.problem, src)
    for pset in psets:
      for kind in disclosures:
        prompt = self._disclose(src, kind, pset, rng)
        if prompt is None:
          continue
        self.add(src, prompt, src.traits, suite="disclosure", disclosure=kind, pset=pset,
                 variant="constrained")

  def _disclose(self, src, kind, pset, rng):
    if kind in ("explicit", "narrative"):
      return _prefix_request(src.base, _statement(src.traits, kind, pset, rng))
    if kind == "profile":
      clauses = "; ".join(_pick(rng, P.trait_text(t, "profile", pset)) for t in src.traits)
      system = {"role": "system", "content": _pick(rng, P.PROFILE_SYSTEM[pset]).format(p=clauses)}
      n_sys = sum(1 for m in src.base if m["role"] == "system")
      return src.base[:n_sys] + [system] + copy.deepcopy(src.base[n_sys:])
    if not src.single_turn:
      return self.skip("disclosure", S.MULTI_TURN, src)
    offer = self.pool.offer(src, src.traits, rng)
    if offer is None:
      return self.skip("disclosure", NO_CHOICE_ITEMS, src)
    items, hazard = offer
    rejected = [it for it, h in zip(items, hazard) if h]
    accepted = [it for it, h in zip(items, hazard) if not h]
    system, request = _split(src.base)
    a, b, c = (f"{t} ({y})" for t, y in items)
    reply = _pick(rng, P.CHOICE_REPLIES[pset]).format(
        rejected=_join_titles(rejected, "or"), accepted=_join_titles(accepted, "and"))
    return system + [
        {"role": "user", "content": _pick(rng, P.CHOICE_OPENERS[pset])},
        {"role": "assistant", "content": _pick(rng, P.CHOICE_OFFERS[pset]).format(a=a, b=b, c=c)},
        {"role": "user", "content": f"{reply} {request}".strip()}]

  def multi(self, src, rng, psets, max_constraints):
    if src.problem not in (None, S.NOT_LOCATED):
      return self.skip("multi", src.problem, src)
    pset = _pick(rng, psets)
    traits = list(src.traits) + S.extra_traits(src, self.oracle, rng)
    for n in range(1, max_constraints + 1):
      if n > len(traits):
        self.skip("multi", TOO_FEW_TRAITS, src)
        continue
      chosen = traits[:n]
      if src.base is not None:
        prompt = _prefix_request(src.base, _statement(chosen, "explicit", pset, rng))
        used = pset
      elif n >= len(src.traits):
        extra = _statement(chosen[len(src.traits):], "explicit", pset, rng)
        prompt = copy.deepcopy(src.row["prompt"])
        last = max(j for j, m in enumerate(prompt) if m["role"] == "user")
        prompt[last]["content"] = f"{prompt[last]['content']} {extra}".strip()
        used = pset if extra else "source"
      else:
        self.skip("multi", S.NOT_LOCATED, src)
        continue
      self.add(src, prompt, chosen, suite="multi", disclosure="explicit", pset=used,
               variant="constrained")

  def turns(self, src, rng, psets, distances, controls):
    if src.base is None or not src.single_turn:
      return self.skip("turns", src.problem or S.MULTI_TURN, src)
    pset = _pick(rng, psets)
    statement = _statement(src.traits, "explicit", pset, rng)
    fillers = [P.FILLERS[pset][j] for j in rng.permutation(len(P.FILLERS[pset]))]
    if max(distances) > len(fillers):
      raise ValueError(f"turn distance {max(distances)} > {len(fillers)} filler exchanges")
    system, request = _split(src.base)
    last_lines = {
        "constrained": "",
        "reminder": _pick(rng, P.REMINDERS[pset]).format(
            s=_statement(src.traits, "explicit", pset, rng)),
        "revoke": _pick(rng, P.REVOKES[pset]).format(topic=_topics(src.traits)),
        "spoof": _pick(rng, P.SPOOFS[pset]).format(topic=_topics(src.traits))}
    for d in distances:
      for variant in ("constrained",) + tuple(controls):
        final = f"{last_lines[variant]} {request}".strip()
        if d == 0:
          msgs = [{"role": "user", "content": f"{statement} {final}"}]
        else:
          msgs = [{"role": "user", "content": f"{statement} {fillers[0][0]}"}]
          for j in range(d):
            if j:
              msgs.append({"role": "user", "content": fillers[j][0]})
            msgs.append({"role": "assistant", "content": fillers[j][1]})
          msgs.append({"role": "user", "content": final})
        self.add(src, system + msgs, src.traits, suite="turns", disclosure="explicit", pset=pset,
                 variant=variant, distance=d, constrained=variant != "revoke")

  def counterfactual(self, src, rng, psets):
    if src.base is None:
      return self.skip("counterfactual", src.problem, src)
    pset = _pick(rng, psets)
    statement = _statement(src.traits, "explicit", pset, rng)
    gaps = np.array([abs(len(s) - len(statement)) for s in P.NEUTRAL[pset]], np.float64)
    near = np.flatnonzero(gaps == gaps.min())
    neutral = P.NEUTRAL[pset][int(near[rng.integers(len(near))])]
    decoy = _statement(src.traits, "decoy", pset, rng)
    pid = f"{self.seed}-{src.index}"
    for variant, text, disclosure in (("constrained", statement, "explicit"),
                                      ("neutral", neutral, None), ("decoy", decoy, None)):
      self.add(src, _prefix_request(src.base, text), src.traits, suite="counterfactual",
               disclosure=disclosure, pset=pset, variant=variant, pair_id=pid,
               constrained=variant == "constrained")


def fingerprint(rows) -> str:
  """sha256 of the rows as canonical JSON (sorted keys), first 16 hex digits."""
  h = hashlib.sha256()
  for row in rows:
    h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    h.update(b"\n")
  return h.hexdigest()[:16]


def make_suite(rows, oracle, seed: int = 0, parts=PARTS, phrasing_sets=P.SETS,
               turn_distances=TURN_DISTANCES, controls=CONTROLS, disclosures=DISCLOSURES,
               max_constraints: int = 3, part_sources=None, return_manifest: bool = False):
  """The suite rows (module docstring) built from `rows`; deterministic for `seed`.

  Args:
    rows: normalised SafeRec-format rows (e.g. `load_split(...)`).
    oracle: the SafetyOracle (hazard items for choice, extra traits for multi).
    seed: row i, part p draw from `np.random.default_rng([seed, i, p])`.
    parts, phrasing_sets, turn_distances, controls, disclosures: what to build.
    max_constraints: the multi part builds n = 1..max_constraints.
    part_sources: {part: n} builds that part from the first n source rows only
      (others from all), e.g. {"disclosure": 8, "multi": 8, "turns": 8,
      "counterfactual": 32} for many twin pairs at little cost. A row of a part is
      the same whatever the other parts' counts, except that choice rows draw
      their offers from the items of the rows the disclosure part is built from.
    return_manifest: also return the manifest dict (counts, skips, fingerprint).
  """
  for name, got, allowed in (
      ("parts", parts, PARTS), ("phrasing_sets", phrasing_sets, P.SETS),
      ("controls", controls, CONTROLS), ("disclosures", disclosures, DISCLOSURES)):
    bad = [x for x in got if x not in allowed]
    if bad or not got and name != "controls":
      raise ValueError(f"{name}={tuple(got)}: expected a non-empty subset of {allowed}")
  limits = dict(part_sources or {})
  bad = {p: n for p, n in limits.items() if p not in PARTS or int(n) < 0}
  if bad:
    raise ValueError(f"part_sources={limits}: expected {{part: n >= 0}} with parts from {PARTS}")
  sources = S.analyse(rows, oracle)
  limit = {p: min(len(sources), int(limits.get(p, len(sources)))) for p in PARTS}
  b = _Builder(seed, S.ItemPool(sources[:limit["disclosure"]], oracle), oracle)
  for src in sources:
    for code, part in enumerate(PARTS):
      if part not in parts or src.index >= limit[part]:
        continue
      rng = np.random.default_rng([seed, src.index, code])
      if part == "disclosure":
        b.disclosure(src, rng, tuple(phrasing_sets), tuple(disclosures))
      elif part == "multi":
        b.multi(src, rng, tuple(phrasing_sets), max_constraints)
      elif part == "turns":
        b.turns(src, rng, tuple(phrasing_sets), tuple(turn_distances), tuple(controls))
      else:
        b.counterfactual(src, rng, tuple(phrasing_sets))
  if not return_manifest:
    return b.rows
  manifest = _manifest(b, sources, rows, seed, parts, phrasing_sets, turn_distances)
  if limits:
    manifest["part_sources"] = {p: limit[p] for p in parts}
  return b.rows, manifest


def _manifest(b, sources, rows, seed, parts, psets, distances) -> dict:
  count = collections.Counter
  problems = count(s.problem or "ok" for s in sources)
  return {
      "seed": seed, "parts": list(parts), "phrasing_sets": list(psets),
      "turn_distances": list(distances), "rows": len(b.rows),
      "counts": dict(count(r["suite"] for r in b.rows)),
      "counts_by_variant": {f"{k[0]}/{k[1]}": v for k, v in sorted(
          count((r["suite"], r["variant"]) for r in b.rows).items())},
      "counts_by_disclosure": dict(count(
          r["disclosure"] for r in b.rows if r["suite"] == "disclosure")),
      "source": {"rows": len(rows), "fingerprint": fingerprint(rows),
                 "statements": dict(problems)},
      "skipped": {p: dict(c) for p, c in b.skipped.items()},
      "skipped_examples": {p: {r: v for r, v in d.items()} for p, d in b.examples.items()},
  }
