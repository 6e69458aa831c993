"""Evaluating checkpoints: which ones a path names, and one report per checkpoint.

    reports = evaluate(config, checkpoint, split="test", workdir=out)

`checkpoint` is any path policy.checkpoint_kind accepts: a Hugging Face
directory, one orbax step directory, or a run directory (every saved step,
or only `steps` when given). For each checkpoint the output folder
`<workdir>/<split>/<name>/` holds
  raw_generations.jsonl  one line per distinct prompt (evaluation/generate.py;
                         an interrupted evaluation resumes from it)
  generations.jsonl      one line per row: prompt id, raw text, parsed list,
                         per-item violation / hit / unknown flags
  report.json            metrics (overall, per trait), config, checkpoint id,
                         dataset fingerprint, generation settings
and for several steps of one run, `<workdir>/<split>/` also gets metrics.csv,
plots/<metric>.png (metric against step) and comparison.md. Generation is
greedy, as in the paper; identical prompts are generated once.

Resume is checked: raw_generations.jsonl is reused only when its header
(`generation_header`: checkpoint identity, dataset fingerprint, tokenizer,
generation settings, software) matches; otherwise it is regenerated. A
damaged checkpoint step is an error naming it (never skipped), an empty split
is an error naming the split and the data directory, and <workdir> is locked
(run_lock) while evaluating.
"""
import dataclasses
import json
import os
import time

import jax
import numpy as np

from safecrs_jax import config as config_lib
from safecrs_jax import saferec
from safecrs_jax.data import assets, tokens
from safecrs_jax.evaluation import generate as gen
from safecrs_jax.evaluation import report as rep
from safecrs_jax.infra import provenance, run_lock, storage
from safecrs_jax.infra import sharding as shd
from safecrs_jax.rl import rollout
from safecrs_jax.train import checkpoint, policy

RAW = "raw_generations.jsonl"
GENERATIONS = "generations.jsonl"
REPORT = "report.json"


@dataclasses.dataclass(frozen=True)
class Target:
  """One checkpoint to evaluate."""
  name: str            # folder name of its outputs: "step_<n>" or the HF dir's name
  path: str            # orbax step dir or HF dir
  kind: str            # "orbax" | "hf"
  step: int = -1       # training step (orbax), -1 for an HF dir


def resolve_targets(path, steps=None):
  """The checkpoints named by `path` (module docstring), oldest first."""
  full = storage.resolve(path)
  kind = policy.checkpoint_kind(full)
  if kind == "hf":
    if steps:
      raise ValueError(f"{path} is a Hugging Face directory: it has no steps to choose")
    return [Target(os.path.basename(full.rstrip("/")) or "hf", full, "hf")]
  if kind == "step":
    step = int(os.path.basename(full)) if os.path.basename(full).isdigit() else -1
    return [Target(f"step_{step}", full, "orbax", step)]
  ckdir = os.path.join(full, checkpoint.CHECKPOINTS)
  ckdir = ckdir if storage.isdir(ckdir) else full
  saved = checkpoint.saved_steps(ckdir)
  if steps:
    want = sorted({int(s) for s in steps})
    missing = sorted(set(want) - set(saved))
    if missing:
      raise FileNotFoundError(f"steps {missing} not saved under {ckdir} (saved: {saved})")
    saved = want
  for s in saved:
    checkpoint.check_step(os.path.join(ckdir, str(s)), verify=False)
  return [Target(f"step_{s}", os.path.join(ckdir, str(s)), "orbax", s) for s in saved]


def eval_sampling(config, tokenizer):
  """Evaluation's greedy rollout.SamplingConfig: eval.max_new_tokens, the tokenizer's stops."""
  ev = config.eval
  return rollout.SamplingConfig(
      max_new_tokens=int(ev.max_new_tokens), greedy=True,
      stop_ids=tuple(tokens.stop_token_ids(tokenizer)), pad_id=tokens.pad_id(tokenizer))


def generation_header(config, target, rows, tokenizer, batch_size=None):
  """What raw_generations.jsonl of `target` on `rows` depends on (generate.py docstring)."""
  ev = config.eval
  return {"checkpoint": policy.source_identity(config, target.path),
          "dataset": rep.dataset_fingerprint(rows),
          "tokenizer": provenance.tokenizer_hash(tokenizer),
          "generation": dict(dataclasses.asdict(eval_sampling(config, tokenizer)),
                             batch_size=int(batch_size or ev.batch_size),
                             max_prompt_length=int(ev.max_prompt_length),
                             prompt_buckets=list(ev.prompt_buckets),
                             dtype=config.model.dtype, param_dtype=config.model.param_dtype),
          "software": provenance.software_version()}


def generation_stats(done, num_prompts, t0):
  """Summary of generations `done` {prompt index: record} of num_prompts, started at t0."""
  return {
      "distinct_prompts": num_prompts,
      "truncated_completions": int(sum(not done[i]["stopped"] for i in range(num_prompts))),
      "truncated_prompts": int(sum(bool(done[i].get("prompt_truncated"))
                                   for i in range(num_prompts))),
      "mean_completion_tokens": float(np.mean([done[i]["num_tokens"]
                                               for i in range(num_prompts)])),
      "seconds": round(time.time() - t0, 3),
  }


def _write_outputs(out_dir, recs, row_to_prompt, done, report):
  if jax.process_index() != 0:
    return
  with storage.open(os.path.join(out_dir, GENERATIONS), "w", encoding="utf-8") as f:
    for rec in recs:
      pid = row_to_prompt[rec["row"]]
      f.write(json.dumps(dict(rec, prompt_id=pid, text=done[pid]["text"]),
                         ensure_ascii=False) + "\n")
  rep.write_json(os.path.join(out_dir, REPORT), report)


def evaluate_target(config, target, rows, oracle, catalog, out_dir, *, mesh=None, rules=None,
                    progress=True, max_batches=None):
  """Generates, scores and writes the outputs of one checkpoint; returns its report."""
  pol = policy.load_policy(config, target.path, mesh, rules)
  ev = config.eval
  dp = 1 if mesh is None else shd.data_parallel_size(mesh)
  batch_size = -(-int(ev.batch_size) // dp) * dp
  sampling = eval_sampling(config, pol.tokenizer)
  prompts, row_to_prompt = gen.unique_prompts(rows)
  header = generation_header(config, target, rows, pol.tokenizer, batch_size)
  t0 = time.time()
  done = gen.generate_texts(
      pol.model_cfg, pol.params, pol.tokenizer, prompts, sampling=sampling,
      batch_size=batch_size, max_prompt_length=int(ev.max_prompt_length),
      buckets=tuple(ev.prompt_buckets), raw_path=os.path.join(out_dir, RAW), mesh=mesh,
      rules=rules, progress=progress, desc=f"eval {target.name}", max_batches=max_batches,
      header=header)
  if len(done) < len(prompts):
    return None  # interrupted on purpose (max_batches)
  stats = generation_stats(done, len(prompts), t0)
  if stats["truncated_prompts"] and jax.process_index() == 0:
    print(f"eval {target.name}: {stats['truncated_prompts']} of {len(prompts)} prompts were "
          f"longer than eval.max_prompt_length={int(ev.max_prompt_length)} and cut from the left")
  texts = [done[row_to_prompt[n]]["text"] for n in range(len(rows))]
  metrics, recs = rep.score(texts, rows, oracle, catalog, tuple(ev.ks))
  report = {
      "checkpoint": {"name": target.name, "path": target.path, "kind": target.kind,
                     "step": target.step},
      "split": ev.split,
      "dataset_fingerprint": rep.dataset_fingerprint(rows),
      "provenance": header,
      "metrics": metrics,
      "generation": stats,
      "sampling": dataclasses.asdict(sampling),
      "config": json.loads(config.to_json()),
  }
  _write_outputs(out_dir, recs, row_to_prompt, done, report)
  return report


def load_eval_data(config, split=None):
  """(rows, oracle, catalog) of the configured data for `split`."""
  data_dir = assets.resolve_data_dir(config)
  split = split or config.eval.split
  rows = saferec.load_split(data_dir, split, stage="sft", strict=config.data.strict)
  if not rows:
    raise saferec.SafeRecDataError(f"split {split!r} of {data_dir} has no rows: nothing to "
                                   "evaluate")
  if int(config.eval.max_rows) > 0:
    rows = rows[:int(config.eval.max_rows)]
  oracle = saferec.load_oracle(data_dir, risk_threshold=float(config.data.risk_threshold))
  try:
    catalog = saferec.load_catalog(data_dir)
  except FileNotFoundError:
    catalog = None
  return rows, oracle, catalog


def evaluate(config, checkpoint_path, *, split=None, workdir, steps=None, mesh=None, rules=None,
             progress=True):
  """Evaluates every checkpoint named by `checkpoint_path`; returns their reports."""
  config = config_lib.resolve(config)
  with run_lock.hold(workdir):
    return _evaluate(config, checkpoint_path, split, workdir, steps, mesh, rules, progress)


def _setup(config, split, mesh, rules):
  """(config with eval.split = split, mesh, rules, split, rows, oracle, catalog) of an
  evaluation call."""
  if mesh is None:
    mesh, rules = shd.mesh_from_config(config)
  split = storage.check_name(split or config.eval.split, "split")   # a folder of the outputs
  config = config_lib.override(config, "eval.split", split)
  return (config, mesh, rules, split) + tuple(load_eval_data(config, split))


def _evaluate(config, checkpoint_path, split, workdir, steps, mesh, rules, progress):
  config, mesh, rules, split, rows, oracle, catalog = _setup(config, split, mesh, rules)
  targets = resolve_targets(checkpoint_path, steps)
  base = storage.confined(workdir, split)
  reports = []
  for target in targets:
    out_dir = storage.confined(base, target.name)
    storage.makedirs(out_dir)
    reports.append(evaluate_target(config, target, rows, oracle, catalog, out_dir,
                                   mesh=mesh, rules=rules, progress=progress))
  if jax.process_index() == 0 and len(reports) > 1:
    rep.write_run_summary(reports, base)
  return reports


def compare(config, named_paths, *, workdir, split=None, mesh=None, rules=None, progress=True):
  """Evaluates the latest checkpoint of each named run side by side.

  named_paths: {name: run dir | step dir | HF dir}. Each is evaluated into
  <workdir>/<name>/<split>/<checkpoint>/ (resumable as `evaluate`); the
  comparison goes to <workdir>/<split>/comparison.md and models.png (one bar
  per run and headline metric). Returns {name: report}.
  """
  for name in named_paths:               # names become folders: before any work
    storage.check_name(name, "--runs name")
  config = config_lib.resolve(config)
  with run_lock.hold(workdir):
    return _compare(config, named_paths, workdir, split, mesh, rules, progress)


def _compare(config, named_paths, workdir, split, mesh, rules, progress):
  config, mesh, rules, split, rows, oracle, catalog = _setup(config, split, mesh, rules)
  reports = {}
  for name, path in named_paths.items():
    target = resolve_targets(path)[-1]
    out_dir = storage.confined(workdir, name, split, target.name)
    storage.makedirs(out_dir)
    reports[name] = evaluate_target(config, target, rows, oracle, catalog, out_dir,
                                    mesh=mesh, rules=rules, progress=progress)
  if jax.process_index() == 0:
    out = storage.confined(workdir, split)
    storage.makedirs(out)
    with storage.open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
      f.write(rep.comparison_table(reports) + "\n")
    rep.plot_models({n: r["metrics"] for n, r in reports.items()}, os.path.join(out, "models.png"))
  return reports
