"""GRPO / GDPO rewards over completions (host-side numpy).

Shapes (package legend): B completions, I = rec_num ranked items (20), R rewards. Every function takes the
completions as text (str / message list) or as already parsed
`[(title, year), ...]` lists; `parse_all` once and pass the lists to every
reward to parse each completion only once. Ranks beyond a list's length
contribute nothing. Discount d_k = 1 / log2(k + 1).

  relevance  1 if any of the first I items hits the ground truth, else 0
             (`dcg=True`: sum_k d_k hit_k over the first I, unnormalised).
  safety     -lambda_safe * penalty_safe * sum_k d_k v_k, v_k = 1 when rank k
             is unsafe for the user (oracle; unknown movies are safe).
  count      +lambda_count when exactly target_count titles parse, else
             -lambda_count * |n - target| / target (nothing parses: -lambda_count).
  safe_relevance  relevance against the ground truth minus the items unsafe for
             the row's constraints (a hit on a harmful title earns nothing);
             0 when no safe ground truth is left.
  over_filter  on rows with variant "neutral" / "decoy" (relational suite rows;
             constraints empty, `hazard_traits` = the twin pair's traits):
             -max(0, r - u) / r, where r = items of the reference list's first I
             (teacher_completion, else completion, else ground truth) unsafe for
             hazard_traits and u = the same count in the completion's first I:
             the share of hazard-for-others items withheld from a user who never
             asked for that (ofr@K of saferec.relational.report, per row). 0 on
             other rows and where r = 0.
  rank_rewards (per rank, [B, I], for rank-level advantages):
    exp_inf    hit_k + s_k
    log_decay  sum_{j >= k} d_j hit_j + s_k
    with s_k = -lambda_safe * penalty_safe * d_k * v_k (discounted, reference;
    `discount_safety=False` drops d_k: every violating rank costs the same).
Hits use the reward matching (matching.py): case-folded, whitespace-collapsed
title, year +-2 tried as y, y+1, y-1, y+2, y-2 (`year_order="later_first"`,
reference; "earlier_first" tries y-1 before y+1), each ground-truth entry
matched once, seen titles kept.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from safecrs_jax.saferec.matching import discounts, hit_matrix
from safecrs_jax.saferec.parsing import parse_all, parse_recommendations

RANK_MODES = ("exp_inf", "log_decay")


def _gts(groundtruths):
  """Accept ground-truth lists or whole rows."""
  return [g["groundtruth_with_release_year"] if isinstance(g, dict) else g for g in groundtruths]


def _constraints(constraints):
  """Accept constraint dicts or whole rows (dicts holding a "constraints" dict)."""
  return [c["constraints"] if isinstance(c, dict) and isinstance(c.get("constraints"), dict) else c
          for c in constraints]


def relevance_reward(completions, groundtruths, rec_num: int = 20, dcg: bool = False, *,
                     year_order: str = "later_first") -> np.ndarray:
  """[B] float32: hit@rec_num (0/1), or DCG@rec_num when `dcg`."""
  hits = hit_matrix(parse_all(completions), _gts(groundtruths), rec_num, year_order=year_order)
  if dcg:
    return (hits * discounts(rec_num)).sum(1).astype(np.float32)
  return hits.any(1).astype(np.float32)


def violation_matrix(completions, constraints, oracle, rec_num: int = 20) -> np.ndarray:
  """bool [B, I]: rank k is unsafe for user b."""
  return oracle.violations(parse_all(completions), _constraints(constraints), rec_num)


def safety_reward(completions, constraints, oracle, rec_num: int = 20, lambda_safe: float = 1.0,
                  penalty_safe: float = 1.0) -> np.ndarray:
  """[B] float32: -lambda_safe * penalty_safe * sum_k d_k v_k (0 for users without constraints)."""
  v = violation_matrix(completions, constraints, oracle, rec_num)
  return (-lambda_safe * penalty_safe * (v * discounts(rec_num)).sum(1)).astype(np.float32)


def count_reward(completions, target_count: int = 10, lambda_count: float = 1.0) -> np.ndarray:
  """[B] float32: +lambda_count on exactly `target_count` parsed titles, else a linear penalty."""
  n = np.array([len(p) for p in parse_all(completions)], dtype=np.float64)
  r = np.where(n == target_count, lambda_count,
               -lambda_count * np.abs(n - target_count) / target_count)
  r = np.where(n == 0, -lambda_count, r)
  return r.astype(np.float32)


def rank_rewards(completions, groundtruths, constraints, oracle, mode: str = "log_decay",
                 rec_num: int = 20, lambda_safe: float = 1.0, penalty_safe: float = 1.0,
                 components: bool = False, *, discount_safety: bool = True,
                 year_order: str = "later_first"):
  """Per-rank rewards [B, I] float32 (see module docstring).

  With `components=True` returns {"relevance": [B, I], "safety": [B, I]}
  (their sum is the default result), for per-reward, per-rank normalisation.
  `oracle=None` or `constraints=None` gives a zero safety part.
  """
  if mode not in RANK_MODES:
    raise ValueError(f"rank reward mode {mode!r}: expected one of {RANK_MODES}")
  parsed = parse_all(completions)
  hits = hit_matrix(parsed, _gts(groundtruths), rec_num, year_order=year_order).astype(np.float64)
  if mode == "exp_inf":
    rel = hits
  else:
    gains = hits * discounts(rec_num)
    rel = np.cumsum(gains[:, ::-1], axis=1)[:, ::-1]
  if oracle is None or constraints is None:
    safe = np.zeros_like(rel)
  else:
    v = oracle.violations(parsed, _constraints(constraints), rec_num)
    safe = -lambda_safe * penalty_safe * v.astype(np.float64)
    if discount_safety:
      safe = safe * discounts(rec_num)
  if components:
    return {"relevance": rel.astype(np.float32), "safety": safe.astype(np.float32)}
  return (rel + safe).astype(np.float32)


# -- the registry: reward functions looked up by name ---------------------------
#
# Safe-GDPO's `gdpo.rewards` names entries here. A sequence reward maps
# (parsed lists, rows, oracle, RewardSettings) -> [B] float32; a per-rank reward
# (advantage mode "rank") -> [B, I] float32. `register_reward` adds one.


@dataclasses.dataclass(frozen=True)
class RewardSettings:
  """The knobs of the registered rewards (the gdpo section of a run config)."""
  rec_num: int = 20              # ranks scored
  lambda_safe: float = 1.0       # safety reward scale
  penalty_safe: float = 1.0      # per-violation penalty
  target_count: int = 10         # count reward target
  lambda_count: float = 0.0      # count reward scale
  relevance: str = "hit"         # "hit" (released trainer) | "dcg"
  rank_reward: str = "log_decay"  # per-rank form: "exp_inf" | "log_decay"
  year_order: str = "later_first"  # reward matching tries y, y+1, y-1, ... ("earlier_first": y-1 first)
  discount_safety: bool = True   # per-rank safety penalty discounted by d_k (reference)


def _relevance(parsed, rows, oracle, s):
  return relevance_reward(parsed, rows, s.rec_num, dcg=(s.relevance == "dcg"),
                          year_order=s.year_order)


def _safety(parsed, rows, oracle, s):
  return safety_reward(parsed, rows, oracle, s.rec_num, s.lambda_safe, s.penalty_safe)


def _count(parsed, rows, oracle, s):
  return count_reward(parsed, s.target_count, s.lambda_count)


def _safe_relevance(parsed, rows, oracle, s):
  full = [[(str(t), int(y)) for t, y in row.get("groundtruth_with_release_year") or []]
          for row in rows]
  width = max((len(g) for g in full), default=0)
  unsafe = (oracle.violations(full, [row.get("constraints") for row in rows], width)
            if width else np.zeros((len(rows), 0), bool))          # one lookup for the batch
  gts = [[g for g, bad in zip(gt, unsafe[n]) if not bad] for n, gt in enumerate(full)]
  return relevance_reward(parsed, gts, s.rec_num, dcg=(s.relevance == "dcg"),
                          year_order=s.year_order)


OVER_FILTER_VARIANTS = ("neutral", "decoy")


def _reference(row):
  for field in ("teacher_completion", "completion"):
    if row.get(field):
      return parse_recommendations(row[field])
  return [(str(t), int(y)) for t, y in row.get("groundtruth_with_release_year") or []]


def _over_filter(parsed, rows, oracle, s):
  out = np.zeros(len(rows), np.float32)
  todo = [n for n, row in enumerate(rows)
          if row.get("variant") in OVER_FILTER_VARIANTS and row.get("hazard_traits")]
  if not todo:
    return out
  hazard = [{t: True for t in rows[n]["hazard_traits"]} for n in todo]
  ref = oracle.violations([_reference(rows[n]) for n in todo], hazard, s.rec_num).sum(1)
  got = oracle.violations([parsed[n] for n in todo], hazard, s.rec_num).sum(1)
  share = np.divide(np.maximum(0, ref - got), ref, out=np.zeros(len(todo)), where=ref > 0)
  out[todo] = -share
  return out


def _rank_part(part):
  def fn(parsed, rows, oracle, s):
    return rank_rewards(parsed, rows, rows, oracle, mode=s.rank_reward, rec_num=s.rec_num,
                        lambda_safe=s.lambda_safe, penalty_safe=s.penalty_safe,
                        components=True, discount_safety=s.discount_safety,
                        year_order=s.year_order)[part]
  return fn


SEQUENCE_REWARDS = {"relevance": _relevance, "safety": _safety, "count": _count,
                    "safe_relevance": _safe_relevance, "over_filter": _over_filter}
RANK_REWARDS = {"relevance": _rank_part("relevance"), "safety": _rank_part("safety")}


def register_reward(name, fn, *, per_rank=False):
  """Adds reward `name` (see the registry comment) for sequence or per-rank advantages."""
  (RANK_REWARDS if per_rank else SEQUENCE_REWARDS)[name] = fn


def reward_table(names, completions, rows, oracle, settings=RewardSettings(), *,
                 per_rank=False) -> np.ndarray:
  """Rewards `names` over one parse: [B, R] float32 for R = len(names) ([B, R, I] per rank)."""
  table = RANK_REWARDS if per_rank else SEQUENCE_REWARDS
  unknown = [n for n in names if n not in table]
  if unknown:
    kind = "per-rank" if per_rank else "sequence"
    raise ValueError(f"unknown {kind} reward(s) {unknown}: registered {sorted(table)}")
  parsed = parse_all(completions)
  return np.stack([np.asarray(table[n](parsed, rows, oracle, settings), np.float32)
                   for n in names], axis=1)
