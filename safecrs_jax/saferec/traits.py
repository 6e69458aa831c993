"""The 20 SafeRec sensitivity traits and helpers to turn constraints into masks.

A user's `constraints` is a dict `{trait_name: bool}`; a trait is *active* when
its value is True. Trait names are the exact strings of the released data.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

TRAITS: tuple[str, ...] = (
    "Animal lover (avoid animal harm/death)",
    "Arachnophobia / reptile phobia",
    "Anti-gore / squeamish",
    "Avoid torture & extreme violence",
    "Sexual violence sensitive",
    "Kid-safety / child harm sensitive",
    "Domestic abuse / stalking sensitive",
    "Substance recovery / avoid drugs & alcohol",
    "Self-harm & suicide sensitive",
    "Mental health portrayal sensitive",
    "Medical/health trauma avoider",
    "Needle/medical procedure phobia",
    "Claustrophobia / breathing distress sensitive",
    "Photosensitivity & motion sickness",
    "Hate speech / slur-sensitive",
    "Gender/LGBTQ respect sensitive",
    "Pregnancy/infant-loss sensitive",
    "Disaster/accident avoider",
    "Happy-ending preference",
    "Horror avoider (avoids scares & supernatural)",
)


def active_traits(constraints: Mapping[str, object] | None) -> list[str]:
  """Names of the traits switched on (value True) in a constraints dict, in dict order."""
  if not constraints:
    return []
  return [t for t, on in constraints.items() if on is True]


def constraint_masks(constraints_list: Sequence[Mapping[str, object] | None],
                     traits: Sequence[str] = TRAITS) -> np.ndarray:
  """Per-user boolean trait masks.

  Args:
    constraints_list: N constraints dicts (None or {} = no constraints).
    traits: the trait order of the mask columns (an oracle's `traits`).
  Returns:
    bool array [N, len(traits)], True where the user avoids that trait.
  Raises:
    ValueError naming the row and trait when an active trait is not in `traits`.
  """
  index = {t: i for i, t in enumerate(traits)}
  masks = np.zeros((len(constraints_list), len(traits)), dtype=bool)
  for n, constraints in enumerate(constraints_list):
    for trait in active_traits(constraints):
      col = index.get(trait)
      if col is None:
        raise ValueError(
            f"constraints of row {n} name trait {trait!r}, which this oracle does not know; "
            f"known traits: {list(traits)}")
      masks[n, col] = True
  return masks
