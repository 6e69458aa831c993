"""Scoring and reports: metrics of saved generations, report files, tables and plots.

    metrics, records = score(texts, rows, oracle, catalog, ks)
    write_run_summary(reports, out_dir)         # metrics.csv, plots/, comparison.md
    plot_models({"sft": metrics, ...}, path)    # one bar per model
    print(comparison_table({"sft": report, ...}))
"""
import csv
import hashlib
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the headless backend)

from safecrs_jax import saferec  # noqa: E402
from safecrs_jax.infra import storage

# Metrics shown in tables and plots (all K are in the report).
HEADLINE = ("recall@10", "ndcg@10", "svr@10", "sdcg@10")


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


def write_json(path, obj):
  storage.write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_run_summary(reports, out_dir, keys=HEADLINE + ("recall@20", "svr@20")):
  """metrics.csv, plots/<metric>.png (against step) and comparison.md for reports."""
  storage.makedirs(out_dir)
  keys = [k for k in keys if all(k in r["metrics"] for r in reports)]
  with storage.open(os.path.join(out_dir, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["checkpoint", "step", *keys])
    for r in reports:
      w.writerow([r["checkpoint"]["name"], r["checkpoint"]["step"],
                  *[f"{r['metrics'][k]:.6g}" for k in keys]])
  plot_metrics(reports, os.path.join(out_dir, "plots"), keys)
  with storage.open(os.path.join(out_dir, "comparison.md"), "w", encoding="utf-8") as f:
    f.write(comparison_table({r["checkpoint"]["name"]: r for r in reports}, keys) + "\n")


def plot_metrics(reports, plot_dir, keys):
  """One PNG per metric: value against training step. Returns the paths."""
  storage.makedirs(plot_dir)
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
    with storage.open(path, "wb") as f:   # a file object: works for gs:// too
      fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


_COLORS = ("#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd")


def plot_models(table, path):
  """Bar charts of the headline metrics, one bar per model ({name: metrics})."""
  keys = HEADLINE
  fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
  for ax, k in zip(axes, keys):
    colors = [_COLORS[i % len(_COLORS)] for i in range(len(table))]
    ax.bar(list(table), [table[n][k] for n in table], color=colors)
    ax.set_title(k)
    ax.tick_params(axis="x", labelrotation=30)
  fig.tight_layout()
  with storage.open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
  return path


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
