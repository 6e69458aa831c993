"""SafeRec data: loaders (released layout, JSON lines, corrupt rows), tfds builder, SafeRec-mini."""
import filecmp
import json
import os
import pickle

import datasets
import numpy as np
import pytest

from safecrs_jax import saferec
from safecrs_jax.saferec import mini
from safecrs_jax.saferec.traits import TRAITS

GORE, HORROR = TRAITS[2], TRAITS[19]


def _good(i, **over):
  row = {
      "prompt": [{"role": "user", "content": f"I'm squeamish. Recommend thrillers {i}."}],
      "completion": [{"role": "assistant", "content": f"<solution>\nHeat ({1990 + i})\n</solution>"}],
      "groundtruth_with_release_year": [["Heat", str(1990 + i)], ["Alien", "1979"]],
      "seen_titles": ["Jaws"] if i % 2 else [],
      "constraints": {GORE: True} if i % 3 else {},
      "source": f"reddit-{i}",
  }
  row.update(over)
  return row


def _released_dir(root, rows_by_split, stage="sft"):
  base = os.path.join(root, "downloaded_datasets", "processed_datasets", f"saferec_{stage}_dataset")
  for split, rows in rows_by_split.items():
    datasets.Dataset.from_list(rows).save_to_disk(os.path.join(base, split))
  return root


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("released"))
  _released_dir(root, {"train": [_good(i) for i in range(6)], "test": [_good(i) for i in range(3)]})
  _released_dir(root, {"train": [{k: v for k, v in _good(i).items() if k != "completion"}
                                 for i in range(4)]}, stage="grpo")
  return root


def test_load_released_layout_normalises_rows(released):
  rows = saferec.load_split(released, "train")
  assert len(rows) == 6
  r = rows[1]
  assert r["completion"] == "<solution>\nHeat (1991)\n</solution>"      # message list -> text
  assert r["groundtruth_with_release_year"] == [["Heat", 1991], ["Alien", 1979]]
  assert r["constraints"] == {GORE: True}                              # Arrow's None keys dropped
  assert rows[0]["constraints"] == {} and r["seen_titles"] == ["Jaws"] and r["source"] == "reddit-1"
  # The same split reached from downloaded_datasets/ or the split directory itself.
  assert saferec.load_split(os.path.join(released, "downloaded_datasets"), "train") == rows
  grpo = saferec.load_split(released, "train", stage="grpo")
  assert len(grpo) == 4 and "completion" not in grpo[0]
  with pytest.raises(FileNotFoundError, match="no sft split 'validation'"):
    saferec.load_split(released, "validation")


def test_corrupt_rows_strict_and_lenient(tmp_path):
  rows = [_good(0), _good(1, seen_titles="Jaws"), _good(2), _good(3, constraints={GORE: "yes"}),
          _good(4, groundtruth_with_release_year=[["Heat", "soon"]]), _good(5)]
  for field in ("prompt",):
    bad = _good(6)
    del bad[field]
    rows.append(bad)
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
  with pytest.raises(saferec.SafeRecDataError,
                     match=r"train.jsonl row 1 \(line 2\) field 'seen_titles'"):
    saferec.load_split(str(tmp_path), "train")
  ok, rep = saferec.load_split(str(tmp_path), "train", strict=False, return_report=True)
  assert [r["source"] for r in ok] == ["reddit-0", "reddit-2", "reddit-5"]
  assert rep["rows_read"] == 8 and rep["rows_ok"] == 3 and rep["rows_skipped"] == 5
  joined = "\n".join(rep["errors"])
  for expect in ("row 1 (line 2) field 'seen_titles'",
                 "row 3 (line 4) field \"constraints['Anti-gore / squeamish']\"",
                 "row 4 (line 5) field 'groundtruth_with_release_year[0]'",
                 "row 6 (line 7) field 'prompt': missing", "row 7 (line 8): not valid JSON"):
    assert expect in joined, (expect, joined)


def test_corrupt_rows_in_released_format(tmp_path):
  rows = [_good(0), _good(1, prompt=[{"role": "user", "content": None}]), _good(2)]
  root = _released_dir(str(tmp_path), {"test": rows})
  with pytest.raises(saferec.SafeRecDataError, match=r"saferec_sft_dataset/test row 1 field 'prompt\[0\]'"):
    saferec.load_split(root, "test")
  ok, rep = saferec.load_split(root, "test", strict=False, return_report=True)
  assert len(ok) == 2 and rep["rows_skipped"] == 1
  with pytest.raises(saferec.SafeRecDataError, match="unknown trait 'Clowns'"):
    saferec.normalize_row(_good(1, constraints={"Clowns": True}), "x row 0")
  assert saferec.normalize_row(_good(1, constraints={"Clowns": True}), "x", traits=None)["constraints"] == {
      "Clowns": True}


def test_tfds_rows_equal_datasets_rows(tmp_path, released):
  from safecrs_jax.saferec import tfds_builder
  edge = tmp_path / "edge"
  edge.mkdir()
  rows = [_good(0, groundtruth_with_release_year=[], seen_titles=[], constraints={}),
          _good(1, completion="plain text", constraints={GORE: True, HORROR: False}),
          _good(2, extra_list=[1, 2], prompt=[{"role": "system", "content": ""},
                                              {"role": "user", "content": "ünïcode ✓"}])]
  (edge / "validation.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
  for source, splits in ((str(edge), ["validation"]), (released, ["train", "test"])):
    builder = tfds_builder.SafeRec(source_dir=source, config="sft", data_dir=str(tmp_path / "tfds" /
                                                                                 os.path.basename(source)))
    builder.download_and_prepare()
    for split in splits:
      assert tfds_builder.rows_from_tfds(builder, split) == saferec.load_split(source, split)


def test_oracle_and_catalog_loaders(tmp_path):
  root = tmp_path
  (root / "downloaded_datasets").mkdir()
  (root / "data" / "phase1_mapping").mkdir(parents=True)
  (root / "downloaded_datasets" / "movie_trait_sensitivity.json").write_text(json.dumps(
      [{"imdbId": "0000007", "traits": {GORE: {"final": 0.8, "ddd_trigger": 0.0, "pg_risk": 0.8}}}]))
  (root / "data" / "phase1_mapping" / "title_to_imdb.pkl").write_bytes(pickle.dumps({("heat", 1995): "tt0000007"}))
  (root / "gt_catalog_complete.pkl").write_bytes(pickle.dumps([("Heat", 1995), ("Alien", "1979")]))
  oracle = saferec.load_oracle(str(root))
  assert oracle.is_unsafe("Heat", 1995, {GORE: True}) and oracle.risk.shape == (1, 20)
  assert saferec.load_oracle(str(root / "downloaded_datasets")).is_unsafe("The Heat", 1996, {GORE: True})
  cat = saferec.load_catalog(str(root))
  assert len(cat) == 2 and cat.contains("ALIEN", 1981) and not cat.contains("Alien", 1982)
  oracle.to_table(str(tmp_path / "native" / "oracle_table.jsonl"))
  assert saferec.load_oracle(str(tmp_path / "native")).is_unsafe("Heat", 1995, {GORE: True})
  (root / "gt_catalog_complete.pkl").write_bytes(pickle.dumps([("Heat", "x")]))
  with pytest.raises(ValueError, match="item 0: year 'x'"):
    saferec.load_catalog(str(root))


# ------------------------------------------------------------------ SafeRec-mini
SMALL = {("sft", "train"): 120, ("sft", "validation"): 20, ("sft", "test"): 20, ("grpo", "train"): 30}


def test_mini_same_seed_byte_identical(tmp_path):
  a = mini.generate(str(tmp_path / "a"), seed=7, sizes=SMALL, with_statistics=False)
  b = mini.generate(str(tmp_path / "b"), seed=7, sizes=SMALL, with_statistics=False)
  c = mini.generate(str(tmp_path / "c"), seed=8, sizes=SMALL, with_statistics=False)
  assert a == b
  files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "a")
                 for d, _, fs in os.walk(tmp_path / "a") for f in fs)
  assert len(files) >= 13
  match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
  assert not mismatch and not errors
  _, differ, _ = filecmp.cmpfiles(tmp_path / "a", tmp_path / "c", files, shallow=False)
  assert "gt_catalog_complete.pkl" in differ and c["seed"] == 8


@pytest.fixture(scope="module")
def mini_default(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mini"))
  info = mini.generate(out, seed=0)
  return out, info


# The ranges documented in saferec/mini.py (version 2: ground truth filtered, so
# fewer ground-truth items, none unsafe, some rows without any, a lower recall).
RANGES = {
    "prompt_words_mean": (30, 60), "gt_items_mean": (1.1, 2.0), "teacher_items_mean": (8.5, 9.5),
    "teacher_unsafe_share": (0.25, 0.50), "gt_unsafe_share": (0.0, 0.0),
    "gt_removed_per_row": (1.2, 1.8), "rows_without_gt_share": (0.05, 0.35),
    "rows_with_unsafe_teacher_item": (0.85, 1.0), "teacher_recall@10": (0.35, 0.65),
    "teacher_unknown_share": (0.0, 0.06), "curation_dropped_share": (0.05, 0.35),
}


def test_mini_released_layout_and_statistics(mini_default):
  out, info = mini_default
  stats = info["statistics"]
  assert {k: v["rows"] for k, v in stats.items()} == {
      "sft/train": 3000, "sft/validation": 150, "sft/test": 150, "grpo/train": 1000}
  for split, s in stats.items():
    for key, (lo, hi) in RANGES.items():
      if key in s:
        assert lo <= s[key] <= hi, (split, key, s[key])
  for path in ("downloaded_datasets/movie_trait_sensitivity.json", "data/phase1_mapping/title_to_imdb.pkl",
               "gt_catalog_complete.pkl", "downloaded_datasets/processed_datasets/saferec_grpo_dataset/train"):
    assert os.path.exists(os.path.join(out, path)), path
  records = json.load(open(os.path.join(out, "downloaded_datasets", "movie_trait_sensitivity.json")))
  assert all(set(r["traits"]) == set(TRAITS) for r in records)
  for r in records[:50]:          # final = max(ddd_trigger, pg_risk) for every trait
    for t in r["traits"].values():
      assert t["final"] == pytest.approx(max(t["ddd_trigger"], t["pg_risk"]), abs=1e-4)
  assert json.load(open(os.path.join(out, "saferec_mini.json")))["statistics"] == stats


def test_mini_holds_some_pairs_out_of_safe_sft_only(mini_default):
  out, info = mini_default
  held = {tuple(p) for p in info["heldout_from_sft"]}
  assert held == set(mini.heldout_pairs(0)) and len(held) == len(mini.GENRES)

  def pairs(split, stage="sft"):
    rows = saferec.load_split(out, split, stage=stage)
    return [(r["genre"], next(t for t, v in r["constraints"].items() if v)) for r in rows]
  for split in ("train", "validation"):
    assert not held & set(pairs(split)), split
  for split, stage in (("test", "sft"), ("train", "grpo")):
    share = np.mean([p in held for p in pairs(split, stage)])
    assert 0.2 <= share <= 0.6, (split, stage, share)


def test_mini_rows_are_learnable_shape(mini_default):
  out, _ = mini_default
  rows = saferec.load_split(out, "train")
  oracle, catalog = saferec.load_oracle(out), saferec.load_catalog(out)
  assert len(catalog) == 400
  assert all(len(t.split()) <= 3 for t, _ in catalog.items)
  for row in rows[:300]:
    (trait,) = row["constraints"]                       # one trait per row, as released
    assert trait in mini.MINI_TRAITS and trait in row["user_sensitivities"]
    text = row["prompt"][-1]["content"]
    assert any(text.startswith(p) for p in saferec.PHRASINGS[trait])
    items = saferec.parse_recommendations(row["completion"])
    assert 8 <= len(items) <= 10 and all(catalog.contains(t, y) for t, y in items)
    assert row["completion"].startswith("<solution>\n") and row["completion"].endswith("\n</solution>")
    # The constraint is the user's sensitivity the teacher list violates most.
    counts = {t: int(oracle.violations([items], [{t: True}]).sum()) for t in row["user_sensitivities"]}
    assert counts[trait] == max(counts.values())
  # Safe targets exist: after curation, no kept item violates the row's constraint.
  curated, report = saferec.curate_sft_rows(rows[:300], oracle)
  parsed = saferec.parse_all([r["completion"] for r in curated])
  assert not oracle.violations(parsed, [r["constraints"] for r in curated]).any()
  assert report["items_removed"] > 0.2 * report["items_in"]
  # A list that ignores the sensitivity (the teacher) has a high SVR; the safe targets have none.
  ev_teacher = saferec.evaluate_recommendations([r["teacher_completion"] for r in curated], curated, oracle)
  ev_safe = saferec.evaluate_recommendations([r["completion"] for r in curated], curated, oracle)
  assert ev_teacher["svr@10"] > 0.25 and ev_safe["svr@10"] == 0.0
  assert ev_safe["recall@10"] > 0.3


def test_mini_cli(tmp_path):
  rc = mini.main(["--out", str(tmp_path / "cli"), "--seed", "3", "--train", "40", "--eval_rows", "10",
                  "--grpo", "10"])
  assert rc == 0
  assert len(saferec.load_split(str(tmp_path / "cli"), "test")) == 10
  assert len(saferec.load_split(str(tmp_path / "cli"), "train", stage="grpo")) == 10
  assert np.isfinite(json.load(open(tmp_path / "cli" / "saferec_mini.json"))["statistics"]["sft/train"][
      "teacher_unsafe_share"])
