"""Fidelity to the authors' reference implementation (issue 10): every row of its table.

One test (or a few) per row of the issue's table; each asserts the reference
behaviour, which is the default, and this project's earlier behaviour under
the option that keeps it. Expected values are worked out by hand from the
semantics stated in the issue (and /work/shared/SAFEREC.md).
"""
import json
import math
import os
import pickle
import shutil

import datasets
import numpy as np
import pytest

from configs import common, llama31, qwen25
from configs import demo as demo_config
from safecrs_jax import saferec
from safecrs_jax.data import assets, tokens
from safecrs_jax.rl import advantages
from safecrs_jax.saferec import matching, mini, parsing
from safecrs_jax.saferec.traits import TRAITS
from safecrs_jax.train import gdpo_setup, optim, sft_data

GORE, HORROR = TRAITS[2], TRAITS[19]
D2, D3 = 1 / math.log2(3), 1 / math.log2(4)


def _oracle(entries, **options):
  """SafetyOracle from [((normalised title, year), {trait: risk} or None)], in stored order."""
  keys, risk = {}, []
  for key, scores in entries:
    if scores is None:
      keys[key] = -1
      continue
    keys[key] = len(risk)
    risk.append([scores.get(t, 0.0) for t in TRAITS])
  return saferec.SafetyOracle(keys, np.array(risk, np.float32).reshape(-1, len(TRAITS)), **options)


def _row(gt=(), seen=(), cons=None):
  return {"groundtruth_with_release_year": [list(g) for g in gt], "seen_titles": list(seen),
          "constraints": cons or {}}


SOL = saferec.format_recommendations


# ------------------------------------------------------------------ row 3
def test_row3_svr_and_sdcg_keep_seen_titles():
  oracle = _oracle([(("seen", 2000), {GORE: 1.0}), (("safe", 2000), {})])
  row = _row(gt=[("Safe", 2000)], seen=["Seen"], cons={GORE: True})
  comp = SOL([("Seen", 2000), ("Safe", 2000)])
  ref = saferec.evaluate_recommendations([comp], [row], oracle, ks=(1, 2))
  # Safety list [Seen(v), Safe]; ranked list (seen dropped) [Safe(hit)].
  assert ref["svr@1"] == 1.0 and ref["svr@2"] == 0.5 and ref["sdcg@2"] == 1.0
  assert ref["recall@1"] == 1.0 and ref["ndcg@1"] == 1.0
  old = saferec.evaluate_recommendations([comp], [row], oracle, ks=(1, 2), safety_drop_seen=True)
  assert old["svr@2"] == 0.0 and old["sdcg@2"] == 0.0 and old["recall@1"] == 1.0


def test_row3_per_row_flags_are_aligned_with_the_parsed_list():
  oracle = _oracle([(("seen", 2000), {GORE: 1.0}), (("safe", 2000), {})])
  row = _row(gt=[("Safe", 2000)], seen=["Seen"], cons={GORE: True})
  pr = saferec.evaluate_recommendations([SOL([("Seen", 2000), ("Safe", 2000)])], [row], oracle,
                                        ks=(3,), per_row=True)["per_row"]
  assert pr["items"][0] == [("Seen", 2000), ("Safe", 2000)]
  assert pr["seen"][0].tolist() == [True, False, False]
  assert pr["hits"][0].tolist() == [False, True, False]        # Safe is rank 1 of the ranked list
  assert pr["violations"][0].tolist() == [True, False, False]
  assert pr["ranked_items"][0] == [("Safe", 2000)] and pr["ranked_hits"][0].tolist() == [True, False, False]


# ------------------------------------------------------------------ row 4
def test_row4_catalog_match_per_row_over_first_20_seen_kept():
  rows = [_row(seen=["HEAT"]), _row(), _row()]
  comps = [SOL([("HEAT", 1996), ("Nope", 2000)]),                       # 1 of 2 (seen kept, lower-cased)
           "no list",                                                    # no items: 0
           SOL([(f"Miss {i}", 2000) for i in range(20)] + [("Heat", 1995)])]   # item 21 not read: 0
  m = saferec.evaluate_recommendations(comps, rows, None, ks=(5,), catalog=[("Heat", 1995)])
  assert m["catalog_match"] == pytest.approx((1 / 2 + 0 + 0) / 3)
  # pooled (earlier): over the seen-dropped top max(ks) = 5 items of all rows: 0 of 1 + 0 of 5.
  pooled = saferec.evaluate_recommendations(comps, rows, None, ks=(5,), catalog=[("Heat", 1995)],
                                            catalog_protocol="pooled")
  assert pooled["catalog_match"] == 0.0
  assert saferec.evaluate_recommendations(comps[:1], rows[:1], None, ks=(5,), catalog=[("Heat", 1998)])[
      "catalog_match"] == 0.5                                            # year 1996 vs 1998: within 2
  assert saferec.evaluate_recommendations(comps[:1], rows[:1], None, ks=(5,), catalog=[("Heat", 1999)])[
      "catalog_match"] == 0.0                                            # 3 years off


def test_row4_catalog_titles_are_lower_cased():
  assert saferec.Catalog([("Heat", 1995)]).contains("HEAT", 1997)
  assert not saferec.Catalog([("Heat", 1995)]).contains("Heat", 1998)
  assert not saferec.Catalog([("Straße", 2000)]).contains("STRASSE", 2000)        # str.lower
  assert saferec.Catalog([("Straße", 2000)], title_fold="casefold").contains("STRASSE", 2000)


def test_row4_catalog_match_is_also_right_when_ks_is_below_20():
  comps = [SOL([(f"Heat {i}", 2000) for i in range(12)])]
  m = saferec.evaluate_recommendations(comps, [_row()], None, ks=(5,), catalog=[("Heat 11", 2000)])
  assert m["catalog_match"] == pytest.approx(1 / 12)                    # first 20 items, not top 5


# ------------------------------------------------------------------ row 5
def test_row5_k_values():
  assert saferec.DEFAULT_KS == (5, 10, 15, 20)
  assert tuple(common.build(stage="sft").eval.ks) == (5, 10, 15, 20)
  assert tuple(common.build(stage="gdpo").eval.ks) == (5, 10, 15, 20)
  comp = SOL([(f"Filler {i}", 2000) for i in range(11)] + [("Heat", 1995)])   # hit at rank 12
  m = saferec.evaluate_recommendations([comp], [_row(gt=[("Heat", 1995)])], None)
  assert {f"recall@{k}" for k in (5, 10, 15, 20)} <= set(m) and {"ndcg@15", "svr@15"} <= set(m)
  assert m["recall@10"] == 0.0 and m["recall@15"] == 1.0
  assert m["ndcg@15"] == pytest.approx((1 / math.log2(13)) / 1.0)          # IDCG: min(1, 12, 15) = 1


# ------------------------------------------------------------------ row 6
def test_row6_evaluation_matching_is_ground_truth_major():
  gt = [("A", 2000), ("A", 2001)]
  recs = [("A", 2000), ("A", 2001)]
  assert matching.hit_vector(recs, gt, 2, exact=True, assignment="ground_truth_major").tolist() == [
      True, False]                                              # both entries mark rank 1
  assert matching.hit_vector(recs, gt, 2, exact=True).tolist() == [True, True]
  m = saferec.evaluate_recommendations([recs], [_row(gt=gt)], None, ks=(2,))
  assert m["recall@2"] == 0.5 and m["ndcg@2"] == pytest.approx(1 / (1 + D2))
  old = saferec.evaluate_recommendations([recs], [_row(gt=gt)], None, ks=(2,), hit_assignment="one_to_one")
  assert old["recall@2"] == 1.0 and old["ndcg@2"] == pytest.approx(1.0)


def test_row6_first_match_within_top_k_and_year_tolerance():
  gt = [("B", 2000), ("A", 2000)]
  recs = [("A", 2003), ("B", 1998), ("A", 2002), ("A", 2000)]
  # B -> rank 2 (year -2); A -> rank 3 (the first with |dy| <= 2; rank 1 is 3 years off).
  assert matching.hit_vector(recs, gt, 4, exact=True, assignment="ground_truth_major").tolist() == [
      False, True, True, False]
  assert matching.hit_vector(recs, gt, 2, exact=True, assignment="ground_truth_major").tolist() == [
      False, True]
  assert not matching.hit_vector([("a", 2000)], gt, 1, exact=True, assignment="ground_truth_major").any()


# ------------------------------------------------------------------ row 7
def test_row7_reward_matching_tries_later_year_first():
  gt = [("X", 1999), ("X", 2001)]
  recs = [("X", 2000), ("X", 2002)]
  # Reference: X 2000 takes 2001 (y+1 before y-1); X 2002 then finds 2001 used, 2000 / 2004 absent.
  assert matching.hit_vector(recs, gt, 2).tolist() == [True, False]
  # Earlier first: X 2000 takes 1999, X 2002 takes 2001 (y-1).
  assert matching.hit_vector(recs, gt, 2, year_order="earlier_first").tolist() == [True, True]
  assert matching.year_offsets(2) == (0, 1, -1, 2, -2)
  assert matching.year_offsets(2, "earlier_first") == (0, -1, 1, -2, 2)
  np.testing.assert_allclose(saferec.relevance_reward([recs], [gt], dcg=True), [1.0])
  np.testing.assert_allclose(saferec.relevance_reward([recs], [gt], dcg=True, year_order="earlier_first"),
                             [1 + D2], rtol=1e-6)
  rows = [{"groundtruth_with_release_year": gt, "constraints": {}}]
  settings = saferec.RewardSettings(relevance="dcg", year_order="earlier_first")
  r = saferec.reward_table(("relevance",), [recs], rows, None, settings)
  np.testing.assert_allclose(r[:, 0], [1 + D2], rtol=1e-6)
  ranks = saferec.rank_rewards([recs], [gt], None, None, mode="exp_inf", rec_num=2)
  np.testing.assert_allclose(ranks, [[1, 0]])


# ------------------------------------------------------------------ row 8
def test_row8_unclosed_solution_parses_the_whole_text():
  cut = "<reasoning>\nUser avoids gore.\nX (1999)\n</reasoning>\n<solution>\nA (2000)\nB (20"
  assert saferec.parse_recommendations(cut) == [("X", 1999), ("A", 2000)]
  assert saferec.parse_recommendations(cut, unclosed_solution="from_tag") == [("A", 2000)]
  closed = "X (1999)\n<solution>\nA (2000)\n</solution>\nB (2001)"
  for mode in parsing.UNCLOSED_MODES:
    assert saferec.parse_recommendations(closed, unclosed_solution=mode) == [("A", 2000)]
  assert saferec.parse_all([cut, closed]) == [[("X", 1999), ("A", 2000)], [("A", 2000)]]
  with pytest.raises(ValueError, match="unclosed_solution"):
    saferec.parse_recommendations(cut, unclosed_solution="tag")


def test_row8_only_straight_quotes_are_removed():
  text = "\n".join(['"Heat" (1995)', "'Alien (1979)'", "“Jaws” (1975)", "‘Up’ (2009)",
                    "The “Best” Man (1999)"])
  assert saferec.parse_recommendations(text) == [
      ("Heat", 1995), ("Alien", 1979), ("“Jaws”", 1975), ("‘Up’", 2009), ("The “Best” Man", 1999)]
  assert saferec.parse_recommendations(text, strip_curly_quotes=True) == [
      ("Heat", 1995), ("Alien", 1979), ("Jaws", 1975), ("Up", 2009), ("The “Best” Man", 1999)]


# ------------------------------------------------------------------ rows 9-11 (oracle)
def _files(tmp_path, records, mapping):
  js, pk = tmp_path / "traits.json", tmp_path / "map.pkl"
  js.write_text(json.dumps(records))
  pk.write_bytes(pickle.dumps(mapping))
  return str(js), str(pk)


def _risk(**by_index):
  return {t: {"final": by_index.get(f"t{i}", 0.0)} for i, t in enumerate(TRAITS)}


def test_row9_title_only_fallback_takes_the_first_stored_entry(tmp_path):
  # Stored order: 2005 (gore) first, then 1990 (safe). Query 1995: nothing within 2;
  # nearest year would be 1990 (5 away) but the reference takes the first entry, 2005.
  files = _files(tmp_path, [{"imdbId": "1", "traits": _risk(t2=1.0)}, {"imdbId": "2", "traits": _risk()}],
                 {("twin", 2005): "1", ("twin", 1990): "2"})
  ref = saferec.SafetyOracle.from_files(*files)
  near = saferec.SafetyOracle.from_files(*files, title_fallback="nearest_year")
  assert ref.resolve("Twin", 1995) == ref.resolve("Twin", 2005) != ref.resolve("Twin", 1990)
  assert ref.is_unsafe("Twin", 1995, {GORE: True})
  assert near.resolve("Twin", 1995) == near.resolve("Twin", 1990)
  assert not near.is_unsafe("Twin", 1995, {GORE: True})
  assert ref.is_unsafe("Twin", 2007, {GORE: True}) and not ref.is_unsafe("Twin", 1992, {GORE: True})  # +-2 first
  # The same through the loader and through a project-native table (which keeps the order).
  root = tmp_path / "root"
  (root / "data" / "phase1_mapping").mkdir(parents=True)
  shutil.copy(files[0], root / "movie_trait_sensitivity.json")
  shutil.copy(files[1], root / "data" / "phase1_mapping" / "title_to_imdb.pkl")
  assert saferec.load_oracle(str(root)).is_unsafe("Twin", 1995, {GORE: True})
  assert not saferec.load_oracle(str(root), title_fallback="nearest_year").is_unsafe("Twin", 1995, {GORE: True})
  ref.to_table(str(tmp_path / "table" / "oracle_table.jsonl"))
  assert saferec.load_oracle(str(tmp_path / "table")).is_unsafe("Twin", 1995, {GORE: True})
  with pytest.raises(ValueError, match="title_fallback"):
    saferec.SafetyOracle.from_files(*files, title_fallback="nearest")


def test_row10_later_record_of_a_repeated_id_wins(tmp_path):
  files = _files(tmp_path, [{"imdbId": "0000001", "traits": _risk(t2=0.9)},
                            {"imdbId": "2", "traits": _risk(t19=0.9)},
                            {"imdbId": "tt0000001", "traits": _risk(t2=0.1, t19=0.8)}],
                 {("heat", 1995): "1", ("ghost", 1980): "2"})
  ref = saferec.SafetyOracle.from_files(*files)
  assert not ref.is_unsafe("Heat", 1995, {GORE: True}) and ref.is_unsafe("Heat", 1995, {HORROR: True})
  assert ref.risk.shape == (2, 20) and ref.is_unsafe("Ghost", 1980, {HORROR: True})
  first = saferec.SafetyOracle.from_files(*files, duplicate_ids="first")
  assert first.is_unsafe("Heat", 1995, {GORE: True}) and not first.is_unsafe("Heat", 1995, {HORROR: True})


def test_row11_articles_followed_by_any_whitespace():
  assert saferec.normalize_title("The\u00a0Matrix") == "matrix"           # non-breaking space
  assert saferec.normalize_title("A\tQuiet Place") == "quiet place"
  assert saferec.normalize_title("An\u2003Education") == "education"      # em space
  assert saferec.normalize_title("Theater") == "theater" and saferec.normalize_title("The") == "the"
  oracle = _oracle([(("matrix", 1999), {HORROR: 1.0})])
  assert oracle.is_unsafe("The\u00a0Matrix", 1999, {HORROR: True})


# ------------------------------------------------------------------ row 13
class _IntTokenizer:
  """Texts are space-separated token ids; the chat template concatenates the message ids."""
  eos_token_id = pad_token_id = 0

  def get_vocab(self):
    return {"<|im_end|>": 2}

  def apply_chat_template(self, messages, **_):
    return [int(x) for m in messages for x in m["content"].split()]

  def __call__(self, text, **_):
    return {"input_ids": [int(x) for x in text.split()]}


def test_row13_sft_truncation_keeps_the_start():
  tok = _IntTokenizer()
  row = {"prompt": [{"role": "user", "content": " ".join(map(str, range(10, 20)))}],   # 10 tokens
         "completion": " ".join(map(str, range(20, 29)))}                               # 9 + end of turn
  ex = tokens.encode_sft(tok, [row], max_length=15)
  assert ex.tokens[0].tolist() == list(range(10, 25)) and ex.prompt_len[0] == 10
  assert ex.report() == {"rows": 1, "truncated_prompts": 0, "truncated_completions": 1}
  left = tokens.encode_sft(tok, [row], max_length=15, truncation="left_prompt")
  assert left.tokens[0].tolist() == list(range(15, 29)) + [2] and left.prompt_len[0] == 5
  assert left.report() == {"rows": 1, "truncated_prompts": 1, "truncated_completions": 0}
  fits = tokens.encode_sft(tok, [row], max_length=20)
  assert fits.tokens[0].tolist() == list(range(10, 29)) + [2] and fits.report()["truncated_completions"] == 0
  assert common.build(stage="sft").tokenizer.truncation == "right"


# ------------------------------------------------------------------ row 15
def _gt_oracle():
  return _oracle([(("a", 2000), {GORE: 0.5}), (("b", 2001), {GORE: 0.49}),
                  (("c", 2002), {HORROR: 0.9}), (("norecord", 2004), None)])


def test_row15_filter_groundtruth():
  oracle = _gt_oracle()
  gt = [["A", 2000], ["B", 2001], ["C", "2002"], ["Unknown", 2003], ["NoRecord", 2004]]
  rows = [_row(gt=gt, cons={GORE: True}), _row(gt=gt), _row(gt=[["A", 2001]], cons={GORE: True}),
          _row(gt=gt, cons={GORE: True, HORROR: True})]
  out = saferec.filter_groundtruth(rows, oracle)
  assert out[0]["groundtruth_with_release_year"] == [["B", 2001], ["C", "2002"], ["Unknown", 2003],
                                                     ["NoRecord", 2004]]
  assert out[0]["num_gt_removed"] == 1 and out[0]["removed_groundtruth"] == [["A", 2000]]
  assert out[1]["groundtruth_with_release_year"] == gt and out[1]["num_gt_removed"] == 0   # no traits
  assert out[2]["groundtruth_with_release_year"] == [] and out[2]["num_gt_removed"] == 1    # kept, empty
  assert out[3]["removed_groundtruth"] == [["A", 2000], ["C", "2002"]]
  assert rows[0]["groundtruth_with_release_year"] == gt and "num_gt_removed" not in rows[0]  # input intact
  again = saferec.filter_groundtruth(out, oracle)
  assert again == out                                                     # idempotent
  lax = saferec.filter_groundtruth(rows[:1], oracle, threshold=0.95)
  assert lax[0]["num_gt_removed"] == 0
  strict = saferec.filter_groundtruth(rows[:1], oracle, threshold=0.4)
  assert strict[0]["removed_groundtruth"] == [["A", 2000], ["B", 2001]]
  with pytest.raises(ValueError, match="not one of this oracle's traits"):
    saferec.filter_groundtruth([_row(gt=gt, cons={"Clowns": True})], oracle)


SMALL = {("sft", "train"): 60, ("sft", "validation"): 20, ("sft", "test"): 40, ("grpo", "train"): 20}


def test_row15_mini_ground_truth_is_filtered_in_every_split(tmp_path):
  out = str(tmp_path / "mini")
  info = mini.generate(out, seed=1, sizes=SMALL)
  assert info["version"] == mini.MINI_VERSION == 2
  oracle = saferec.load_oracle(out)
  removed_total = 0
  for (stage, split) in SMALL:
    for row in saferec.load_split(out, split, stage):
      (trait,) = row["constraints"]
      col = oracle.trait_index[trait]
      for title, year in row["groundtruth_with_release_year"]:
        r = oracle.resolve(title, year)
        assert r < 0 or oracle.risk[r, col] < 0.5, (stage, split, title)
      assert row["num_gt_removed"] == len(row["removed_groundtruth"])
      for title, year in row["removed_groundtruth"]:
        assert oracle.risk[oracle.resolve(title, int(year)), col] >= 0.5
      removed_total += row["num_gt_removed"]
    assert info["statistics"][f"{stage}/{split}"]["gt_unsafe_share"] == 0.0
  assert removed_total > 0


def test_row15_mini_cache_key_follows_the_saferec_sources(tmp_path, monkeypatch):
  src = os.path.dirname(saferec.__file__)
  copy = tmp_path / "saferec"
  shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
  monkeypatch.setattr(saferec, "__file__", str(copy / "__init__.py"))
  before = assets._mini_version()
  with open(copy / "curation.py", "a", encoding="utf-8") as f:
    f.write("\n# changed\n")
  assert assets._mini_version() != before


# ------------------------------------------------------------------ row 16
def test_row16_injection_into_the_first_user_message():
  rows = [{"prompt": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "First question."},
                      {"role": "assistant", "content": "Sure."},
                      {"role": "user", "content": "Second question."}]}]
  (ref,) = saferec.inject_constraints(rows, seed=0)
  (trait,) = ref["constraints"]
  msgs = ref["prompt"]
  assert any(msgs[1]["content"] == f"{p} First question." for p in saferec.PHRASINGS[trait])
  assert msgs[3]["content"] == "Second question." and msgs[0]["content"] == "Be brief."
  (old,) = saferec.inject_constraints(rows, seed=0, user_message="last")
  assert old["prompt"][1]["content"] == "First question."
  assert old["prompt"][3]["content"] == msgs[1]["content"].replace("First", "Second")   # same draw
  with pytest.raises(ValueError, match="user_message"):
    saferec.inject_constraints(rows, user_message="middle")


# ------------------------------------------------------------------ row 17
def test_row17_rank_safety_penalty_is_discounted():
  oracle = _oracle([(("bad", 2000), {GORE: 1.0}), (("fine", 2000), {})])
  comp = [[("Bad", 2000), ("Bad", 2000), ("Fine", 2000), ("Bad", 2000)]]
  cons = [{GORE: True}]
  d4 = 1 / math.log2(5)
  r = saferec.rank_rewards(comp, [[]], cons, oracle, mode="exp_inf", rec_num=4)
  np.testing.assert_allclose(r, [[-1, -D2, 0, -d4]], rtol=1e-6)
  r2 = saferec.rank_rewards(comp, [[]], cons, oracle, mode="log_decay", rec_num=4, lambda_safe=2.0,
                            penalty_safe=0.25)
  np.testing.assert_allclose(r2, [[-0.5, -0.5 * D2, 0, -0.5 * d4]], rtol=1e-6)
  flat = saferec.rank_rewards(comp, [[]], cons, oracle, mode="exp_inf", rec_num=4, discount_safety=False)
  np.testing.assert_allclose(flat, [[-1, -1, 0, -1]])
  # The per-rank safety parts sum to the sequence safety reward.
  seq = saferec.safety_reward(comp, cons, oracle, rec_num=4)
  np.testing.assert_allclose(r.sum(1), seq, rtol=1e-6)


# ------------------------------------------------------------------ extra fields
EXTRAS = {"num_gt_removed": 2, "removed_groundtruth": [["Alien", "1979"], ["Jaws", "1975"]],
          "genre": "horror", "user_sensitivities": [GORE], "score": 0.5}


def _released_row(i):
  return {"prompt": [{"role": "user", "content": f"hi {i}"}],
          "completion": [{"role": "assistant", "content": "<solution>\nHeat (1995)\n</solution>"}],
          "groundtruth_with_release_year": [["Heat", "1995"]], "seen_titles": [],
          "constraints": {GORE: True}, **EXTRAS}


def test_loaders_keep_every_extra_field(tmp_path):
  nested = dict(_released_row(0), meta={"source": "reddit", "ids": [1, 2]})
  row = saferec.normalize_row(nested, "x row 0")
  for key, value in EXTRAS.items():
    assert row[key] == value, key
  assert row["meta"] == {"source": "reddit", "ids": [1, 2]}
  (tmp_path / "jsonl").mkdir()
  (tmp_path / "jsonl" / "test.jsonl").write_text(json.dumps(nested) + "\n")
  (loaded,) = saferec.load_split(str(tmp_path / "jsonl"), "test")
  assert {k: loaded[k] for k in list(EXTRAS) + ["meta"]} == {**EXTRAS, "meta": nested["meta"]}
  base = tmp_path / "released" / "downloaded_datasets" / "processed_datasets" / "saferec_sft_dataset"
  datasets.Dataset.from_list([_released_row(i) for i in range(3)]).save_to_disk(str(base / "test"))
  for r in saferec.load_split(str(tmp_path / "released"), "test"):
    assert {k: r[k] for k in EXTRAS} == EXTRAS
    assert r["groundtruth_with_release_year"] == [["Heat", 1995]]


# -- training rows (1, 2, 12, 14, 17 advantage side, 18) --------------------------------

def _gdpo_section(**kw):
  g = common.build(stage="gdpo").gdpo
  g.update(kw)
  return g


def test_row1_gdpo_batch_counts_completions():
  # reference: 4 completions per device x 8 accumulation with G = 8 -> 4 prompts per
  # device per optimizer step, pooled into one normalisation.
  geo = gdpo_setup.batch_geometry(_gdpo_section(), dp=1)
  assert (geo["step_prompts"], geo["micro_rows"], geo["accum"]) == (4, 4, 8)
  assert gdpo_setup.batch_geometry(_gdpo_section(), dp=8)["step_prompts"] == 32
  # micro-batches of 4 rows hold half a group; rollouts go out one prompt per call
  assert (geo["chunks"], geo["chunk_prompts"]) == (4, 1)
  assert gdpo_setup.batch_geometry(_gdpo_section(), dp=4)["chunks"] == 4      # 16 prompts, 4 per call
  # ours: batch_size counts prompts (x G completions): 8x more per step
  ours = gdpo_setup.batch_geometry(_gdpo_section(batch_unit="prompts"), dp=1)
  assert (ours["step_prompts"], ours["micro_rows"], ours["chunks"]) == (32, 32, 8)
  with pytest.raises(ValueError, match="whole groups"):
    gdpo_setup.batch_geometry(_gdpo_section(batch_size=3, grad_accum=1), dp=1)
  # the demo keeps its step: 32 completions = 8 prompts x G = 4
  d = demo_config.get_config("stage=gdpo").gdpo
  assert gdpo_setup.batch_geometry(d, dp=1)["step_prompts"] == 8


def test_row2_gdpo_lr_drops_for_3b_8b():
  c = llama31.get_config("stage=gdpo")
  sched = optim.make_schedule(c.optim, 10_000)
  assert float(sched(0)) == pytest.approx(1e-6) and float(sched(7999)) == pytest.approx(1e-6)
  assert float(sched(8000)) == pytest.approx(1e-7) and float(sched(9999)) == pytest.approx(1e-7)
  q = qwen25.get_config("stage=gdpo")                       # the 0.5B model: constant
  assert float(optim.make_schedule(q.optim, 10_000)(9000)) == pytest.approx(1e-6)


def test_row12_sft_targets_verbatim_by_default():
  c = common.build(stage="sft")
  assert c.sft.curate is False
  row = {"completion": "<reasoning>r</reasoning>\n<solution>\nA (2000)\n</solution>",
         "constraints": {HORROR: True}}
  rows, report = sft_data.prepare_rows([row], c)               # no oracle needed, text untouched
  assert rows[0]["completion"] == row["completion"] and report["rows_out"] == 1
  c.sft.reasoning = False                                 # option: strip the reasoning block
  assert sft_data.prepare_rows([row], c)[0][0]["completion"] == "<solution>\nA (2000)\n</solution>"


def test_row14_lora_defaults():
  lora = common.build(stage="sft").sft.lora
  assert (lora.alpha, lora.dropout) == (32.0, 0.05)
  assert qwen25.get_config("stage=sft").sft.lora.rank == 0     # full fine-tuning unless asked
  on = llama31.get_config("stage=sft,lora=1").sft.lora          # one argument: LoRA Safe-SFT
  assert (on.rank, on.alpha, on.dropout) == (16, 32.0, 0.05)


def test_row17_rank_gdpo_renormalises_over_the_batch():
  # 2 groups x 2 rollouts, 1 reward, 2 ranks. Per group and rank: (x - mean) / (std + eps);
  # for two values a, b: +-(|a - b| / 2) / (|a - b| / sqrt(2) + eps) (unbiased std).
  r = np.array([[[1.0, 0.0]], [[0.0, 0.0]], [[3.0, 1.0]], [[1.0, 2.0]]], np.float32)
  no_bn = np.asarray(advantages.compute_advantages(r, 2, mode="rank_no_batch_norm"))
  pair = lambda d: (d / 2) / (d / math.sqrt(2) + advantages.ADV_EPS)   # noqa: E731
  e1, e2 = pair(1.0), pair(2.0)                                        # |a - b| = 1 and 2
  np.testing.assert_allclose(no_bn, [[e1, 0], [-e1, 0], [e2, -e1], [-e2, e1]], rtol=1e-5)
  got = np.asarray(advantages.compute_advantages(r, 2, mode="rank"))
  flat = no_bn.reshape(-1)                                # then over all 8 (row, rank) entries
  want = (flat - flat.mean()) / (flat.std(ddof=1) + advantages.ADV_EPS)
  np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-5)
  assert not np.allclose(got, no_bn)


def test_row18_no_prompt_cut_by_default():
  c = common.build(stage="gdpo")
  assert c.gdpo.max_prompt_length + c.gdpo.max_completion_length == 8192
  assert max(c.gdpo.prompt_buckets) == c.gdpo.max_prompt_length
  assert c.eval.max_prompt_length == c.gdpo.max_prompt_length
