"""Evaluating checkpoints on the relational-safety suite, side by side on one report card.

    reports = evaluate_relational(config, {"sft": run_dir, "gdpo": run_dir}, workdir)

The suite (`saferec.relational.make_suite`) is built from the configured data
directory and eval split (the first `eval.relational_max_sources` rows, seed
`eval.relational_seed`; the counterfactual twins from the first
`eval.relational_pair_sources`, -1 = as many, so ofr / crg / decoy_rate can rest
on more pairs than the other parts on rows) into <workdir>/suite/
(relational.jsonl, manifest.json).
It is reused only when the manifest's `inputs` (source rows' fingerprint, seed,
cap, parts, the suite code's hash, software) equal the current ones and the
rows file still has the recorded fingerprint; otherwise it is rebuilt, with one
line saying why. Each model (the latest checkpoint of a run dir, a step dir,
an HF dir, or a runner.Target) gets <workdir>/<name>/
  raw_generations.jsonl  resumable, header-checked (evaluation/generate.py)
  generations.jsonl      per suite row: suite fields, text, parsed list
  report.json            the relational metrics (saferec/relational/report.py),
                         prompt settings and how many prompts were cut
and <workdir>/ gets relational.json, card.md and the card's plots for all
models (`saferec.relational.write_card`).

Suite prompts are multi-turn (up to 8 filler exchanges), far longer than plain
rows: the prompt length is `eval.relational_max_prompt_length`, or (-1) the
longest suite prompt rounded up to 64 tokens and never below
eval.max_prompt_length, so no statement is cut away; the buckets are
`eval.relational_prompt_buckets`, or (empty) the eval buckets below that length
plus one every 128 tokens up to it. Prompts still cut from the left are
counted in report.json and printed.
"""
import hashlib
import json
import os
import time

import jax

from safecrs_jax import config as config_lib
from safecrs_jax import saferec
from safecrs_jax.data import assets, tokens
from safecrs_jax.evaluation import generate as gen
from safecrs_jax.evaluation import report as rep
from safecrs_jax.evaluation import runner
from safecrs_jax.infra import provenance, run_lock, storage
from safecrs_jax.infra import sharding as shd
from safecrs_jax.saferec import relational as rel
from safecrs_jax.saferec.parsing import parse_all
from safecrs_jax.saferec.relational.writer import SPLIT
from safecrs_jax.train import policy

SUITE_DIR = "suite"
CARD_K = 10
# The card's headline rows (demo table, launch.evaluate --suite=relational).
HEADLINE = ("svr@10", "svr@10/turns=4", "svr@10/disclosure=narrative", "ofr@10", "crg_norm@10",
            "decoy_rate@10")
_ROW_FIELDS = ("suite_id", "suite", "variant", "disclosure", "phrasing_set", "turn_distance",
               "n_constraints", "pair_id")


def _code_hash():
  """sha256 of the suite generator's source files (the suite is derived from them too)."""
  h = hashlib.sha256()
  folder = os.path.dirname(rel.__file__)
  for name in ("suite.py", "phrasings.py", "source.py", "writer.py"):
    with open(os.path.join(folder, name), "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _source(config):
  """(source rows, oracle, data dir, split) of the suite."""
  data_dir = assets.resolve_data_dir(config)
  split = config.eval.split
  rows = saferec.load_split(data_dir, split, stage="sft", strict=config.data.strict)
  cap, pairs = _caps(config)
  rows = rows if min(cap, pairs) < 0 else rows[:max(cap, pairs)]
  if not rows:
    raise saferec.SafeRecDataError(f"split {split!r} of {data_dir} has no rows: no relational "
                                   "suite to build")
  oracle = saferec.load_oracle(data_dir, risk_threshold=float(config.data.risk_threshold))
  return rows, oracle, data_dir, split


def _caps(config):
  """(eval.relational_max_sources, eval.relational_pair_sources): -1 = all rows;
  the pair cap -1 = the same as the first."""
  cap = int(config.eval.relational_max_sources)
  pairs = int(config.eval.relational_pair_sources)
  return cap, cap if pairs < 0 else pairs


def part_sources(config, n_rows):
  """make_suite's part_sources for `n_rows` source rows: the counterfactual part from
  the first relational_pair_sources, the others from the first relational_max_sources
  (None when both caps are the same)."""
  cap, pairs = _caps(config)
  if pairs == cap:
    return None
  def rows_of(n):
    return n_rows if n < 0 else min(n, n_rows)
  return {p: rows_of(pairs if p == "counterfactual" else cap) for p in rel.PARTS}


def suite_inputs(config, rows):
  """What the suite built from `rows` under `config` depends on (compared on reuse)."""
  ev = config.eval
  return {"source_fingerprint": rel.fingerprint(rows), "source_rows": len(rows),
          "split": ev.split, "max_sources": int(ev.relational_max_sources),
          "pair_sources": part_sources(config, len(rows)),
          "seed": int(ev.relational_seed), "parts": list(rel.PARTS),
          "risk_threshold": float(config.data.risk_threshold), "code": _code_hash(),
          "software": provenance.software_version()}


def _read_rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _reusable(suite_dir, inputs):
  """(rows, manifest) of a suite in suite_dir built from `inputs`, or (None, reason)."""
  path = os.path.join(suite_dir, "manifest.json")
  if not os.path.exists(path):
    return None, None
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  diff = provenance.first_difference(manifest.get("inputs"), json.loads(json.dumps(inputs)))
  if diff:
    return None, f"inputs.{diff[0]} was {json.dumps(diff[1])[:80]}, now {json.dumps(diff[2])[:80]}"
  rows_path = os.path.join(suite_dir, f"{SPLIT}.jsonl")
  rows = _read_rows(rows_path) if os.path.exists(rows_path) else []
  if rel.fingerprint(rows) != manifest.get("suite_fingerprint"):
    return None, f"{rows_path} does not have the fingerprint its manifest records"
  return rows, manifest


def build_suite(config, suite_dir):
  """(suite rows, manifest, oracle): reused from suite_dir when provably the same, else built."""
  rows, oracle, data_dir, split = _source(config)
  inputs = suite_inputs(config, rows)
  suite, found = _reusable(suite_dir, inputs)
  if suite is not None:
    return suite, found, oracle
  if found is not None and jax.process_index() == 0:
    print(f"eval: rebuilding the relational suite in {suite_dir}: {found}", flush=True)
  suite, manifest = rel.make_suite(rows, oracle, seed=inputs["seed"],
                                   part_sources=part_sources(config, len(rows)),
                                   return_manifest=True)
  manifest["source"].update(data_dir=os.path.abspath(data_dir), split=split)
  manifest.update(inputs=inputs, suite_fingerprint=rel.fingerprint(suite))
  if jax.process_index() == 0:
    rel.write_suite(suite_dir, suite, manifest)
  if not suite:
    raise saferec.SafeRecDataError(f"the relational suite of {data_dir} ({split}) is empty")
  # As read back from the file (tuples become lists), so both paths give equal rows.
  return [json.loads(json.dumps(r, ensure_ascii=False)) for r in suite], manifest, oracle


def prompt_settings(config, lengths):
  """(max_prompt_length, buckets) for suite prompts of these token lengths (module docstring)."""
  ev = config.eval
  limit = int(ev.relational_max_prompt_length)
  if limit <= 0:
    limit = max(int(ev.max_prompt_length), -(-max(lengths) // 64) * 64)
  buckets = tuple(int(b) for b in ev.relational_prompt_buckets)
  if not buckets:
    below = [int(b) for b in ev.prompt_buckets if int(b) < limit]
    top = max(below, default=0)
    buckets = tuple(below) + tuple(range(top + 128, limit, 128)) + (limit,)
  return limit, tuple(sorted(set(buckets)))


def _suite_config(config, tokenizer, prompts):
  """A copy of config with the suite's prompt settings; the prompts' token lengths."""
  lengths = [len(tokens.prompt_ids(tokenizer, p)) for p in prompts]
  limit, buckets = prompt_settings(config, lengths)
  cfg = config.replace(eval=config.eval.replace(max_prompt_length=limit, prompt_buckets=buckets))
  return cfg, lengths


def _write_generations(path, suite, row_to_prompt, done, parsed):
  with storage.open(path, "w", encoding="utf-8") as f:
    for n, row in enumerate(suite):
      pid = row_to_prompt[n]
      rec = {k: row.get(k) for k in _ROW_FIELDS}
      rec.update(row=n, prompt_id=pid, text=done[pid]["text"],
                 parsed=[[t, int(y)] for t, y in parsed[n]])
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def evaluate_model(config, target, suite, oracle, out_dir, *, mesh=None, rules=None,
                   progress=True, max_batches=None):
  """Generates on the suite, scores and writes the outputs of one checkpoint; its report."""
  pol = policy.load_policy(config, target.path, mesh, rules)
  prompts, row_to_prompt = gen.unique_prompts(suite)
  cfg, lengths = _suite_config(config, pol.tokenizer, prompts)
  ev = cfg.eval
  dp = 1 if mesh is None else shd.data_parallel_size(mesh)
  batch_size = -(-int(ev.batch_size) // dp) * dp
  header = runner.generation_header(cfg, target, suite, pol.tokenizer, batch_size)
  t0 = time.time()
  done = gen.generate_texts(
      pol.model_cfg, pol.params, pol.tokenizer, prompts, sampling=runner.eval_sampling(
          cfg, pol.tokenizer), batch_size=batch_size, max_prompt_length=int(ev.max_prompt_length),
      buckets=tuple(ev.prompt_buckets), raw_path=os.path.join(out_dir, runner.RAW), mesh=mesh,
      rules=rules, progress=progress, desc=f"relational {target.name}",
      max_batches=max_batches, header=header)
  if len(done) < len(prompts):
    return None  # interrupted on purpose (max_batches)
  stats = runner.generation_stats(done, len(prompts), t0)
  stats.update(max_prompt_length=int(ev.max_prompt_length), prompt_buckets=list(ev.prompt_buckets),
               longest_prompt=max(lengths))
  if stats["truncated_prompts"] and jax.process_index() == 0:
    print(f"relational {target.name}: {stats['truncated_prompts']} of {len(prompts)} suite "
          f"prompts were longer than {ev.max_prompt_length} tokens and cut from the left")
  texts = [done[row_to_prompt[n]]["text"] for n in range(len(suite))]
  parsed = parse_all(texts)
  report = {"checkpoint": {"name": target.name, "path": target.path, "kind": target.kind,
                           "step": target.step},
            "split": config.eval.split, "suite_fingerprint": rel.fingerprint(suite),
            "metrics": rel.report(parsed, suite, oracle, tuple(int(k) for k in ev.ks)),
            "generation": stats, "provenance": header}
  if jax.process_index() == 0:
    _write_generations(os.path.join(out_dir, runner.GENERATIONS), suite, row_to_prompt, done,
                       parsed)
    rep.write_json(os.path.join(out_dir, runner.REPORT), report)
  return report


def _target(name, spec):
  if isinstance(spec, runner.Target):
    return spec
  return runner.resolve_targets(spec)[-1]


def evaluate_relational(config, targets, workdir, *, split=None, mesh=None, rules=None,
                        progress=True):
  """Every target of {name: path | Target} on the suite (module docstring); {name: report}.

  Each report also holds "card": the paths write_card wrote (shared by all).
  """
  if not targets:
    raise ValueError("evaluate_relational: no model to evaluate")
  for name in targets:                     # names become folders: before any work
    storage.check_name(name, "model name")
    if name == SUITE_DIR:
      raise storage.UnsafePathError(f"model name {name!r} is the suite's own folder")
  if split is not None:
    storage.check_name(split, "split")
  config = config_lib.resolve(config)
  with run_lock.hold(workdir):
    if mesh is None:
      mesh, rules = shd.mesh_from_config(config)
    config = config_lib.override(config, "eval.split", split or config.eval.split)
    resolved = {n: _target(n, p) for n, p in targets.items()}  # errors before any work
    suite, _, oracle = build_suite(config, os.path.join(workdir, SUITE_DIR))
    reports = {}
    for name, target in resolved.items():
      out_dir = storage.confined(workdir, name)
      os.makedirs(out_dir, exist_ok=True)
      reports[name] = evaluate_model(config, target, suite, oracle, out_dir, mesh=mesh,
                                     rules=rules, progress=progress)
    k = CARD_K if CARD_K in tuple(int(x) for x in config.eval.ks) else int(max(config.eval.ks))
    paths = {}
    if jax.process_index() == 0:
      paths = rel.write_card({n: r["metrics"] for n, r in reports.items()}, workdir, k)
    for r in reports.values():
      r["card"] = paths
    return reports


def headline_table(reports, keys):
  """A Markdown table: one row per model, one column per relational metric key."""
  lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, r in reports.items():
    m = r.get("metrics", r)
    cells = [("-" if m.get(k) is None else
              f"{100 * m[k]:.2f}%" if k.startswith("svr") else f"{m[k]:.3f}") for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)

