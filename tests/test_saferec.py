"""SafeRec semantics: parsing, oracle lookups, rewards, metrics, injection, curation.

Every expected number below is worked out by hand from the SafeRec rules.
"""
import json
import math
import pickle
import random
import re
import time

import numpy as np
import pytest

from safecrs_jax import saferec
from safecrs_jax.saferec import parsing
from safecrs_jax.saferec.traits import TRAITS

GORE, HORROR, SPIDER = TRAITS[2], TRAITS[19], TRAITS[1]
D3 = 1 / math.log2(4)   # discount of rank 3
D2 = 1 / math.log2(3)


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("line, expected", [
    ("Heat (1995)", ("Heat", 1995)),
    ("1. Heat (1995)", ("Heat", 1995)),
    ("12)  Heat   (1995)", ("Heat", 1995)),
    ("3 - Jaws (1975)", ("Jaws", 1975)),
    ("**Heat** (1995)", ("Heat", 1995)),
    ("- *Heat (1995)*", ("Heat", 1995)),
    ("### Alien (1979)", ("Alien", 1979)),
    ('"Heat" (1995)', ("Heat", 1995)),
    ("'Heat (1995)'", ("Heat", 1995)),
    ("“Heat” (1995)", ("“Heat”", 1995)),     # curly quotes stay part of the title (reference)
    ("Heat (1995) - a tense crime classic", ("Heat", 1995)),
    ("Birdman (or The Unexpected Virtue of Ignorance) (2014)", ("Birdman", 2014)),
    ("Se7en (1995) (Director's Cut)", ("Se7en", 1995)),
    ("M*A*S*H (1970)", ("M*A*S*H", 1970)),
    ("1917 (2019)", ("1917", 2019)),
    ("2. 1917 (2019)", ("1917", 2019)),
    ("Jaws\t(1975)", ("Jaws", 1975)),
    ("Heat(1995)", None),           # the year must follow a space
    ("Jaws (75)", None),
    ("(1999) (2000)", None),        # empty title
    ("Here are my picks:", None),
    ("", None),
])
def test_parse_line(line, expected):
  assert parsing.parse_line(line) == expected


def test_parse_line_strip_curly_quotes_option():
  assert parsing.parse_line("“Heat” (1995)", strip_curly_quotes=True) == ("Heat", 1995)
  assert parsing.parse_line("‘Heat’ (1995)", strip_curly_quotes=True) == ("Heat", 1995)
  assert parsing.parse_line("‘Heat’ (1995)") == ("‘Heat’", 1995)


def test_parse_solution_block_and_order():
  text = "Sure!\nIgnored (1990)\n<solution>\n1. A (2000)\n\nnot a movie\nB (2001)\n</solution>\nC (2002)"
  assert saferec.parse_recommendations(text) == [("A", 2000), ("B", 2001)]
  # Unclosed tag (cut generation): the whole text is parsed, reasoning lines too (reference);
  # unclosed_solution="from_tag" reads from the tag to the end instead.
  cut = "<reasoning>\nX (1999)\n</reasoning>\n<solution>\nA (2000)\nB (20"
  assert saferec.parse_recommendations(cut) == [("X", 1999), ("A", 2000)]
  assert saferec.parse_recommendations(cut, unclosed_solution="from_tag") == [("A", 2000)]
  assert saferec.parse_recommendations("A (2000)\nB (2001)") == [("A", 2000), ("B", 2001)]


@pytest.mark.parametrize("bad", [None, 17, 3.5, b"Heat (1995)", {}, [], [{"role": "user"}], "\x00\x01\x02",
                                 "<solution></solution>", "((((((((((", "\u202e\u0000(1999)"])
def test_parse_garbage_never_raises(bad):
  assert isinstance(saferec.parse_recommendations(bad), list)


def test_parse_message_list_and_huge_text_is_fast():
  msgs = [{"role": "user", "content": "X (1990)"}, {"role": "assistant", "content": "Heat (1995)"}]
  assert saferec.parse_recommendations(msgs) == [("Heat", 1995)]
  huge = ("(" * 200_000) + "Heat (1995)\n" + ("* - " * 100_000 + "\n") * 5 + "x" * 3_000_000 + "\n"
  many = "Heat (1995)\n" * 50_000
  t = time.perf_counter()
  assert saferec.parse_recommendations(huge) == []
  assert len(saferec.parse_recommendations(many)) == 50_000
  assert time.perf_counter() - t < 2.0


def test_fast_path_agrees_with_full_cleaning():
  rng = random.Random(0)
  pieces = ["Heat", "the", "1.", "2)", "3 -", "12.", "*", "**", "***", "_", "__", "#", "-", '"', "'", "“", "”",
            "(", ")", "(x)", "(1995)", "1995", " ", "  ", "\t", "M*A*S*H", "9.", "and", "(or not)", "—", "é", "Ω"]
  for _ in range(30_000):
    line = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, 7)))
    if rng.random() < 0.7:
      line += rng.choice([" (1995)", " (2001) great", "(1999)", " (1995)*", "** (1990) - so good", " (1995) **"])
    assert parsing.parse_line(line) == parsing.parse_line_full(line), repr(line)
    assert parsing.parse_line(line, True) == parsing.parse_line_full(line, True), repr(line)


# ------------------------------------------------------------------ oracle
def _risk(**scores):
  """{trait: {"final": x}} for every trait (0 unless given by index name t<i>)."""
  out = {t: {"final": 0.0, "ddd_trigger": 0.0, "pg_risk": 0.0} for t in TRAITS}
  for key, v in scores.items():
    out[TRAITS[int(key[1:])]]["final"] = v
  return out


@pytest.fixture(scope="module")
def oracle_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("oracle")
  records = [
      {"imdbId": "tt0000001", "traits": _risk(t2=0.9)},           # Gore Movie (gore)
      {"imdbId": "0000002", "traits": _risk(t19=0.66)},           # Ghost (horror, exactly at threshold)
      {"imdbId": "3", "traits": _risk(t19=0.659)},                # Almost (below threshold)
      {"imdbId": "4", "traits": _risk(t1=1.0, t2=0.7)},           # Spider Gore (spider + gore)
      {"imdbId": "5", "traits": _risk()},                         # Twin 1999 (safe)
      {"imdbId": "6", "traits": _risk(t2=1.0)},                   # Twin 2001 (gore)
      {"imdbId": "7", "traits": _risk(t2=1.0)},                   # Far 1990 (gore)
      {"imdbId": "8", "traits": _risk()},                         # Far 2010 (safe)
      {"imdbId": "9", "traits": _risk(t19=1.0)},                  # Matrix (horror, for the test)
      {"imdbId": "10", "traits": _risk(t2=1.0)},                  # Spider-Man: Home Coming
      {"imdbId": "11", "traits": _risk()},                        # Near 1998 (safe)
      {"imdbId": "12", "traits": _risk(t2=1.0)},                  # Near 2002 (gore)
  ]
  mapping = {
      ("gore movie", 2000): "0000001", ("ghost", 1980): "2", ("almost", 1980): "3",
      ("spider gore", 1990): "4", ("twin", 1999): "5", ("twin", 2001): "6",
      ("far", 1990): "7", ("far", 2010): "8", ("matrix", 1999): "9",
      ("spiderman home coming", 2017): "10", ("near", 1998): "11", ("near", 2002): "12",
      ("no record", 2000): "999",
  }
  js, pk = d / "movie_trait_sensitivity.json", d / "title_to_imdb.pkl"
  js.write_text(json.dumps(records))
  pk.write_bytes(pickle.dumps(mapping))
  return str(js), str(pk)


@pytest.fixture()
def oracle(oracle_files):
  return saferec.SafetyOracle.from_files(*oracle_files)


def test_normalize_title():
  assert saferec.normalize_title("  The Matrix ") == "matrix"
  assert saferec.normalize_title("A Quiet Place") == "quiet place"
  assert saferec.normalize_title("An  American   Werewolf") == "american werewolf"
  assert saferec.normalize_title("Spider-Man: Home  Coming!") == "spiderman home coming"
  assert saferec.normalize_title("Theater") == "theater"        # 'the' only as a word


def test_oracle_threshold_and_normalisation(oracle, oracle_files):
  gore, horror = {GORE: True}, {HORROR: True}
  assert oracle.is_unsafe("Gore Movie", 2000, gore)
  assert not oracle.is_unsafe("Gore Movie", 2000, horror)
  assert not oracle.is_unsafe("Gore Movie", 2000, {GORE: False})
  assert not oracle.is_unsafe("Gore Movie", 2000, {})
  assert oracle.is_unsafe("GHOST", 1980, horror)                  # final == 0.66 is unsafe
  assert not oracle.is_unsafe("Almost", 1980, horror)             # 0.659 is not
  assert oracle.is_unsafe("The Matrix", 1999, horror)             # article dropped
  assert oracle.is_unsafe("Spider-Man: Home Coming", 2017, gore)  # punctuation dropped
  assert oracle.violated_traits("Spider Gore", 1990, {GORE: True, SPIDER: True, HORROR: True}) == [
      GORE, SPIDER]
  strict = saferec.SafetyOracle.from_files(*oracle_files, risk_threshold=0.95)
  assert not strict.is_unsafe("Gore Movie", 2000, gore) and strict.is_unsafe("Spider Gore", 1990, {SPIDER: True})


def test_oracle_year_fallback_order(oracle):
  gore = {GORE: True}
  assert oracle.resolve("Twin", 1999) != oracle.resolve("Twin", 2001)
  assert not oracle.is_unsafe("Twin", 2000, gore)   # +-1 tie: earlier (1999, safe) wins
  assert oracle.is_unsafe("Twin", 2002, gore)       # 2001 (-1) before 1999 (-3 is out of range)
  assert not oracle.is_unsafe("Near", 2000, gore)   # +-2 tie: earlier (1998, safe) wins
  assert oracle.is_unsafe("Near", 2003, gore)       # -1 finds 2002
  assert oracle.is_unsafe("Gore Movie", 2002, gore)  # +-2 reach


def test_oracle_title_only_fallback(oracle, oracle_files):
  gore = {GORE: True}
  # Reference: no year within 2 -> the first stored entry of the title, (far, 1990).
  assert oracle.is_unsafe("Far", 1996, gore)
  assert oracle.is_unsafe("Far", 2005, gore)        # nearest would be 2010 (safe)
  assert oracle.is_unsafe("Gore Movie", 1950, gore)
  assert oracle.is_unsafe("Gore Movie", None, gore)
  nearest = saferec.SafetyOracle.from_files(*oracle_files, title_fallback="nearest_year")
  assert nearest.is_unsafe("Far", 1996, gore)        # no year within 2: nearest year, 1990
  assert not nearest.is_unsafe("Far", 2005, gore)    # nearest is 2010
  assert nearest.is_unsafe("Far", 2000, gore)        # tie (10 / 10): earlier, 1990
  assert nearest.is_unsafe("Gore Movie", 1950, gore)
  assert nearest.is_unsafe("Gore Movie", None, gore)


def test_oracle_unknown_movies_are_safe_and_counted(oracle):
  oracle.reset_counts()
  assert not oracle.is_unsafe("Never Heard Of It", 2000, {GORE: True})
  assert not oracle.is_unsafe("No Record", 2000, {GORE: True})   # key known, no risk record
  assert oracle.resolve("No Record", 2000) == -1
  assert oracle.counts == {"lookups": 2, "unknown": 2}
  assert oracle.risk_of("Never Heard Of It", 2000) is None
  with pytest.raises(ValueError, match="not one of this oracle's traits|does not know"):
    oracle.violations([[("Gore Movie", 2000)]], [{"Scary clowns": True}])


def test_oracle_batch_matches_single_checks(oracle):
  titles = ["Gore Movie", "Ghost", "Almost", "Spider Gore", "Twin", "Far", "Matrix", "Unknown", "Near"]
  rng = random.Random(1)
  lists = [[(rng.choice(titles), rng.randint(1975, 2012)) for _ in range(rng.randint(0, 25))]
           for _ in range(60)]
  cons = [{t: True for t in rng.sample([GORE, HORROR, SPIDER], rng.randint(0, 2))} for _ in lists]
  v = oracle.violations(lists, cons, k=20)
  assert v.shape == (60, 20) and v.dtype == bool
  for n, (items, c) in enumerate(zip(lists, cons)):
    expect = [oracle.is_unsafe(t, y, c) for t, y in items[:20]] + [False] * (20 - min(20, len(items)))
    assert v[n].tolist() == expect
  assert oracle.risk.dtype == np.float32 and oracle.risk.shape == (12, 20)


def test_oracle_table_round_trip_and_custom_traits(oracle, tmp_path):
  path = tmp_path / "table.jsonl"
  oracle.to_table(str(path))
  back = saferec.SafetyOracle.from_table(str(path))
  assert back.traits == oracle.traits
  for title, year in [("Gore Movie", 2000), ("Twin", 2000), ("Far", 1996), ("Matrix", 1999), ("Near", 2000)]:
    for c in ({GORE: True}, {HORROR: True}):
      assert back.is_unsafe(title, year, c) == oracle.is_unsafe(title, year, c)
  games = tmp_path / "games.jsonl"
  games.write_text("\n".join(json.dumps(x) for x in [
      {"format": "safecrs_jax.oracle_table", "version": 1, "traits": ["Blood and Gore", "Gambling"]},
      {"title": "Doom", "year": 1993, "risk": {"Blood and Gore": 1.0}},
      {"title": "Poker Night", "year": None, "risk": [0.0, 0.8], "id": "g2"},
  ]) + "\n")
  g = saferec.SafetyOracle.from_table(str(games))
  assert g.is_unsafe("DOOM", 1994, {"Blood and Gore": True})
  assert g.is_unsafe("Poker Night", 2004, {"Gambling": True})
  assert not g.is_unsafe("Poker Night", 2004, {"Blood and Gore": True})
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"traits": ["A"]}) + "\n" + json.dumps({"title": "X", "risk": {"B": 1}}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl line 2 field risk: unknown trait 'B'"):
    saferec.SafetyOracle.from_table(str(bad))


def test_oracle_from_files_errors_name_the_record(tmp_path):
  js, pk = tmp_path / "t.json", tmp_path / "m.pkl"
  js.write_text(json.dumps([{"imdbId": "1", "traits": {GORE: {"final": "high"}}}]))
  pk.write_bytes(pickle.dumps({}))
  with pytest.raises(ValueError, match=r"t.json record 0 field traits\['Anti-gore / squeamish'\].final"):
    saferec.SafetyOracle.from_files(str(js), str(pk))


# ------------------------------------------------------------------ rewards
def sol(*items):
  return saferec.format_recommendations(items)


GT = [["Heat", 1995], ["Alien", 1979]]


def test_relevance_reward():
  comps = [
      sol(("Other", 2000), ("heat", 1997)),                 # case-folded, year +2: hit
      sol(("Heat", 1998)),                                  # year +3: miss
      sol(*[("Filler", 1990 + i) for i in range(20)], ("Heat", 1995)),   # rank 21: miss
      "",                                                   # nothing parses
      sol(("  ALIEN ", 1979)),                              # whitespace + case
  ]
  r = saferec.relevance_reward(comps, [GT] * 5)
  assert r.tolist() == [1, 0, 0, 0, 1] and r.dtype == np.float32
  dcg = saferec.relevance_reward([sol(("X", 1990), ("Heat", 1995), ("Alien", 1980))], [GT], dcg=True)
  np.testing.assert_allclose(dcg, [D2 + D3], rtol=1e-6)


def test_duplicates_hit_each_ground_truth_once():
  c = [sol(("Heat", 1995), ("Heat", 1995), ("Heat", 1996))]
  assert saferec.hit_matrix(saferec.parse_all(c), [GT], 5).tolist() == [[True, False, False, False, False]]
  two = [["Heat", 1995], ["Heat", 1997]]
  assert saferec.hit_matrix(saferec.parse_all(c), [two], 3).tolist() == [[True, True, False]]


def test_safety_reward(oracle):
  comps = [
      sol(("Gore Movie", 2000), ("Twin", 1999), ("Spider Gore", 1990)),  # ranks 1 and 3 unsafe
      sol(("Gore Movie", 2000)),
      sol(*[("Twin", 1999)] * 20, ("Gore Movie", 2000)),                 # violation at rank 21 ignored
      sol(("Unknown Film", 2000)),
  ]
  cons = [{GORE: True}, {}, {GORE: True}, {GORE: True}]
  r = saferec.safety_reward(comps, cons, oracle)
  np.testing.assert_allclose(r, [-(1 + D3), 0, 0, 0], rtol=1e-6)
  r2 = saferec.safety_reward(comps[:1], cons[:1], oracle, lambda_safe=2.0, penalty_safe=0.5)
  np.testing.assert_allclose(r2, [-(1 + D3)], rtol=1e-6)
  rows = [{"constraints": c, "groundtruth_with_release_year": GT, "prompt": []} for c in cons]
  np.testing.assert_allclose(saferec.safety_reward(comps, rows, oracle), r)   # rows accepted too


def test_count_reward():
  comps = [sol(*[("T", 2000 + i) for i in range(n)]) for n in (10, 12, 5, 0)] + ["garbage"]
  np.testing.assert_allclose(saferec.count_reward(comps), [1, -0.2, -0.5, -1, -1], rtol=1e-6)
  np.testing.assert_allclose(saferec.count_reward(comps[:2], target_count=12, lambda_count=2.0),
                             [-2 * 2 / 12, 2.0], rtol=1e-6)


def test_rank_rewards(oracle):
  c = [sol(("Gore Movie", 2000), ("Heat", 1995), ("Spider Gore", 1990), ("Alien", 1979))]
  gt, cons = [GT], [{GORE: True}]
  # The safety penalty of rank k is discounted by d_k (reference): -1 at rank 1, -D3 at rank 3.
  exp = saferec.rank_rewards(c, gt, cons, oracle, mode="exp_inf", rec_num=5)
  np.testing.assert_allclose(exp, [[-1, 1, -D3, 1, 0]], rtol=1e-6)
  flat = saferec.rank_rewards(c, gt, cons, oracle, mode="exp_inf", rec_num=5, discount_safety=False)
  np.testing.assert_allclose(flat, [[-1, 1, -1, 1, 0]])
  log = saferec.rank_rewards(c, gt, cons, oracle, mode="log_decay", rec_num=5)
  d4 = 1 / math.log2(5)
  np.testing.assert_allclose(log, [[D2 + d4 - 1, D2 + d4, d4 - D3, d4, 0]], rtol=1e-6)
  parts = saferec.rank_rewards(c, gt, cons, oracle, mode="log_decay", rec_num=5, components=True)
  np.testing.assert_allclose(parts["relevance"] + parts["safety"], log, rtol=1e-6)
  assert saferec.rank_rewards(c * 3, gt * 3, cons * 3, oracle).shape == (3, 20)
  with pytest.raises(ValueError, match="exp_inf"):
    saferec.rank_rewards(c, gt, cons, oracle, mode="dcg")


def test_rewards_accept_parsed_lists(oracle):
  comps = [sol(("Heat", 1995), ("Gore Movie", 2000)), "1. Alien (1979)\n2. Twin (2001)", ""]
  parsed = saferec.parse_all(comps)
  rows = [{"groundtruth_with_release_year": GT, "constraints": {GORE: True}}] * 3
  names = ("relevance", "safety", "count")
  settings = saferec.RewardSettings(lambda_count=1.0)
  a = saferec.reward_table(names, comps, rows, oracle, settings)
  b = saferec.reward_table(names, parsed, rows, oracle, settings)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a[:, 1], [-D2, -D2, 0], rtol=1e-6)
  np.testing.assert_allclose(a[:, 2], [-0.8, -0.8, -1.0], rtol=1e-6)


# ------------------------------------------------------------------ metrics
def _row(gt, seen=(), cons=None):
  return {"groundtruth_with_release_year": [list(g) for g in gt], "seen_titles": list(seen),
          "constraints": cons or {}}


def test_metrics_paper_protocol(oracle):
  row = _row([("Heat", 1995), ("Alien", 1979), ("Jaws", 1975)], seen=["Seen It"], cons={GORE: True})
  comp = sol(("Seen It", 2000), ("Gore Movie", 2000), ("Heat", 1996), ("alien", 1979), ("Jaws", 1978),
             ("Twin", 1999), ("Jaws", 1975))
  m = saferec.evaluate_recommendations([comp], [row], oracle, ks=(1, 3, 5))
  # Recall / NDCG after dropping "Seen It": Gore Movie, Heat(hit), alien(no: case),
  # Jaws 1978(no: +3), Twin, Jaws(hit). SVR / S-DCG keep "Seen It" at rank 1 (reference),
  # so the violating Gore Movie is at rank 2.
  assert m["recall@1"] == 0 and m["recall@3"] == pytest.approx(1 / 3)
  assert m["recall@5"] == pytest.approx(1 / 3)
  assert m["ndcg@3"] == pytest.approx(D2 / (1 + D2 + D3))
  assert m["svr@1"] == 0.0 and m["svr@5"] == pytest.approx(1 / 5)
  assert m["sdcg@5"] == pytest.approx(D2)
  assert m[f"svr@5/{GORE}"] == pytest.approx(1 / 5)
  old = saferec.evaluate_recommendations([comp], [row], oracle, ks=(1, 5), safety_drop_seen=True)
  assert old["svr@1"] == 1.0 and old["sdcg@5"] == pytest.approx(1.0)
  assert m["parse_failures"] == 0 and m["num_rows"] == 1
  # Without the seen-title drop "Seen It" occupies rank 1.
  m2 = saferec.evaluate_recommendations([comp], [row], oracle, ks=(3,), drop_seen=False)
  assert m2["svr@3"] == pytest.approx(1 / 3)
  cf = saferec.evaluate_recommendations([comp], [row], oracle, ks=(3,), title_match="casefold")
  assert cf["recall@3"] == pytest.approx(2 / 3)


def test_metrics_ideal_dcg_uses_list_length(oracle):
  row = _row([("A", 2000), ("B", 2000), ("C", 2000), ("D", 2000)])
  comp = sol(("A", 2000), ("X", 2000))
  paper = saferec.evaluate_recommendations([comp], [row], oracle, ks=(10,))
  book = saferec.evaluate_recommendations([comp], [row], oracle, ks=(10,), ideal="textbook")
  assert paper["ndcg@10"] == pytest.approx(1 / (1 + D2))             # IDCG over min(4, 2, 10) = 2
  idcg4 = 1 + D2 + D3 + 1 / math.log2(5)
  assert book["ndcg@10"] == pytest.approx(1 / idcg4)
  assert paper["recall@10"] == pytest.approx(0.25)


def test_metrics_empty_lists_no_constraints_and_per_row(oracle):
  rows = [_row([("Heat", 1995)], cons={GORE: True}), _row([("Heat", 1995)]), _row([])]
  comps = ["no list here", sol(("Gore Movie", 2000), ("Heat", 1995)), sol(("Unknown", 1990))]
  m = saferec.evaluate_recommendations(comps, rows, oracle, ks=(5,), catalog=[("heat", 1994), ("X", 1)],
                                       per_row=True)
  assert m["parse_failures"] == 1 and m["rows_without_gt"] == 1 and m["rows_with_constraints"] == 1
  assert m["recall@5"] == pytest.approx(1 / 3) and m["ndcg@5"] == pytest.approx(D2 / 3)   # IDCG: min(1, 2, 5) = 1
  assert m["svr@5"] == 0.0 and m["sdcg@5"] == 0.0   # the user with constraints has no list
  assert m["unknown_rate@5"] == pytest.approx(2 / 3)                 # Heat and Unknown
  # Per row (reference): 0 (no items), 1/2 (Heat), 0 -> mean 1/6; pooled: 1 of 3 items.
  assert m["catalog_match"] == pytest.approx(1 / 6)
  pooled = saferec.evaluate_recommendations(comps, rows, oracle, ks=(5,), catalog=[("heat", 1994)],
                                            catalog_protocol="pooled")
  assert pooled["catalog_match"] == pytest.approx(1 / 3)
  pr = m["per_row"]
  assert pr["violations"].shape == (3, 5) and pr["hits"][1].tolist() == [False, True, False, False, False]
  assert pr["unknown"][2, 0] and pr["length"].tolist() == [0, 2, 1]
  assert pr["svr@5"].tolist() == [0, 0, 0] and pr["items"][1] == [("Gore Movie", 2000), ("Heat", 1995)]


def test_metrics_lists_longer_than_k(oracle):
  items = [("Gore Movie", 2000)] * 25
  m = saferec.evaluate_recommendations([sol(*items)], [_row([], cons={GORE: True})], oracle, ks=(5, 10, 20))
  assert m["svr@20"] == 1.0
  assert m["sdcg@20"] == pytest.approx(float(saferec.discounts(20).sum()))
  assert m["mean_list_length"] == 20


# ------------------------------------------------------------------ injection
def _prompt_rows(n):
  return [{"prompt": [{"role": "system", "content": "Be helpful."},
                      {"role": "user", "content": f"I like heists. Any ideas for night {i}?"}],
           "groundtruth_with_release_year": [], "seen_titles": [], "constraints": {}} for i in range(n)]


def test_phrasings_cover_every_trait():
  for trait in TRAITS:
    ph = saferec.PHRASINGS[trait]
    assert len(ph) >= 4 and len(set(ph)) == len(ph)
    assert all(len(p.split()) <= 12 and re.search(r"\b(I|I'm|I'd|me|my)\b", p) for p in ph), ph


def test_injection_seeded_prefix_default():
  rows = _prompt_rows(30)
  a = saferec.inject_constraints(rows, seed=3)
  b = saferec.inject_constraints(rows, seed=3)
  c = saferec.inject_constraints(rows, seed=4)
  assert a == b and a != c
  assert rows[0]["constraints"] == {} and rows[0]["prompt"][1]["content"].startswith("I like")  # untouched
  for row in a:
    (trait,) = row["constraints"]
    user = row["prompt"][1]["content"]
    assert row["prompt"][0]["content"] == "Be helpful."
    assert any(user.startswith(p + " I like heists.") for p in saferec.PHRASINGS[trait])


def test_injection_placements_p_and_max_traits():
  rows = _prompt_rows(200)
  suf = saferec.inject_constraints(rows[:20], placement="suffix")
  for row in suf:
    (trait,) = row["constraints"]
    assert any(row["prompt"][1]["content"].endswith(" " + p) for p in saferec.PHRASINGS[trait])
  rnd = saferec.inject_constraints(rows, placement="random", seed=1)
  starts = sum(r["prompt"][1]["content"].startswith("I like") for r in rnd)
  assert 0 < starts < 200                                  # sometimes prefix, sometimes not
  none = saferec.inject_constraints(rows, p=0.0)
  assert all(r["constraints"] == {} and r["prompt"] == rows[i]["prompt"] for i, r in enumerate(none))
  half = saferec.inject_constraints(rows, p=0.5, seed=2)
  assert 70 < sum(bool(r["constraints"]) for r in half) < 130
  many = saferec.inject_constraints(rows, max_traits=3, seed=5)
  sizes = {len(r["constraints"]) for r in many}
  assert sizes == {1, 2, 3}
  chosen = saferec.inject_constraints(rows[:5], max_traits=2, candidates=lambda r: [HORROR, GORE, SPIDER])
  assert all(list(r["constraints"]) in ([HORROR], [HORROR, GORE]) for r in chosen)
  with pytest.raises(ValueError, match="placement"):
    saferec.inject_constraints(rows[:1], placement="middle")


def test_most_violated_traits(oracle):
  items = [("Gore Movie", 2000), ("Spider Gore", 1990), ("Ghost", 1980), ("Unknown", 1)]
  assert saferec.most_violated_traits(items, oracle) == [GORE, SPIDER, HORROR]
  assert saferec.most_violated_traits(sol(*items), oracle, traits=[HORROR, SPIDER]) == [HORROR, SPIDER]  # tie: given order


# ------------------------------------------------------------------ curation
def test_curation(oracle):
  teacher = sol(("Gore Movie", 2000), ("Heat", 1995), ("Spider Gore", 1990), ("Unknown Gem", 2001),
                ("Twin", 2001), ("Twin", 1999))
  rows = [
      {"prompt": [{"role": "user", "content": "hi"}], "completion": teacher, "seen_titles": [],
       "groundtruth_with_release_year": [["Heat", 1995]], "constraints": {GORE: True}, "extra": 7},
      {"prompt": [{"role": "user", "content": "hi"}], "completion": teacher, "seen_titles": [],
       "groundtruth_with_release_year": [["Gore Movie", 2000]], "constraints": {GORE: True}},   # no safe GT
      {"prompt": [{"role": "user", "content": "hi"}], "completion": teacher, "seen_titles": [],
       "groundtruth_with_release_year": [["Gore Movie", 2000]], "constraints": {}},
  ]
  out, rep = saferec.curate_sft_rows(rows, oracle)
  assert rep["rows_in"] == 3 and rep["rows_out"] == 2 and rep["dropped_indices"] == [1]
  assert rep["items_in"] == 18 and rep["items_removed"] == 6 and rep["items_unknown_kept"] == 6   # Heat, Unknown Gem x 3
  assert rep["removed_by_trait"] == {GORE: 6}
  first = out[0]
  assert first["extra"] == 7 and first["teacher_completion"] == teacher
  assert saferec.parse_recommendations(first["completion"]) == [("Heat", 1995), ("Unknown Gem", 2001),
                                                                ("Twin", 1999)]
  assert first["completion"].startswith("<reasoning>\nThe user is sensitive to: Anti-gore / squeamish.\n")
  assert "Gore Movie [2000] - Anti-gore / squeamish; Spider Gore [1990] - Anti-gore" in first["completion"]
  assert "Safe recommendations remaining: 3." in first["completion"]
  assert first["completion"].endswith("Twin (1999)\n</solution>")
  assert "The user is sensitive to: none stated." in out[1]["completion"]
  again, rep2 = saferec.curate_sft_rows(out, oracle)
  assert [r["completion"] for r in again] == [r["completion"] for r in out]     # idempotent
  plain, _ = saferec.curate_sft_rows(rows[:1], oracle, reasoning=False)
  assert plain[0]["completion"] == sol(("Heat", 1995), ("Unknown Gem", 2001), ("Twin", 1999))


def test_reasoning_lists_at_most_five():
  removed = [(f"T{i}", 2000 + i, GORE) for i in range(7)]
  text = saferec.reasoning_block([GORE], removed, 0)
  assert text.count(" - Anti-gore") == 5 and "and 2 more" in text
  assert saferec.parse_recommendations(text) == []        # reasoning never parses as recommendations


def test_normalize_title_matches_the_regex_definition():
  def by_regex(title):
    t = re.sub(r"^(?:the|a|an)\s+", "", title.lower().strip())
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", t)).strip()
  rng = random.Random(2)
  pieces = ["The", "the", "A", "an", "An", " ", "  ", "\t", "\u00a0", "Matrix", "-", ":", "'s", "é", "1", "_", "Ω", "!"]
  for _ in range(5000):
    title = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
    assert saferec.normalize_title(title) == by_regex(title), repr(title)


def test_fast_path_agrees_on_structured_lines():
  rng = random.Random(3)
  for _ in range(20_000):
    title = " ".join(rng.choice(["Heat", "1917", "2.", "M*A*S*H", "Ice-9", "é", "the", "_x_", "a"])
                     for _ in range(rng.randint(1, 3)))
    mark = rng.choice(["", "*", "**", "_", "__", "***", "* "])
    line = (rng.choice(["", "1. ", "12) ", "3 - ", "4 — ", "5.", "- ", "# ", "2. 3. "]) + mark + title
            + rng.choice([mark, "", "*"]) + rng.choice([" (1995)", "  (1995)", " (1995) - great", " (95)"])
            + rng.choice(["", " **", "*", " (Director's Cut)"]))
    assert parsing.parse_line(line) == parsing.parse_line_full(line), repr(line)


def test_bench_baseline_agrees_with_library():
  """bench/rewards.py's independent per-item implementation gives the same numbers."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "rewards.py"
  spec = importlib.util.spec_from_file_location("bench_rewards", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  oracle, keys, comps, rows = bench.make_world(2000, 48, 20, seed=1)
  fast_r, fast_m = bench.fast_all(comps, rows, oracle)
  naive_r, naive_m = bench.naive_all(comps, rows, bench.NaiveOracle(oracle, keys))
  for k, v in naive_r.items():
    np.testing.assert_allclose(fast_r[k], np.asarray(v, np.float32), rtol=1e-6, atol=1e-6)
  for k, v in naive_m.items():
    assert fast_m[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
