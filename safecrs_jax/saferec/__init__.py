"""SafeRec: the benchmark's semantics, host-side (numpy / Python, no JAX).

Traits, constraint injection, the safety oracle, completion parsing, rewards,
metrics, Safe-SFT curation, loaders for the released data, a tfds builder
(`saferec.tfds_builder`) and SafeRec-mini (`saferec.mini`, the shipped
synthetic benchmark). The last two are imported on first use.
"""
import importlib

from safecrs_jax.saferec.curation import (
    BackfillPool,
    backfill_pool,
    curate_row,
    curate_sft_rows,
    filter_groundtruth,
    filter_row_groundtruth,
    reasoning_block,
)
from safecrs_jax.saferec.data import (
    SafeRecDataError,
    find_split,
    load_catalog,
    load_oracle,
    load_split,
    normalize_row,
)
from safecrs_jax.saferec.injection import (
    PHRASINGS,
    inject_constraints,
    inject_row,
    most_violated_traits,
    render_traits,
)
from safecrs_jax.saferec.matching import discounts, fold_title, hit_matrix, hit_vector
from safecrs_jax.saferec.metrics import DEFAULT_KS, Catalog, evaluate_recommendations
from safecrs_jax.saferec.oracle import SafetyOracle, normalize_title
from safecrs_jax.saferec.parsing import (
    completion_text,
    format_recommendations,
    parse_all,
    parse_recommendations,
)
from safecrs_jax.saferec.rewards import (
    RANK_REWARDS,
    SEQUENCE_REWARDS,
    RewardSettings,
    count_reward,
    rank_rewards,
    register_reward,
    relevance_reward,
    reward_table,
    safety_reward,
    violation_matrix,
)
from safecrs_jax.saferec.traits import TRAITS, active_traits, constraint_masks

__all__ = [
    "BackfillPool", "Catalog", "DEFAULT_KS", "PHRASINGS", "RANK_REWARDS", "RewardSettings",
    "SEQUENCE_REWARDS", "SafeRecDataError", "SafetyOracle", "TRAITS", "active_traits",
    "backfill_pool", "completion_text", "constraint_masks", "count_reward", "curate_row",
    "curate_sft_rows", "discounts", "evaluate_recommendations", "filter_groundtruth",
    "filter_row_groundtruth", "find_split", "fold_title", "format_recommendations", "hit_matrix",
    "hit_vector", "inject_constraints", "inject_row", "load_catalog", "load_oracle", "load_split",
    "most_violated_traits", "normalize_row", "normalize_title", "parse_all",
    "parse_recommendations", "rank_rewards", "reasoning_block", "register_reward",
    "relevance_reward", "render_traits", "reward_table", "safety_reward", "violation_matrix",
]

_LAZY = ("mini", "relational", "tfds_builder")


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
