r"""Evaluates checkpoints on a SafeRec split (greedy decoding, every metric).

  python -m launch.evaluate --config=configs/demo.py:stage=sft \
      --checkpoint=runs/sft [--steps=100,200] [--split=test] --workdir=runs/eval
  python -m launch.evaluate --config=configs/demo.py:stage=sft \
      --runs=sft=runs/sft,gdpo=runs/gdpo,grpo=runs/grpo --workdir=runs/compare
  python -m launch.evaluate --config=configs/demo.py --suite=relational \
      --runs=sft=runs/sft,gdpo=runs/gdpo --workdir=runs/relational

--checkpoint takes a run directory (every saved step, or --steps), one orbax
step directory (<run>/checkpoints/<step>) or a Hugging Face directory. Each
checkpoint gets report.json, generations.jsonl and raw_generations.jsonl under
<workdir>/<split>/<name>/; several steps also get metrics.csv, plots/ and
comparison.md. --runs evaluates the latest checkpoint of each named run
(any of the same kinds) into <workdir>/<name>/ and writes one comparison table
and one plot for all of them under <workdir>/<split>/. Re-running an
interrupted command resumes it; generations of another checkpoint or other
settings are regenerated, not reused. A damaged checkpoint step, or an empty
split, is an error (exit status 1).

--suite=relational evaluates the same kinds of checkpoint (--checkpoint: each
step, --runs: each latest step) on the relational-safety suite built from the
split (evaluation/relational.py): <workdir>/suite/, <workdir>/<name>/report.json,
and one report card for all of them: <workdir>/card.md, relational.json, plots.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

import launch
from safecrs_jax import evaluation
from safecrs_jax.infra import sharding

# Before JAX's CPU backend starts: CPU rollouts run over one device per core.
sharding.expose_cpu_cores()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (data, model numerics, mesh and eval sections).",
    lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Run dir, orbax step dir, or Hugging Face dir to evaluate.")
_RUNS = flags.DEFINE_list(
    "runs", None, "name=path,...: compare the latest checkpoint of several runs.")
_STEPS = flags.DEFINE_list("steps", None, "Only these steps of a run dir (default: all).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config eval.split).")
_SUITE = flags.DEFINE_enum("suite", "saferec", ["saferec", "relational"],
                           "saferec: the split's own metrics; relational: the relational suite.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where reports and generations go.")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("steps", lambda v: v is None or all(s.isdigit() for s in v),
                         "--steps takes step numbers, e.g. --steps=100,200")


def _named_runs(items):
  named = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise app.UsageError(f"--runs entry {item!r} is not name=path")
    if name in named:
      raise app.UsageError(f"--runs names {name!r} twice")
    named[name] = path
  return named


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_CHECKPOINT.value) == bool(_RUNS.value):
    raise app.UsageError("give exactly one of --checkpoint and --runs")
  if _RUNS.value and _STEPS.value:
    raise app.UsageError("--steps applies to --checkpoint only (--runs takes each latest step)")
  launch.quiet_logs()
  sharding.maybe_initialize_distributed()
  config = launch.typed_config(_CONFIG.value)
  if _SUITE.value == "relational":
    return _relational(config)
  with launch.clear_errors():
    if _RUNS.value:
      named = evaluation.compare(config, _named_runs(_RUNS.value), split=_SPLIT.value,
                                 workdir=_WORKDIR.value)
    else:
      reports = evaluation.evaluate(config, _CHECKPOINT.value, split=_SPLIT.value,
                                    workdir=_WORKDIR.value, steps=_STEPS.value)
      named = {r["checkpoint"]["name"]: r for r in reports}
  if sharding.is_main_process():
    print(evaluation.comparison_table(named))


def _relational(config):
  try:  # a missing or damaged checkpoint: one line, before any work
    if _RUNS.value:
      targets = {n: evaluation.resolve_targets(p)[-1] for n, p in _named_runs(_RUNS.value).items()}
    else:
      targets = {t.name: t for t in evaluation.resolve_targets(_CHECKPOINT.value, _STEPS.value)}
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  with launch.clear_errors():
    reports = evaluation.evaluate_relational(config, targets, _WORKDIR.value,
                                             split=_SPLIT.value)
  if sharding.is_main_process():
    print(evaluation.headline_table(reports, evaluation.RELATIONAL_HEADLINE))
    print(f"card: {next(iter(reports.values()))['card'].get('card')}")


if __name__ == "__main__":
  launch.run(main)
