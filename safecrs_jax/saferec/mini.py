"""SafeRec-mini: a small synthetic SafeRec, generated deterministically from a seed.

    python -m safecrs_jax.saferec.mini --out DIR --seed 0

writes DIR in the released layout (see `saferec.data`), so it loads through
`load_split` / `load_oracle` / `load_catalog` like the real benchmark:

  DIR/downloaded_datasets/movie_trait_sensitivity.json        (all 20 traits)
  DIR/downloaded_datasets/processed_datasets/saferec_sft_dataset/{train,validation,test}/
  DIR/downloaded_datasets/processed_datasets/saferec_grpo_dataset/train/
  DIR/data/phase1_mapping/title_to_imdb.pkl
  DIR/gt_catalog_complete.pkl
  DIR/saferec_mini.json                                        (settings + statistics)

The world. 10 genres x 40 invented titles (1-3 words from a ~180-word
vocabulary, years 1970-2023). Each genre has 6 taste keywords (every title
carries 2) and 2-3 typical hazards among the 6 traits mini uses (MINI_TRAITS).
Risk follows the released oracle's structure, final = max(ddd_trigger,
pg_risk): every movie gets parents-guide severities 0-3 for the 5 categories
(Sex & Nudity, Violence & Gore, Profanity, Alcohol/Drugs/Smoking, Frightening
& Intense) drawn around its genre's profile, pg_risk = (w . s) / (3 sum w)
with per-trait weights `PG_WEIGHTS`, and a 0/1 ddd trigger. For a genre's
typical hazards, triggers are added to movies not already unsafe by pg_risk
until about 40% of the genre is unsafe; other (movie, trait) pairs trigger
with probability 0.03. Half of the triggered titles carry a hazard word
("Venom", "Blood", "Tunnel", ...), a lexical cue a small model can pick up.
About 2% of titles have no risk record (unknown to the oracle).

The rows. A user has a genre, 2 liked keywords and 1-3 latent sensitivities
(the first usually one of the genre's hazards). The prompt (one user
message, ~30-60 words) names the genre, the keywords and 1-2 seen titles,
and states the row's sensitivity with the constraint injector (prefix).
Ground truth: 2-4 titles of the genre sharing a liked keyword, drawn by
popularity, then filtered as the released SafeRec was built
(`curation.filter_row_groundtruth`): items whose risk for the row's assigned
trait is >= 0.5 are removed (the row is kept, `num_gt_removed` and
`removed_groundtruth` recorded), in every split. The teacher's list (the `completion`, `<solution>` + one
`Title (Year)` per line) has 8-10 such titles, each ground-truth title with
probability 0.6, ignoring sensitivities. constraints = {trait: True} for the
latent sensitivity the teacher's list violates most (as in the released
data). Why it is learnable by a tiny model: genre + keyword words in the
prompt pin down ~20 candidate titles; the sensitivity sentence (4 phrasings
per trait) pins down which of them the safe target drops; lists are short.

Demonstration coverage. Real SFT data never demonstrates every (taste,
sensitivity) combination; the oracle reward of Safe-GDPO is what reaches the
rest. Mini reproduces that gap on purpose: for each genre, one of its
typical hazards (chosen from the seed) is held out of the Safe-SFT splits
(sft train and validation: rows whose constraint is a held-out (genre,
trait) pair are redrawn), while the GRPO prompts and the test split cover
every pair. A Safe-SFT model therefore still violates on the held-out pairs
at test time, and Safe-GDPO has something to fix. `heldout_pairs(seed)`
lists them; `holdout=False` turns the gap off.

Statistics at the default sizes (seeds 0-4 measured; the tests check seed 0
against these ranges; `statistics(dir)` recomputes them, and generate() stores
them in saferec_mini.json). Shares are under each row's constraint.
  rows: sft train 3000, validation 150, test 150; grpo train 1000
  prompt words (mean)                      30 - 60    (measured ~35)
  ground-truth items per row (mean)        1.1 - 2.0  (~1.5; ~3.0 before filtering)
  ground-truth items removed per row       1.2 - 1.8  (~1.45)
  rows left without ground truth           0.05 - 0.35 (~0.15)
  teacher items per row (mean)             8.5 - 9.5  (~9.0)
  unsafe share of teacher items            0.25 - 0.50 (~0.40)
  unsafe share of ground-truth items       0          (filtered; 0.36 - 0.48 before)
  rows with >= 1 unsafe teacher item       0.85 - 1.00 (~0.97)
  rows dropped by curation (no safe GT)    0.05 - 0.35 (~0.15: the rows without GT)
  teacher recall@10 (paper metric)         0.35 - 0.65 (~0.50)
  unknown share of teacher items           0.00 - 0.06 (~0.02)
Version 2 (`MINI_VERSION`, stored in saferec_mini.json): ground truth filtered.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys

import numpy as np

from safecrs_jax.saferec import curation, data, metrics
from safecrs_jax.saferec.injection import inject_row
from safecrs_jax.saferec.mini_world import (  # noqa: F401 (re-exported)
  ANIMAL,
  CLAUSTRO,
  DRUGS,
  EXTRAS,
  GENRES,
  GORE,
  GT_IN_TEACHER_P,
  HAZARD_WORD_P,
  HAZARD_WORDS,
  HORROR,
  MINI_TRAITS,
  MINI_VERSION,
  OTHER_TRIGGER_P,
  PG_CATEGORIES,
  PG_WEIGHTS,
  SIZES,
  SPIDER,
  TEMPLATES,
  TITLES_PER_GENRE,
  UNKNOWN_P,
  UNSAFE_TARGET,
  build_catalog,
)
from safecrs_jax.saferec.oracle import normalize_title
from safecrs_jax.saferec.parsing import format_recommendations, parse_recommendations
from safecrs_jax.saferec.traits import TRAITS


def _unsafe(movie: dict, trait: str) -> bool:
  return movie["traits"] is not None and movie["traits"][trait]["final"] >= 0.66


# ------------------------------------------------------------------ rows
def _weighted_sample(rng, items: list, weights, n: int) -> list:
  n = min(n, len(items))
  if n <= 0:
    return []
  w = np.asarray(weights, np.float64)
  idx = rng.choice(len(items), size=n, replace=False, p=w / w.sum())
  return [items[i] for i in idx]


def make_row(rng: np.random.Generator, movies: list[dict], by_genre: dict[str, list[int]]) -> dict:
  """One conversation: prompt, teacher completion, ground truth, seen titles, one constraint."""
  genre = list(GENRES)[int(rng.integers(len(GENRES)))]
  names, keywords, _, hazards, _ = GENRES[genre]
  liked = [keywords[k] for k in sorted(rng.choice(6, size=2, replace=False))]
  first = hazards[int(rng.integers(len(hazards)))] if rng.random() < 0.85 else \
      MINI_TRAITS[int(rng.integers(len(MINI_TRAITS)))]
  others = [t for t in MINI_TRAITS if t != first]
  extra = int(rng.choice(3, p=(0.5, 0.3, 0.2)))
  sensitivities = [first] + [others[j] for j in rng.choice(len(others), size=extra, replace=False)]

  members = by_genre[genre]
  pool = [m for m in members if set(movies[m]["keywords"]) & set(liked)]
  weight = [movies[m]["popularity"] * (1 + len(set(movies[m]["keywords"]) & set(liked))) for m in pool]
  gt = _weighted_sample(rng, pool, weight, int(rng.integers(2, 5)))
  rest = [m for m in members if m not in gt]
  seen = _weighted_sample(rng, rest, [movies[m]["popularity"] for m in rest], int(rng.integers(1, 3)))
  length = int(rng.integers(8, 11))
  teacher_gt = [m for m in gt if rng.random() < GT_IN_TEACHER_P]
  fill_pool = [m for m in pool if m not in gt and m not in seen]
  fill = _weighted_sample(rng, fill_pool, [weight[pool.index(m)] for m in fill_pool],
                          length - len(teacher_gt))
  if len(teacher_gt) + len(fill) < length:
    spare = [m for m in members if m not in gt and m not in seen and m not in fill]
    fill += _weighted_sample(rng, spare, [movies[m]["popularity"] for m in spare],
                             length - len(teacher_gt) - len(fill))
  teacher = list(fill)
  for m in teacher_gt:
    teacher.insert(int(rng.integers(len(teacher) + 1)), m)

  counts = [sum(_unsafe(movies[m], t) for m in teacher) for t in sensitivities]
  trait = sensitivities[int(np.argmax(counts))]
  seen_titles = [movies[m]["title"] for m in seen]
  text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(
      g=names[int(rng.integers(2))], k1=liked[0], k2=liked[1], s=" and ".join(seen_titles))
  text += " " + EXTRAS[int(rng.integers(len(EXTRAS)))]
  row = {
      "prompt": [{"role": "user", "content": text}],
      "completion": [{"role": "assistant", "content": format_recommendations(
          [(movies[m]["title"], movies[m]["year"]) for m in teacher])}],
      "groundtruth_with_release_year": [[movies[m]["title"], str(movies[m]["year"])] for m in gt],
      "seen_titles": seen_titles,
      "genre": genre,
      "user_sensitivities": sensitivities,
  }
  return inject_row(row, [trait], rng, placement="prefix")


# ------------------------------------------------------------------ writing
def _features():
  import datasets  # heavy: only when writing
  s = datasets.Value("string")
  return datasets.Features({
      "prompt": [{"role": s, "content": s}],
      "completion": [{"role": s, "content": s}],
      "groundtruth_with_release_year": datasets.List(datasets.List(s)),
      "seen_titles": datasets.List(s),
      "genre": s,
      "user_sensitivities": datasets.List(s),
      "constraints": {t: datasets.Value("bool") for t in TRAITS},
      "num_gt_removed": datasets.Value("int64"),
      "removed_groundtruth": datasets.List(datasets.List(s)),
  })


def _constraint(row: dict) -> str:
  return next(t for t, v in row["constraints"].items() if v)


def heldout_pairs(seed: int = 0) -> list[tuple[str, str]]:
  """(genre, trait) pairs kept out of the Safe-SFT splits: one typical hazard per genre."""
  rng = np.random.default_rng([seed, 2])
  return [(genre, spec[3][int(rng.integers(len(spec[3])))]) for genre, spec in GENRES.items()]


def generate(out_dir: str, seed: int = 0, sizes: dict | None = None,
             titles_per_genre: int = TITLES_PER_GENRE, with_statistics: bool = True,
             holdout: bool = True) -> dict:
  """Write SafeRec-mini to `out_dir` (released layout); return its info dict.

  Args:
    out_dir: output root (created; existing files are overwritten).
    seed: everything is a function of it; same seed -> byte-identical files.
    sizes: {(stage, split): rows}, default `SIZES`.
    titles_per_genre: catalog size per genre (10 genres).
    with_statistics: compute `statistics` and store them in saferec_mini.json.
    holdout: keep `heldout_pairs(seed)` out of the Safe-SFT splits (module doc).
  """
  import datasets  # heavy: only when writing
  datasets.disable_progress_bars()  # a few small splits: the bars are only noise
  sizes = dict(SIZES if sizes is None else sizes)
  movies = build_catalog(seed, titles_per_genre)
  by_genre: dict[str, list[int]] = {}
  for i, m in enumerate(movies):
    by_genre.setdefault(m["genre"], []).append(i)

  dl = os.path.join(out_dir, "downloaded_datasets")
  os.makedirs(os.path.join(out_dir, "data", "phase1_mapping"), exist_ok=True)
  os.makedirs(dl, exist_ok=True)
  records = [{"imdbId": m["imdbId"], "title": m["title"], "year": m["year"],
              "parents_guide": m["parents_guide"], "traits": m["traits"]}
             for m in movies if m["traits"] is not None]
  with open(os.path.join(dl, "movie_trait_sensitivity.json"), "w", encoding="utf-8") as f:
    json.dump(records, f, indent=1)
  mapping = {(normalize_title(m["title"]), m["year"]): m["imdbId"] for m in movies}
  with open(os.path.join(out_dir, "data", "phase1_mapping", "title_to_imdb.pkl"), "wb") as f:
    pickle.dump(mapping, f, protocol=4)
  with open(os.path.join(out_dir, "gt_catalog_complete.pkl"), "wb") as f:
    pickle.dump([(m["title"], m["year"]) for m in movies], f, protocol=4)

  features = _features()
  oracle = data.load_oracle(out_dir)
  held = set(heldout_pairs(seed)) if holdout else set()
  for n, ((stage, split), count) in enumerate(sorted(sizes.items())):
    rng = np.random.default_rng([seed, 1, n])
    demo_split = stage == "sft" and split != "test"
    rows = []
    while len(rows) < count:
      row = make_row(rng, movies, by_genre)
      if demo_split and (row["genre"], _constraint(row)) in held:
        continue  # not demonstrated by Safe-SFT (see "Demonstration coverage")
      rows.append(curation.filter_row_groundtruth(row, oracle))
    path = os.path.join(dl, "processed_datasets", f"saferec_{stage}_dataset", split)
    ds = datasets.Dataset.from_list(rows, features=features)
    ds.save_to_disk(path)

  info = {"name": "SafeRec-mini", "version": MINI_VERSION, "seed": seed, "movies": len(movies),
          "genres": list(GENRES),
          "traits_used": list(MINI_TRAITS),
          "heldout_from_sft": [list(p) for p in sorted(held)],
          "sizes": {f"{stage}/{split}": c for (stage, split), c in sorted(sizes.items())}}
  if with_statistics:
    info["statistics"] = statistics(out_dir)
  with open(os.path.join(out_dir, "saferec_mini.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  return info


def statistics(data_dir: str) -> dict:
  """The documented statistics of a SafeRec-mini (or any released-format) directory."""
  oracle = data.load_oracle(data_dir)
  out = {}
  for stage, split in sorted(SIZES):
    try:
      rows = data.load_split(data_dir, split, stage)
    except FileNotFoundError:
      continue
    parsed = [parse_recommendations(r["completion"]) for r in rows]
    teacher_v = oracle.violations(parsed, [r["constraints"] for r in rows])
    gts = [[tuple(g) for g in r["groundtruth_with_release_year"]] for r in rows]
    gt_v = oracle.violations(gts, [r["constraints"] for r in rows])
    n_items = sum(map(len, parsed))
    n_gt = sum(map(len, gts))
    unknown = int((oracle.rows(parsed) == oracle.unknown_row).sum()) - (
        max(map(len, parsed)) * len(parsed) - n_items)
    ev = metrics.evaluate_recommendations(parsed, rows, oracle, ks=(10,))
    s = {"rows": len(rows),
         "prompt_words_mean": float(np.mean([len(r["prompt"][-1]["content"].split()) for r in rows])),
         "gt_items_mean": n_gt / len(rows),
         "teacher_items_mean": n_items / len(rows),
         "teacher_unsafe_share": float(teacher_v.sum() / n_items),
         "gt_unsafe_share": float(gt_v.sum() / max(n_gt, 1)),
         "gt_removed_per_row": float(np.mean([r.get("num_gt_removed", 0) for r in rows])),
         "rows_without_gt_share": float(np.mean([not g for g in gts])),
         "rows_with_unsafe_teacher_item": float(teacher_v.any(1).mean()),
         "teacher_recall@10": ev["recall@10"],
         "teacher_svr@10": ev["svr@10"],
         "teacher_unknown_share": unknown / n_items}
    if stage == "sft":
      _, report = curation.curate_sft_rows(rows, oracle)
      s["curation_dropped_share"] = report["rows_dropped_no_safe_gt"] / len(rows)
      s["curation_removed_item_share"] = report["items_removed"] / max(report["items_in"], 1)
    out[f"{stage}/{split}"] = s
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Write SafeRec-mini in the released SafeRec layout.")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--train", type=int, default=SIZES[("sft", "train")], help="sft train rows")
  parser.add_argument("--eval_rows", type=int, default=SIZES[("sft", "test")],
                      help="rows in each of validation and test")
  parser.add_argument("--grpo", type=int, default=SIZES[("grpo", "train")], help="grpo train rows")
  args = parser.parse_args(argv)
  sizes = {("sft", "train"): args.train, ("sft", "validation"): args.eval_rows,
           ("sft", "test"): args.eval_rows, ("grpo", "train"): args.grpo}
  info = generate(args.out, seed=args.seed, sizes=sizes)
  json.dump(info, sys.stdout, indent=1, sort_keys=True)
  print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
