"""Training on the relational suite: suite rows from the training split, mixed in.

  training_suite(rows, oracle, seed)  the training-safe part of `make_suite` on
                                      training rows, with held-out pairs, + manifest
  Mix(plain_rows, oracle, ratio, seed) plain + suite rows and their per-epoch order
  from_config(rows, oracle, data_cfg)  a Mix from data.relational_mix / _seed / _parts /
                                      _controls (None when the mix is 0)
  write_manifest(mix, workdir)        <workdir>/relational_mix.json

What a training suite keeps (everything else is for testing only):
  - the parts (`data.relational_parts`, default all four) and turn controls
    (`data.relational_controls`, default reminder, revoke, spoof) asked for;
  - phrasing set "A" (set B is the test paraphrase set; multi rows that only hold
    the source's own statement, set "source", are plain rows again and dropped);
  - turn_distance <= max_turn_distance (4) or None (parts without distance);
  - not a held-out pair: per genre, one (disclosure, trait) pair is drawn
    (seeded) and every row of that genre whose disclosure is that one and whose
    `hazard_traits` hold that trait is dropped, so an evaluation can ask whether
    the model generalises to a combination it never saw. The pair is drawn among
    the implicit disclosures (narrative, choice, profile) where the genre has
    one: `explicit` is what plain SafeRec rows already teach, and holding it out
    would also empty the turns, multi and counterfactual parts of that trait. "Genre" is the row's
    `genre` field (SafeRec-mini has one: the genre of the request); rows without
    it form one genre, "(none)". Neutral and decoy twins disclose nothing: a
    counterfactual triple counts as `explicit` (its constrained twin) and is
    kept or dropped whole.

The order (`Mix.order`): suite rows are cut into units, a counterfactual triple
(one pair_id) is one unit, any other suite row a unit of its own. Per epoch the
plain rows are shuffled, suite units drawn (shuffled) until they hold
`ratio / (1 - ratio)` suite rows per plain row (so suite rows are ~`ratio` of
the order), and the two interleaved at random; a unit is kept contiguous and
never straddles a boundary of `group` rows (a unit that does not fit in the
current batch waits while plain rows fill it; at the end, plain rows drawn at
random pad the batch). `Mix.length` is the nominal epoch length (an epoch's
order is at least that long; callers drop the rest at a step boundary, which is
a multiple of `group`). Deterministic for (seed, epoch).

Safe-SFT passes `prepare` (its curation): suite rows get their targets from the
teacher's list curated for the suite row's own constraints (a neutral or decoy
twin keeps the teacher's full list: that is what teaches "not bland"), and a
suite row left without safe ground truth is dropped, like a plain row. Safe-GDPO
uses the rows as they are (its rewards read `constraints` and `variant`).
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

from safecrs_jax.infra import storage
from safecrs_jax.saferec.relational.suite import (
  CONTROLS,
  DISCLOSURES,
  PARTS,
  fingerprint,
  make_suite,
)

TRAINING_SET = "A"
NO_GENRE = "(none)"
_ORDER_STREAM = 71   # keeps the mix's draws apart from the plain epoch permutation


def _genre(row) -> str:
  return row.get("genre") or NO_GENRE


def _unit_key(row):
  """pair_id for a counterfactual twin (its triple), else the row's suite_id."""
  return ("pair", row["pair_id"]) if row.get("pair_id") is not None else ("row", row["suite_id"])


def _row_pairs(row):
  """The (disclosure, trait) pairs a row is about."""
  disclosure = row["disclosure"] or "explicit"
  return {(disclosure, t) for t in row["hazard_traits"]}


def held_out_pairs(rows, seed: int) -> dict:
  """{genre: [disclosure, trait]}: one pair per genre among those the rows hold, seeded."""
  candidates = collections.defaultdict(set)
  for row in rows:
    candidates[_genre(row)] |= _row_pairs(row)
  rng = np.random.default_rng([int(seed), _ORDER_STREAM, 1])
  out = {}
  for genre in sorted(candidates):
    pairs = sorted(candidates[genre], key=lambda p: (DISCLOSURES.index(p[0]), p[1]))
    pairs = [p for p in pairs if p[0] != "explicit"] or pairs
    out[genre] = list(pairs[int(rng.integers(len(pairs)))])
  return out


def training_suite(rows, oracle, seed: int, *, max_turn_distance: int = 4, parts=PARTS,
                   controls=CONTROLS):
  """(suite rows, manifest): the training part of the suite built from `rows` (module doc)."""
  suite, built = make_suite(rows, oracle, seed=seed, parts=tuple(parts),
                            controls=tuple(controls), return_manifest=True)
  kept = [r for r in suite if r["phrasing_set"] == TRAINING_SET
          and (r["turn_distance"] is None or r["turn_distance"] <= max_turn_distance)]
  held = held_out_pairs(kept, seed)
  dropped_units = {_unit_key(r) for r in kept
                   if tuple(held[_genre(r)]) in _row_pairs(r)}
  out = [r for r in kept if _unit_key(r) not in dropped_units]
  manifest = {
      "seed": int(seed), "phrasing_set": TRAINING_SET, "max_turn_distance": max_turn_distance,
      "parts": list(parts), "controls": list(controls),
      "held_out": held, "rows": len(out), "built_rows": len(suite),
      "dropped_held_out_rows": len(kept) - len(out),
      "counts": dict(collections.Counter(f"{r['suite']}/{r['variant']}" for r in out)),
      "source": built["source"], "skipped": built["skipped"]}
  return out, manifest


def units(suite_rows) -> list[list[int]]:
  """Index lists into suite_rows, one per unit (a triple shares a pair_id), in row order."""
  groups = collections.OrderedDict()
  for i, row in enumerate(suite_rows):
    groups.setdefault(_unit_key(row), []).append(i)
  return list(groups.values())


def suite_target(n_plain: int, n_suite: int, ratio: float) -> int:
  """Suite rows per epoch so that they are ~ratio of the order (at most all of them)."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"data.relational_mix={ratio}: expected 0 <= ratio < 1")
  return min(n_suite, int(round(n_plain * ratio / (1.0 - ratio))))


def mixed_order(n_plain: int, suite_rows, ratio: float, seed: int, epoch: int,
                group: int) -> np.ndarray:
  """Indices into plain + suite rows (suite row j is n_plain + j) for `epoch` (module doc).

  ratio == 0 is the plain epoch permutation, the same as `train_loop.epoch_permutation`.
  """
  target = suite_target(n_plain, len(suite_rows), ratio)
  if target == 0:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_plain)
  rng = np.random.default_rng([int(seed), int(epoch), _ORDER_STREAM])
  chosen, count = [], 0
  all_units = units(suite_rows)
  for u in rng.permutation(len(all_units)):
    if count >= target:
      break
    chosen.append([n_plain + j for j in all_units[u]])
    count += len(all_units[u])
  items = [[int(i)] for i in rng.permutation(n_plain)] + chosen
  items = [items[k] for k in rng.permutation(len(items))]
  order, waiting = [], collections.deque()

  def fits(unit):
    fill = len(order) % group
    return fill == 0 if len(unit) > group else fill + len(unit) <= group

  for item in items:
    if len(item) == 1 and item[0] < n_plain or fits(item):
      order.extend(item)
    else:
      waiting.append(item)
    while waiting and fits(waiting[0]):
      order.extend(waiting.popleft())
  for unit in waiting:
    while not fits(unit):
      order.append(int(rng.integers(n_plain)))
    order.extend(unit)
  return np.asarray(order, np.int64)


class Mix:
  """Plain rows + the training suite, and the order a trainer walks (module doc)."""

  def __init__(self, plain_rows, oracle, ratio: float, seed: int, *,
               max_turn_distance: int = 4, parts=PARTS, controls=CONTROLS, prepare=None):
    self.ratio, self.seed = float(ratio), int(seed)
    self.n_plain = len(plain_rows)
    self.suite_rows, self.manifest = training_suite(
        plain_rows, oracle, self.seed, max_turn_distance=max_turn_distance, parts=parts,
        controls=controls)
    if prepare is not None:       # Safe-SFT curation (module doc)
      self.suite_rows, report = prepare(self.suite_rows)
      self.manifest["curation"] = {k: v for k, v in report.items() if k != "dropped"}
      self.manifest["rows"] = len(self.suite_rows)
      if not self.suite_rows:
        raise ValueError("data.relational_mix > 0 but curation left no suite row "
                         f"({self.manifest['curation']})")
    self.rows = list(plain_rows) + self.suite_rows
    self.length = self.n_plain + suite_target(self.n_plain, len(self.suite_rows), self.ratio)
    self.manifest.update(ratio=self.ratio, plain_rows=self.n_plain, epoch_length=self.length)

  @property
  def settings(self) -> dict:
    """What a checkpoint fingerprint must hold: ratio, seed and the suite rows' hash."""
    return {"ratio": self.ratio, "seed": self.seed, "rows": len(self.suite_rows),
            "fingerprint": fingerprint(self.suite_rows), "held_out": self.manifest["held_out"],
            "max_turn_distance": self.manifest["max_turn_distance"],
            "parts": self.manifest["parts"], "controls": self.manifest["controls"]}

  def order(self, seed: int, epoch: int, group: int) -> np.ndarray:
    return mixed_order(self.n_plain, self.suite_rows, self.ratio, seed, epoch, group)


MANIFEST = "relational_mix.json"


def _names(data_cfg, key, allowed):
  got = tuple(getattr(data_cfg, key)) or allowed
  bad = [x for x in got if x not in allowed]
  if bad:
    raise ValueError(f"data.{key}={got}: {bad} not among {allowed}")
  return got


def from_config(plain_rows, oracle, data_cfg, prepare=None):
  """The Mix of data.relational_mix / _seed / _parts / _controls, or None when the mix is 0.

  data.relational_parts () = all PARTS; data.relational_controls () = all CONTROLS,
  ("none",) = no turn controls. `prepare`: see the module doc (Safe-SFT curation).
  """
  ratio = float(data_cfg.relational_mix)
  suite_target(1, 0, ratio)   # validates the ratio
  if ratio == 0.0:
    return None
  parts = _names(data_cfg, "relational_parts", PARTS)
  controls = tuple(data_cfg.relational_controls)
  controls = () if controls == ("none",) else _names(data_cfg, "relational_controls", CONTROLS)
  return Mix(plain_rows, oracle, ratio, int(data_cfg.relational_seed), parts=parts,
             controls=controls, prepare=prepare)


def write_manifest(mix, workdir) -> str:
  """Writes mix.manifest (held-out pairs, counts, ratio) to <workdir>/relational_mix.json."""
  storage.makedirs(workdir)
  path = os.path.join(workdir, MANIFEST)
  with storage.open(path, "w", encoding="utf-8") as f:
    json.dump(mix.manifest, f, indent=1, sort_keys=True)
  return path
