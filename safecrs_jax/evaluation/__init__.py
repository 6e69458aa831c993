"""Evaluation: greedy generations for a split, SafeRec metrics, reports, plots.

    reports = evaluation.evaluate(config, checkpoint, split="test", workdir=out)

  runner.py    which checkpoints a path names; one report per checkpoint
  generate.py  resumable generation (raw_generations.jsonl)
  report.py    scoring, report.json, metrics.csv, plots, comparison tables
  relational.py  the relational-safety suite: build / reuse, generate, report card
"""
from safecrs_jax.evaluation.generate import generate_texts, unique_prompts
from safecrs_jax.evaluation.relational import HEADLINE as RELATIONAL_HEADLINE
from safecrs_jax.evaluation.relational import (
    build_suite,
    evaluate_relational,
    headline_table,
    prompt_settings,
)
from safecrs_jax.evaluation.report import (
    HEADLINE,
    comparison_table,
    dataset_fingerprint,
    plot_metrics,
    plot_models,
    score,
    write_run_summary,
)
from safecrs_jax.evaluation.runner import (
    GENERATIONS,
    RAW,
    REPORT,
    Target,
    compare,
    evaluate,
    evaluate_target,
    generation_header,
    load_eval_data,
    resolve_targets,
)

__all__ = [
    "GENERATIONS", "HEADLINE", "RAW", "RELATIONAL_HEADLINE", "REPORT", "Target", "build_suite", "compare",
    "comparison_table", "dataset_fingerprint", "evaluate", "evaluate_relational",
    "evaluate_target", "headline_table", "prompt_settings", "generate_texts", "generation_header",
    "load_eval_data", "plot_metrics", "plot_models", "resolve_targets", "score", "unique_prompts",
    "write_run_summary",
]
