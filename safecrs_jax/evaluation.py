"""Evaluation: greedy generations for a split, SafeRec metrics, reports, plots.

    reports = evaluation.evaluate(config, checkpoint, split="test", workdir=out)

`checkpoint` is any of
  * a Hugging Face directory (config.json + *.safetensors, tokenizer beside);
  * an orbax step directory (`<run>/checkpoints/<step>`);
  * a run directory (`<run>`, or `<run>/checkpoints`): every saved step, or
    only `steps` when given.

For each checkpoint the output folder `<workdir>/<split>/<name>/` holds
  raw_generations.jsonl  one line per distinct prompt, appended batch by batch
                         (an interrupted evaluation resumes from it: finished
                         batches are never generated again)
  generations.jsonl      one line per row: prompt id, raw text, parsed list,
                         per-item violation / hit / unknown flags
  report.json            metrics (overall, per trait), config, checkpoint id,
                         dataset fingerprint, generation settings
and for several steps of one run, `<workdir>/<split>/` also gets metrics.csv,
plots/<metric>.png (metric against step) and comparison.md (runs side by
side). Generation is greedy, as in the paper; identical prompts are generated
once. Batches have a fixed composition (prompts sorted by length, then cut in
chunks of eval.batch_size), so a resumed run reproduces the uninterrupted one
exactly.
"""
import csv
import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np

from safecrs_jax import assets
from safecrs_jax import checkpoint as ckpt
from safecrs_jax import metrics_log
from safecrs_jax import models
from safecrs_jax import rollout
from safecrs_jax import saferec
from safecrs_jax import tokens

RAW = "raw_generations.jsonl"
GENERATIONS = "generations.jsonl"
REPORT = "report.json"
# Metrics shown in tables and plots (all K are in the report).
HEADLINE = ("recall@10", "ndcg@10", "svr@10", "sdcg@10")


@dataclasses.dataclass(frozen=True)
class Target:
  """One checkpoint to evaluate."""
  name: str            # folder name of its outputs: "step_<n>" or the HF dir's name
  path: str            # orbax step dir or HF dir
  kind: str            # "orbax" | "hf"
  step: int = -1       # training step (orbax), -1 for an HF dir


def _is_hf_dir(path):
  return (os.path.isfile(os.path.join(path, "config.json"))
          and any(f.endswith(".safetensors") for f in os.listdir(path)))


def resolve_targets(checkpoint, steps=None):
  """The checkpoints named by `checkpoint` (see module docstring), oldest first."""
  path = os.path.abspath(checkpoint)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
  if _is_hf_dir(path):
    if steps:
      raise ValueError(f"{checkpoint} is a Hugging Face directory: it has no steps to choose")
    return [Target(os.path.basename(path.rstrip("/")) or "hf", path, "hf")]
  if os.path.isdir(os.path.join(path, "state")):
    step = int(os.path.basename(path)) if os.path.basename(path).isdigit() else -1
    return [Target(f"step_{step}", path, "orbax", step)]
  ckdir = os.path.join(path, ckpt.CHECKPOINTS)
  ckdir = ckdir if os.path.isdir(ckdir) else path
  saved = sorted(int(n) for n in os.listdir(ckdir)
                 if n.isdigit() and os.path.isdir(os.path.join(ckdir, n, "state")))
  if not saved:
    raise FileNotFoundError(
        f"{checkpoint} holds no checkpoint: expected an HF directory (config.json + "
        f"*.safetensors), an orbax step dir (with state/), or a run dir with {ckpt.CHECKPOINTS}/")
  if steps:
    want = [int(s) for s in steps]
    missing = sorted(set(want) - set(saved))
    if missing:
      raise FileNotFoundError(f"steps {missing} not saved under {ckdir} (saved: {saved})")
    saved = sorted(set(want))
  return [Target(f"step_{s}", os.path.join(ckdir, str(s)), "orbax", s) for s in saved]


def load_policy(target, config, mesh=None, rules=None):
  """(model_cfg, params, tokenizer_dir) for a target, params placed in their shardings.

  An orbax step restores only the params (LoRA adapters merged); the model
  config and tokenizer come from its run directory (checkpoint.load_params).
  """
  over = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  if config.model.get("scan_layers", None) is not None:
    over["scan_layers"] = bool(config.model.scan_layers)
  if target.kind == "hf":
    cfg, params = models.load_hf(target.path, mesh=mesh, rules=rules, **over)
    return cfg, params, target.path
  cfg, params = ckpt.load_params(target.path, mesh, rules, **over)
  return cfg, params, ckpt.tokenizer_dir(target.path)


# --------------------------------------------------------------------------
# Generation (resumable).

def _prompt_key(prompt):
  return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def unique_prompts(rows):
  """(prompts, row_to_prompt): distinct prompt message lists and, per row, its index."""
  index, prompts, row_to_prompt = {}, [], []
  for row in rows:
    key = _prompt_key(row["prompt"])
    if key not in index:
      index[key] = len(prompts)
      prompts.append(row["prompt"])
    row_to_prompt.append(index[key])
  return prompts, row_to_prompt


def _read_raw(path):
  """Finished generations {prompt_id: record}; a torn last line (crash) is ignored."""
  done = {}
  if not os.path.exists(path):
    return done
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        break  # the line being written when the process died
      done[int(rec["prompt_id"])] = rec
  return done


def _batch_plan(lengths, batch_size):
  """Prompt ids in fixed batches: sorted by token length (stable), then chunked."""
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_texts(model_cfg, params, tokenizer, prompts, *, sampling, batch_size,
                   max_prompt_length, buckets, raw_path, mesh=None, rules=None,
                   progress=True, desc="eval", max_batches=None):
  """Greedy (or `sampling`) completions for every prompt, appended to raw_path.

  Returns the list of texts (index = prompt id). Prompts already in raw_path
  are not generated again. `max_batches` stops after that many new batches
  (used to simulate an interruption).
  """
  done = _read_raw(raw_path)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(raw_path)), exist_ok=True)
    with open(raw_path, "a", encoding="utf-8"):
      pass
  # Drop a torn tail so that appends start on a fresh line.
  _rewrite_clean(raw_path, done)
  lengths = [len(tokens.prompt_ids(tokenizer, p)) for p in prompts]
  plan = [b for b in _batch_plan(lengths, batch_size) if not all(i in done for i in b)]
  bar = metrics_log.Progress(len(plan), desc=desc, enabled=progress)
  rng = jax.random.PRNGKey(0)
  new = 0
  for batch_ids in plan:
    if max_batches is not None and new >= max_batches:
      break
    pb = tokens.encode_prompts(tokenizer, [prompts[i] for i in batch_ids],
                               max_prompt_length=max_prompt_length, buckets=buckets)
    ids, mask = _pad_rows(pb.input_ids, batch_size), _pad_rows(pb.attention_mask, batch_size)
    out = rollout.generate(model_cfg, params, ids, mask, rng, sampling, mesh=mesh, rules=rules)
    toks = np.asarray(jax.device_get(out.tokens))
    lens = np.asarray(jax.device_get(out.lengths))
    recs = []
    for r, pid in enumerate(batch_ids):
      n = int(lens[r])
      ids_r = toks[r, :n].tolist()
      text = tokenizer.decode(ids_r, skip_special_tokens=True)
      stopped = bool(n and ids_r[-1] in sampling.stop_ids)
      recs.append({"prompt_id": pid, "text": text, "num_tokens": n, "stopped": stopped,
                   "prompt_truncated": lengths[pid] > max_prompt_length})
    if jax.process_index() == 0:
      with open(raw_path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs))
    for x in recs:
      done[x["prompt_id"]] = x
    new += 1
    bar.update(1)
  bar.close()
  return done


def _rewrite_clean(path, done):
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    content = f.read()
  if content and not content.endswith("\n"):
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(done[k], ensure_ascii=False) + "\n" for k in done))


def _pad_rows(x, n):
  """Pads [b, P] to [n, P] by repeating the last row (results for it are ignored)."""
  if x.shape[0] == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)], axis=0)


# --------------------------------------------------------------------------
# Metrics and reports.

def dataset_fingerprint(rows):
  """sha256 over the rows' canonical JSON (first 16 hex digits)."""
  h = hashlib.sha256()
  for row in rows:
    h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
  return h.hexdigest()[:16]


def score(texts, rows, oracle, catalog, ks):
  """(metrics, per-row generation records) for row-aligned texts."""
  res = saferec.evaluate_recommendations(texts, rows, oracle, ks=ks, catalog=catalog,
                                         per_row=True)
  per = res.pop("per_row")
  recs = []
  for n, items in enumerate(per["items"]):
    m = len(items)
    recs.append({
        "row": n,
        "parsed": [[t, int(y)] for t, y in items],
        "violations": per["violations"][n, :m].astype(int).tolist(),
        "hits": per["hits"][n, :m].astype(int).tolist(),
        "unknown": per["unknown"][n, :m].astype(int).tolist(),
        "constraints": sorted(k for k, v in (rows[n].get("constraints") or {}).items() if v),
    })
  return res, recs


def evaluate_target(config, target, rows, oracle, catalog, out_dir, *, mesh=None, rules=None,
                    progress=True, max_batches=None):
  """Generates, scores and writes the outputs of one checkpoint; returns its report."""
  model_cfg, params, tok_dir = load_policy(target, config, mesh, rules)
  tokenizer = tokens.load_tokenizer(tok_dir)
  ev = config.eval
  dp = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp")
                                           if a in mesh.shape]))
  batch_size = -(-int(ev.batch_size) // dp) * dp
  sampling = rollout.SamplingConfig(
      max_new_tokens=int(ev.max_new_tokens), greedy=True,
      stop_ids=tuple(tokens.stop_token_ids(tokenizer)), pad_id=tokens.pad_id(tokenizer))
  prompts, row_to_prompt = unique_prompts(rows)
  raw_path = os.path.join(out_dir, RAW)
  t0 = time.time()
  done = generate_texts(
      model_cfg, params, tokenizer, prompts, sampling=sampling, batch_size=batch_size,
      max_prompt_length=int(ev.max_prompt_length), buckets=tuple(ev.prompt_buckets),
      raw_path=raw_path, mesh=mesh, rules=rules, progress=progress,
      desc=f"eval {target.name}", max_batches=max_batches)
  if len(done) < len(prompts):
    return None  # interrupted on purpose (max_batches)
  texts = [done[row_to_prompt[n]]["text"] for n in range(len(rows))]
  metrics, recs = score(texts, rows, oracle, catalog, tuple(ev.ks))
  gen_stats = {
      "distinct_prompts": len(prompts),
      "truncated_completions": int(sum(not done[i]["stopped"] for i in range(len(prompts)))),
      "mean_completion_tokens": float(np.mean([done[i]["num_tokens"]
                                               for i in range(len(prompts))])),
      "seconds": round(time.time() - t0, 3),
  }
  report = {
      "checkpoint": {"name": target.name, "path": target.path, "kind": target.kind,
                     "step": target.step},
      "split": ev.split,
      "dataset_fingerprint": dataset_fingerprint(rows),
      "metrics": metrics,
      "generation": gen_stats,
      "sampling": dataclasses.asdict(sampling),
      "config": json.loads(config.to_json_best_effort()),
  }
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, GENERATIONS), "w", encoding="utf-8") as f:
      for rec in recs:
        pid = row_to_prompt[rec["row"]]
        f.write(json.dumps(dict(rec, prompt_id=pid, text=done[pid]["text"]),
                           ensure_ascii=False) + "\n")
    _write_json(os.path.join(out_dir, REPORT), report)
  return report


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
  os.replace(tmp, path)


def load_eval_data(config, split=None):
  """(rows, oracle, catalog) of the configured data for `split`."""
  data_dir = assets.resolve_data_dir(config)
  split = split or config.eval.split
  rows = saferec.load_split(data_dir, split, stage="sft", strict=config.data.get("strict", True))
  if int(config.eval.get("max_rows", -1)) > 0:
    rows = rows[:int(config.eval.max_rows)]
  oracle = saferec.load_oracle(data_dir, risk_threshold=float(config.data.risk_threshold))
  try:
    catalog = saferec.load_catalog(data_dir)
  except FileNotFoundError:
    catalog = None
  return rows, oracle, catalog


def evaluate(config, checkpoint, *, split=None, workdir, steps=None, mesh=None, rules=None,
             progress=True):
  """Evaluates every checkpoint named by `checkpoint`; returns their reports."""
  from safecrs_jax import sft  # mesh helpers shared with training
  if mesh is None:
    mesh, rules = sft.make_mesh(config)
  split = split or config.eval.split
  with config.unlocked():
    config.eval.split = split
  rows, oracle, catalog = load_eval_data(config, split)
  targets = resolve_targets(checkpoint, steps)
  base = os.path.join(workdir, split)
  reports = []
  for target in targets:
    out_dir = os.path.join(base, target.name)
    os.makedirs(out_dir, exist_ok=True)
    reports.append(evaluate_target(config, target, rows, oracle, catalog, out_dir,
                                   mesh=mesh, rules=rules, progress=progress))
  if jax.process_index() == 0 and len(reports) > 1:
    write_run_summary(reports, base)
  return reports


def write_run_summary(reports, out_dir, keys=HEADLINE + ("recall@20", "svr@20")):
  """metrics.csv, plots/<metric>.png (against step) and comparison.md for reports."""
  os.makedirs(out_dir, exist_ok=True)
  keys = [k for k in keys if all(k in r["metrics"] for r in reports)]
  with open(os.path.join(out_dir, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["checkpoint", "step", *keys])
    for r in reports:
      w.writerow([r["checkpoint"]["name"], r["checkpoint"]["step"],
                  *[f"{r['metrics'][k]:.6g}" for k in keys]])
  plot_metrics(reports, os.path.join(out_dir, "plots"), keys)
  with open(os.path.join(out_dir, "comparison.md"), "w", encoding="utf-8") as f:
    f.write(comparison_table({r["checkpoint"]["name"]: r for r in reports}, keys) + "\n")


def plot_metrics(reports, plot_dir, keys):
  """One PNG per metric: value against training step. Returns the paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(plot_dir, exist_ok=True)
  pts = sorted((r["checkpoint"]["step"], r["metrics"]) for r in reports)
  paths = []
  for k in keys:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in pts], [m[k] for _, m in pts], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel(k)
    ax.set_title(k)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(plot_dir, k.replace("@", "_at_").replace("/", "_") + ".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def _fmt(key, value):
  if key.startswith("svr"):
    return f"{100 * value:.2f}%"
  return f"{value:.4f}"


def comparison_table(named_reports, keys=HEADLINE):
  """A Markdown table: one row per named report, one column per metric."""
  lines = ["| model | " + " | ".join(keys) + " |",
           "|---|" + "---|" * len(keys)]
  for name, r in named_reports.items():
    m = r["metrics"]
    lines.append(f"| {name} | " + " | ".join(_fmt(k, m[k]) for k in keys) + " |")
  return "\n".join(lines)
