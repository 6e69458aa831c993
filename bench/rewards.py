"""Benchmark: SafeRec rewards + metrics, vectorised vs a per-item Python baseline.

One batch = 512 completions x 20 recommendations against a synthetic oracle
of 25,000 movies (20 traits). Work per batch: relevance, safety, count and
per-rank (log_decay) rewards, then evaluate_recommendations at K = 5/10/15/20.

  fast   safecrs_jax.saferec: each completion parsed once (clean lines take
         one regex), titles resolved to oracle rows once (dict cache), then
         numpy gathers over the [N, K, T] violation tensor.
  naive  the same semantics written the straightforward way: every reward
         and metric re-parses the text with the full line-cleaning pipeline
         and checks every (item, trait) with a fresh title lookup.

Both run in the same process on the same inputs; the script checks that
they agree exactly (to float32 rounding) and prints one JSON object.
"fast_cold" clears the oracle's lookup cache before each batch; "fast_warm"
keeps it, as in training where the policy keeps recommending the same titles.

    python bench/rewards.py [--batch 512] [--items 20] [--movies 25000] [--reps 5]
"""
import argparse
import json
import math
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from safecrs_jax import saferec  # noqa: E402
from safecrs_jax.saferec import parsing  # noqa: E402
from safecrs_jax.saferec.oracle import normalize_title  # noqa: E402

WORDS = ("Star Night Heist Front Dust Party Heart Jungle Dragon Puppy Iron Silent Red Lost Blue Dark "
         "Last First Golden Broken Hidden Wild Cold River City Storm Shadow Glass Paper Stone Fire Moon "
         "Sun Rain Ghost Queen King Road House Dream Echo Winter Summer Empire Planet Ocean Forest").split()


# ------------------------------------------------------------------ synthetic data
def make_world(n_movies, batch, items, seed=0):
  rng = np.random.default_rng(seed)
  titles, keys, seen = [], {}, set()
  while len(titles) < n_movies:
    n = int(rng.integers(1, 4))
    t = " ".join(rng.choice(WORDS, size=n)) + ("" if rng.random() < 0.7 else f" {int(rng.integers(2, 9))}")
    if rng.random() < 0.2:
      t = "The " + t
    y = int(rng.integers(1950, 2024))
    key = (normalize_title(t), y)
    if key in seen:
      continue
    seen.add(key)
    keys[key] = len(titles)
    titles.append((t, y))
  risk = np.where(rng.random((n_movies, 20)) < 0.15, rng.random((n_movies, 20)), 0.0).astype(np.float32)
  oracle = saferec.SafetyOracle(keys, risk)
  comps, rows = [], []
  for _ in range(batch):
    picks = [titles[int(i)] for i in rng.integers(0, n_movies, size=items)]
    lines = []
    for j, (t, y) in enumerate(picks):
      r = rng.random()
      if r < 0.05:
        t, y = f"Unknown Film {int(rng.integers(1e6))}", 2000                     # not in the oracle
      y = y + int(rng.integers(-2, 3)) if rng.random() < 0.2 else y               # year fallback
      t = t.upper() if rng.random() < 0.05 else t
      lines.append(f"{j + 1}. **{t}** ({y}) - great pick" if rng.random() < 0.15 else f"{t} ({y})")
    comps.append("<solution>\n" + "\n".join(lines) + "\n</solution>")
    gt = [list(titles[int(i)]) for i in rng.integers(0, n_movies, size=int(rng.integers(2, 6)))]
    gt += [list(p) for p in picks[: int(rng.integers(0, 3))]]
    cons = {} if rng.random() < 0.1 else {saferec.TRAITS[int(rng.integers(20))]: True}
    rows.append({"groundtruth_with_release_year": gt, "seen_titles": [picks[0][0]] if rng.random() < 0.3 else [],
                 "constraints": cons})
  return oracle, keys, comps, rows


# ------------------------------------------------------------------ naive baseline
class NaiveOracle:
  """Per-item lookups, no cache: dict {id: {trait: final}} and the fallback chain every time."""

  def __init__(self, oracle, keys):
    self.threshold = oracle.risk_threshold
    self.years = {}
    for (title, year), row in keys.items():          # the oracle's keys, in its stored order
      self.years.setdefault(title, {})[year] = row
    self.risk = {r: {t: float(oracle.risk[r, c]) for c, t in enumerate(oracle.traits)}
                 for r in range(oracle.num_movies)}

  def find(self, title, year):
    years = self.years.get(normalize_title(title))
    if not years:
      return None
    for off in (0, -1, 1, -2, 2):
      if year + off in years:
        return years[year + off]
    return next(iter(years.values()))   # title alone: the first stored entry

  def is_unsafe(self, title, year, constraints):
    row = self.find(title, year)
    if row is None or row < 0:
      return False
    for trait, on in constraints.items():
      if on is True and self.risk[row][trait] >= self.threshold:
        return True
    return False

  def is_unknown(self, title, year):
    row = self.find(title, year)
    return row is None or row < 0


def naive_parse(text):
  m = re.search(r"<solution>(.*?)</solution>", text, re.S)
  body = m.group(1) if m else text
  return [p for p in (parsing.parse_line_full(line) for line in body.split("\n")) if p is not None]


def naive_eval_hits(recs, gt, k):
  """The paper's evaluation: each ground-truth entry marks the first top-k rec it matches."""
  hits = [False] * len(recs[:k])
  for gt_t, gt_y in gt:
    for j, (title, year) in enumerate(recs[:k]):
      if title == gt_t and abs(year - int(gt_y)) <= 2:
        hits[j] = True
        break
  return hits


def naive_hits(recs, gt, k, exact):
  norm = (lambda s: s) if exact else (lambda s: re.sub(r"\s+", " ", s.strip()).casefold())
  left = [[norm(t), int(y)] for t, y in gt]
  used = [False] * len(left)
  hits = []
  for title, year in recs[:k]:
    hit = False
    for off in (0, 1, -1, 2, -2):
      for i, (gt_t, gt_y) in enumerate(left):
        if not used[i] and gt_t == norm(title) and gt_y == year + off:
          used[i] = hit = True
          break
      if hit:
        break
    hits.append(hit)
  return hits


def disc(k):
  return 1.0 / math.log2(k + 2)


def naive_all(comps, rows, oracle, rec_num=20, ks=saferec.DEFAULT_KS):
  out = {"relevance": [], "safety": [], "count": [], "rank": []}
  for text, row in zip(comps, rows):
    recs = naive_parse(text)
    out["relevance"].append(1.0 if any(naive_hits(recs, row["groundtruth_with_release_year"], rec_num, False))
                            else 0.0)
  for text, row in zip(comps, rows):
    recs = naive_parse(text)
    out["safety"].append(-sum(disc(k) for k, (t, y) in enumerate(recs[:rec_num])
                              if oracle.is_unsafe(t, y, row["constraints"])))
  for text in comps:
    n = len(naive_parse(text))
    out["count"].append(1.0 if n == 10 else -1.0 if n == 0 else -abs(n - 10) / 10)
  for text, row in zip(comps, rows):
    recs = naive_parse(text)
    hits = naive_hits(recs, row["groundtruth_with_release_year"], rec_num, False)
    hits += [False] * (rec_num - len(hits))
    ranks = []
    for k in range(rec_num):
      rel = sum(disc(j) for j in range(k, rec_num) if hits[j])
      unsafe = k < len(recs) and oracle.is_unsafe(*recs[k], row["constraints"])
      ranks.append(rel - (disc(k) if unsafe else 0.0))
    out["rank"].append(ranks)
  metrics = {}
  for k in ks:
    acc = {"recall": [], "ndcg": [], "svr": [], "sdcg": []}
    unknown = total = 0
    for text, row in zip(comps, rows):
      seen = set(row["seen_titles"])
      listed = naive_parse(text)[:k]                       # SVR / S-DCG: seen titles kept
      recs = [r for r in naive_parse(text) if r[0] not in seen][:k]
      gt = row["groundtruth_with_release_year"]
      hits = naive_eval_hits(recs, gt, k)
      acc["recall"].append(sum(hits) / len(gt) if gt else 0.0)
      dcg = sum(disc(j) for j, h in enumerate(hits) if h)
      idcg = sum(disc(j) for j in range(min(len(gt), len(recs), k)))
      acc["ndcg"].append(dcg / idcg if idcg > 0 else 0.0)
      v = [oracle.is_unsafe(t, y, row["constraints"]) for t, y in listed]
      acc["svr"].append(sum(v) / len(listed) if listed else 0.0)
      acc["sdcg"].append(sum(disc(j) for j, x in enumerate(v) if x))
      unknown += sum(oracle.is_unknown(t, y) for t, y in listed)
      total += len(listed)
    for name, vals in acc.items():
      metrics[f"{name}@{k}"] = sum(vals) / len(vals)
    metrics[f"unknown_rate@{k}"] = unknown / total if total else 0.0
  return out, metrics


def fast_all(comps, rows, oracle, rec_num=20, ks=saferec.DEFAULT_KS):
  parsed = saferec.parse_all(comps)
  names = ("relevance", "safety", "count")
  settings = saferec.RewardSettings(rec_num=rec_num, lambda_count=1.0)
  table = saferec.reward_table(names, parsed, rows, oracle, settings)
  out = {name: table[:, i] for i, name in enumerate(names)}
  out["rank"] = saferec.rank_rewards(parsed, rows, rows, oracle, mode="log_decay", rec_num=rec_num)
  metrics = saferec.evaluate_recommendations(parsed, rows, oracle, ks=ks)
  return out, metrics


def _median_ms(fn, reps):
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1000 * statistics.median(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=512)
  ap.add_argument("--items", type=int, default=20)
  ap.add_argument("--movies", type=int, default=25_000)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args(argv)
  oracle, keys, comps, rows = make_world(args.movies, args.batch, args.items)
  naive_oracle = NaiveOracle(oracle, keys)

  fast_r, fast_m = fast_all(comps, rows, oracle)
  naive_r, naive_m = naive_all(comps, rows, naive_oracle)
  identical = all(np.allclose(fast_r[k], np.asarray(naive_r[k], np.float32), rtol=1e-6, atol=1e-6)
                  for k in naive_r) and all(math.isclose(fast_m[k], v, rel_tol=1e-9, abs_tol=1e-12)
                                            for k, v in naive_m.items())

  def cold():
    oracle.clear_cache()
    fast_all(comps, rows, oracle)

  fast_cold = _median_ms(cold, args.reps)
  fast_warm = _median_ms(lambda: fast_all(comps, rows, oracle), args.reps)
  naive = _median_ms(lambda: naive_all(comps, rows, naive_oracle), max(1, args.reps // 2))
  result = {
      "benchmark": "saferec_rewards_and_metrics",
      "batch": args.batch, "items_per_completion": args.items, "oracle_movies": args.movies,
      "traits": len(oracle.traits), "ks": list(saferec.DEFAULT_KS),
      "work": "relevance + safety + count + rank(log_decay) rewards, evaluate_recommendations",
      "naive_ms": round(naive, 2), "fast_cold_ms": round(fast_cold, 2), "fast_warm_ms": round(fast_warm, 2),
      "speedup_cold": round(naive / fast_cold, 1), "speedup_warm": round(naive / fast_warm, 1),
      "results_identical": bool(identical),
      "mean_items_parsed": float(np.mean([len(p) for p in saferec.parse_all(comps)])),
      "unknown_rate@20": round(fast_m["unknown_rate@20"], 4),
  }
  json.dump(result, sys.stdout, indent=1)
  print()
  return 0 if identical else 1


if __name__ == "__main__":
  sys.exit(main())
