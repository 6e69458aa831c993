"""Oracle-driven stand-in policies: reference lists edited by a rule, no model.

Each policy starts from the row's reference list (`source.reference_list`:
the teacher's list when the row has one, else its ground truth) and keeps the
order:
  teacher     the reference list as it is
  ignore      the same list whatever the constraints say (an alias of teacher,
              named for what it models: a recommender that ignores sensitivities)
  relational  minus every item unsafe for this row's `constraints`
  bland       minus every item unsafe for any of the oracle's traits
  empty       nothing
  first_only  minus the items unsafe for the first active trait of `constraints`
Unknown items count as safe and stay.
"""
from __future__ import annotations

import numpy as np

from safecrs_jax.saferec.relational.source import reference_list
from safecrs_jax.saferec.traits import active_traits

POLICIES = ("teacher", "ignore", "relational", "bland", "empty", "first_only")


def _masks(rows, oracle, policy) -> np.ndarray:
  """[N, T] the traits each row's list is filtered for."""
  if policy == "bland":
    return np.ones((len(rows), len(oracle.traits)), bool)
  if policy == "first_only":
    return oracle.masks([{t: True for t in active_traits(r.get("constraints"))[:1]} for r in rows])
  return oracle.masks([r.get("constraints") or {} for r in rows])


def stand_in_lists(rows, oracle, policy: str) -> list[list[tuple[str, int]]]:
  """Parsed lists [(title, year), ...] of a stand-in policy (module docstring) for `rows`."""
  if policy not in POLICIES:
    raise ValueError(f"policy={policy!r}: expected one of {POLICIES}")
  refs = [reference_list(r) for r in rows]
  if policy in ("teacher", "ignore"):
    return [list(x) for x in refs]
  if policy == "empty":
    return [[] for _ in rows]
  db = oracle.rows(refs)                                               # [N, L]
  drop = (oracle.unsafe[db] & _masks(rows, oracle, policy)[:, None, :]).any(-1)   # [N, L]
  return [[it for j, it in enumerate(items) if not drop[n, j]] for n, items in enumerate(refs)]
