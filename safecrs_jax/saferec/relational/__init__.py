"""Relational safety: a test suite and a report card for "safe for this user" vs "bland".

SafeRec asks one thing: does the list avoid the one sensitivity stated in the
prompt. This package asks whether a recommender respects a sensitivity however
it is disclosed, remembers it across turns, handles several at once, resists
others talking it out of it and honours the user's own change of mind, and
whether its safety is relational (for this user) or bland (for everyone).

  suite      make_suite(rows, oracle, seed): SafeRec-format rows -> suite rows
             (fields, parts and conventions in `suite`'s docstring)
  phrasings  the sentences (sets A for training, B for testing only)
  source     locating a row's own constraint sentence; reference lists; items
  policies   stand_in_lists(rows, oracle, policy): oracle-driven stand-ins
  report     report(completions, rows, oracle, ks): the metrics (formulas there)
  card       write_card({name: report}, out_dir): JSON, Markdown card, plots
  training   training_suite / Mix: suite rows from the training split (set A, turns
             <= 4, held-out pairs) mixed into Safe-GDPO (data.relational_mix)

    python -m safecrs_jax.saferec.relational --data_dir=DIR|mini --split=test --out=OUT

writes OUT/relational.jsonl (`saferec.load_split(OUT, "relational")` reads it)
and OUT/manifest.json.
"""
from safecrs_jax.saferec.relational.card import card_markdown, write_card, write_plots
from safecrs_jax.saferec.relational.phrasings import SETS, TRAIT_TEXT
from safecrs_jax.saferec.relational.policies import POLICIES, stand_in_lists
from safecrs_jax.saferec.relational.report import report
from safecrs_jax.saferec.relational.source import reference_list, strip_statements
from safecrs_jax.saferec.relational.suite import (
    CONTROLS,
    DISCLOSURES,
    PARTS,
    SUITE_FIELDS,
    TURN_DISTANCES,
    VARIANTS,
    fingerprint,
    make_suite,
)
from safecrs_jax.saferec.relational.writer import build_from_dir, write_suite

__all__ = [
    "CONTROLS", "DISCLOSURES", "PARTS", "POLICIES", "SETS", "SUITE_FIELDS", "TRAIT_TEXT",
    "TURN_DISTANCES", "VARIANTS", "build_from_dir", "card_markdown", "fingerprint", "make_suite",
    "reference_list", "report", "stand_in_lists", "strip_statements", "write_card", "write_plots",
    "write_suite",
]
