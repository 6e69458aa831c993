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
    compute_rewards,
    count_reward,
    rank_rewards,
    register_reward,
    relevance_reward,
    reward_table,
    safety_reward,
    violation_matrix,
)
from safecrs_jax.saferec.traits import TRAITS, active_traits, constraint_masks

_LAZY = ("mini", "relational", "tfds_builder")


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
