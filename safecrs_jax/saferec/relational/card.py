"""The relational report card: reports of several runs side by side, as Markdown and plots.

`write_card(named_reports, out_dir, k=10)` writes
  relational.json        {run name: report dict}
  card.md                one table per question (rows: metrics; columns: runs)
  svr_vs_turns.png       SVR@K against turn distance, solid; the reminder control dashed
  svr_by_disclosure.png  SVR@K per disclosure type, one bar per run
  svr_by_constraints.png SVR@K against the number of sensitivities
SVR and coverage are shown as percentages; a metric a report lacks is "-".
"""
from __future__ import annotations

import json
import os
import re

from safecrs_jax.infra import storage
from safecrs_jax.saferec.relational.suite import DISCLOSURES

QUESTIONS = (
    "Does it respect what I said, however I said it?",
    "Does it remember?",
    "Several at once",
    "Safe because of me, or bland?",
    "Can others talk it out of my constraint, and does it honour my own change of mind?",
)
PLOTS = ("svr_vs_turns.png", "svr_by_disclosure.png", "svr_by_constraints.png")


def _numbers(reports, pattern):
  """Sorted ints n for which some report has a key matching `pattern` (one (\\d+) group)."""
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for r in reports for key in r if (m := rx.fullmatch(key))})


def question_keys(reports, k: int = 10) -> list[list[tuple[str, str]]]:
  """Per question, the (label, metric key) rows of its table."""
  distances = _numbers(reports, rf"svr@{k}/turns=(\d+)")
  counts = _numbers(reports, rf"svr@{k}/constraints=(\d+)")
  q1 = [(f"SVR@{k} {d}", f"svr@{k}/disclosure={d}") for d in DISCLOSURES]
  q1 += [(f"SVR@{k} {d}, set {s}", f"svr@{k}/disclosure={d}/set={s}")
         for d in DISCLOSURES for s in "AB"]
  q1 += [(f"SVR@{k} set A (trained-on wording)", f"svr@{k}/set=A"),
         (f"SVR@{k} set B (unseen wording)", f"svr@{k}/set=B"),
         (f"paraphrase gap@{k} (B - A)", f"paraphrase_gap@{k}")]
  q2 = [(f"SVR@{k} {d} turns back", f"svr@{k}/turns={d}") for d in distances]
  q2 += [(f"SVR@{k} {d} turns back, reminded", f"svr@{k}/turns={d}/reminder") for d in distances]
  q3 = [(f"SVR@{k} with {n}", f"svr@{k}/constraints={n}") for n in counts]
  q3 += [(f"coverage@{k} with {n}", f"coverage@{k}/constraints={n}") for n in counts]
  q3 += [(f"coverage@{k} (all)", f"coverage@{k}")]
  q4 = [(f"SVR@{k} (all constrained rows)", f"svr@{k}"),
        (f"CRG@{k} (neutral - constrained hazard share)", f"crg@{k}"),
        (f"CRG@{k} normalised", f"crg_norm@{k}"), (f"over-filtering OFR@{k}", f"ofr@{k}"),
        (f"decoy rate@{k}", f"decoy_rate@{k}"), (f"safe recall@{k}", f"safe_recall@{k}"),
        (f"safe NDCG@{k}", f"safe_ndcg@{k}"), ("mean list length", "list_length/mean"),
        ("mean list length, constrained", "list_length/mean/constrained"),
        ("mean list length, unconstrained", "list_length/mean/unconstrained"),
        ("empty lists", "list_length/empty_rate")]
  q5 = [(f"spoof resistance@{k}", f"spoof_resistance@{k}"),
        (f"SVR@{k} after a spoof", f"svr@{k}/turns=spoof"),
        (f"revoke compliance@{k}", f"revoke_compliance@{k}")]
  q5 += [(f"revoke compliance@{k}, {d} turns back", f"revoke_compliance@{k}/turns={d}")
         for d in distances]
  return [q1, q2, q3, q4, q5]


def _fmt(key, value) -> str:
  if value is None:
    return "-"
  if key.startswith(("svr", "coverage", "paraphrase_gap")):
    return f"{100 * value:.1f}%"
  return f"{value:.3f}"


def card_markdown(named_reports: dict, k: int = 10) -> str:
  """The Markdown card: a title, then one table per question."""
  names = list(named_reports)
  reports = list(named_reports.values())
  lines = [f"# Relational safety report card (K = {k})", ""]
  for question, rows in zip(QUESTIONS, question_keys(reports, k)):
    rows = [(label, key) for label, key in rows if any(key in r for r in reports)]
    lines += [f"## {question}", "", "| metric | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(_fmt(key, r.get(key)) for r in reports) + " |"
              for label, key in rows]
    lines.append("")
  return "\n".join(lines)


def _plot(path, draw):
  import matplotlib  # optional dependency: only for the plots
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.6))
  draw(ax)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_plots(named_reports: dict, out_dir: str, k: int = 10) -> list[str]:
  """The three PNGs of the module docstring; returns their paths."""
  reports = list(named_reports.values())
  distances = _numbers(reports, rf"svr@{k}/turns=(\d+)")
  counts = _numbers(reports, rf"svr@{k}/constraints=(\d+)")

  def series(r, fmt, xs):
    pts = [(x, 100 * r[fmt.format(x)]) for x in xs if fmt.format(x) in r]
    return [p[0] for p in pts], [p[1] for p in pts]

  def turns(ax):
    for j, (name, r) in enumerate(named_reports.items()):
      color = f"C{j}"
      ax.plot(*series(r, f"svr@{k}/turns={{}}", distances), marker="o", color=color, label=name)
      ax.plot(*series(r, f"svr@{k}/turns={{}}/reminder", distances), marker="x", ls="--",
              color=color, label=f"{name} (reminded)")
    ax.set_xlabel("turn distance")
    ax.set_ylabel(f"SVR@{k} (%)")
    ax.set_title("Does it remember?")

  def disclosure(ax):
    width = 0.8 / max(len(named_reports), 1)
    for j, (name, r) in enumerate(named_reports.items()):
      ax.bar([i + j * width for i in range(len(DISCLOSURES))],
             [100 * r.get(f"svr@{k}/disclosure={d}", 0.0) for d in DISCLOSURES], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(DISCLOSURES))], DISCLOSURES)
    ax.set_ylabel(f"SVR@{k} (%)")
    ax.set_title("SVR by disclosure")

  def constraints(ax):
    for name, r in named_reports.items():
      ax.plot(*series(r, f"svr@{k}/constraints={{}}", counts), marker="o", label=name)
    ax.set_xlabel("number of sensitivities")
    ax.set_ylabel(f"SVR@{k} (%)")
    ax.set_title("Several at once")

  os.makedirs(out_dir, exist_ok=True)
  return [_plot(os.path.join(out_dir, name), draw)
          for name, draw in zip(PLOTS, (turns, disclosure, constraints))]


def write_card(named_reports, out_dir: str, k: int = 10) -> dict:
  """relational.json, card.md and the plots for {run name: report} (or (name, report)
  pairs) in `out_dir`; returns {"json", "card", "plots"} paths."""
  named = dict(named_reports)
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "relational.json"),
           "card": os.path.join(out_dir, "card.md")}
  with storage.open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(named, f, indent=1, sort_keys=True)
  with storage.open(paths["card"], "w", encoding="utf-8") as f:
    f.write(card_markdown(named, k))
  paths["plots"] = write_plots(named, out_dir, k)
  return paths
