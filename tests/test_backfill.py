"""Safe-SFT curation with back-fill (saferec.curate_sft_rows(backfill=True)).

The oracle is test_saferec's tiny one. For the Anti-gore constraint (GORE) its
known safe movies are Ghost 1980 (horror only), Almost 1980, Twin 1999,
Far 2010, Matrix 1999 and Near 1998; Gore Movie 2000, Spider Gore 1990,
Twin 2001, Far 1990 and Near 2002 are unsafe; Heat, Unknown Gem and No Record
are unknown to it. Every expected list below is worked out by hand.
"""
from configs import demo
from safecrs_jax import saferec
from safecrs_jax.train import loop as train_loop
from safecrs_jax.train import sft_data
from tests import test_saferec
from tests.test_saferec import GORE, HORROR, sol

oracle_files, oracle = test_saferec.oracle_files, test_saferec.oracle   # its fixtures, reused

ASK = [{"role": "user", "content": "hi"}]


def row(teacher, constraints=None, gt=(("Heat", 1995),), seen=(), **extra):
  return {"prompt": ASK, "completion": sol(*teacher), "seen_titles": list(seen),
          "groundtruth_with_release_year": [list(g) for g in gt],
          "constraints": dict(constraints or {}), **extra}


def items(curated_row):
  return saferec.parse_recommendations(curated_row["completion"])


# Row A loses Gore Movie and Spider Gore (2 of its 4). The other rows make the
# pool (an item counts once per row; ties by title, then year):
#   Ghost 1980 (2 rows), Twin 1999 (2), then 1 row each, by title: Almost 1980,
#   Far 2010, Gore Movie 2000, Heat 1995, Near 1998, Near 2002, Spider Gore 1990,
#   Unknown Gem 2001.
# B comes first, so the pool writes "Almost"; A's own "almost" must still count
# as already in A's list.
B = row([("Twin", 1999), ("Far", 2010), ("Ghost", 1980), ("Near", 2002), ("Almost", 1980)])
C = row([("Twin", 1999), ("Ghost", 1980), ("Near", 1998), ("Unknown Gem", 2001)])
A = row([("Gore Movie", 2000), ("almost", 1980), ("Spider Gore", 1990), ("Heat", 1995)],
        {GORE: True}, seen=["TWIN"])


def test_off_by_default_is_the_reference(oracle):
  rows = [B, C, A]
  out, rep = saferec.curate_sft_rows(rows, oracle)
  off, rep_off = saferec.curate_sft_rows(rows, oracle, backfill=False)
  assert [r["completion"] for r in out] == [r["completion"] for r in off] and rep == rep_off
  assert rep["items_backfilled"] == 0
  assert out[2]["completion"] == (
      "<reasoning>\nThe user is sensitive to: Anti-gore / squeamish.\n"
      "Removed as unsafe: Gore Movie [2000] - Anti-gore / squeamish; "
      "Spider Gore [1990] - Anti-gore / squeamish.\n"
      "Safe recommendations remaining: 2.\n</reasoning>\n" + sol(("almost", 1980), ("Heat", 1995)))
  assert out[2]["teacher_completion"] == A["completion"]
  # curate_row without a pool: no back-fill either
  single, facts = saferec.curate_row(A, oracle)
  assert single["completion"] == out[2]["completion"] and facts["backfilled"] == []


def test_backfill_appends_exactly_the_removed_count_in_pool_order(oracle):
  out, rep = saferec.curate_sft_rows([B, C, A], oracle, backfill=True)
  got = items(out[2])
  # Ghost (pool #1, safe for gore); Twin 1999 seen; Almost already there;
  # Far 2010 next. Heat is unknown, never fill.
  assert got == [("almost", 1980), ("Heat", 1995), ("Ghost", 1980), ("Far", 2010)]
  assert len(got) == len(saferec.parse_recommendations(A["completion"]))
  fill = got[2:]
  assert not any(oracle.violated_traits(t, y, A["constraints"]) for t, y in fill)
  assert not {t.casefold() for t, _ in fill} & {s.casefold() for s in A["seen_titles"]}
  assert len({(t.casefold(), y) for t, y in got}) == len(got)
  assert all(oracle.resolve(t, y) >= 0 for t, y in fill)
  text = out[2]["completion"]
  assert "Safe recommendations remaining: 4.\n</reasoning>" in text
  assert "Removed as unsafe: Gore Movie [2000] - Anti-gore / squeamish; Spider Gore [1990]" in text
  assert text.count("Ghost") == 1                       # nothing about the fill in the reasoning
  # rows that lost nothing are unchanged
  assert items(out[0]) == saferec.parse_recommendations(B["completion"])
  assert items(out[1]) == saferec.parse_recommendations(C["completion"])
  assert rep["items_backfilled"] == 2 and rep["items_removed"] == 2


def test_constraints_of_the_row_decide_the_fill(oracle):
  # Gore + horror: Ghost (horror) and Matrix are out too; Far 2010 and Near 1998 fill.
  strict = dict(A, constraints={GORE: True, HORROR: True})
  out, rep = saferec.curate_sft_rows([B, C, strict], oracle, backfill=True)
  assert items(out[2]) == [("almost", 1980), ("Heat", 1995), ("Far", 2010), ("Near", 1998)]
  assert rep["items_backfilled"] == 2


def test_same_genre_items_come_first(oracle):
  g1 = row([("Gore Movie", 2000), ("Spider Gore", 1990), ("Twin", 2001), ("Heat", 1995)],
           {GORE: True}, genre="horror")
  g2 = row([("Far", 2010)], genre="horror")
  o1 = row([("Twin", 1999), ("Ghost", 1980)], genre="comedy")
  o2 = row([("Ghost", 1980), ("Twin", 1999)], genre="comedy")
  out, rep = saferec.curate_sft_rows([g1, g2, o1, o2], oracle, backfill=True)
  # horror pool: Far 2010, Gore Movie, Heat, Spider Gore, Twin 2001 (1 row each);
  # then the rest: Ghost 1980, Twin 1999 (2 rows each).
  assert items(out[0]) == [("Heat", 1995), ("Far", 2010), ("Ghost", 1980), ("Twin", 1999)]
  assert rep["items_backfilled"] == 3
  # without genres, the overall ranking alone: Ghost and Twin 1999 before Far
  plain = [{k: v for k, v in r.items() if k != "genre"} for r in (g1, g2, o1, o2)]
  out2, _ = saferec.curate_sft_rows(plain, oracle, backfill=True)
  assert items(out2[0]) == [("Heat", 1995), ("Ghost", 1980), ("Twin", 1999), ("Far", 2010)]
  pool = saferec.backfill_pool([g1, g2, o1, o2])
  assert list(pool.candidates("horror"))[:2] == [("Far", 2010), ("Gore Movie", 2000)]
  assert list(pool.candidates("nope"))[:2] == list(pool.candidates())[:2] == [("Ghost", 1980),
                                                                              ("Twin", 1999)]
  assert len(list(pool.candidates("horror"))) == len(pool.ranked) == 7   # each item once


def test_unknown_movies_are_never_fill(oracle):
  # The pool holds only unknown movies (and the row's own unsafe one).
  lone = row([("Gore Movie", 2000), ("Heat", 1995)], {GORE: True})
  others = row([("No Record", 2000), ("Unknown Gem", 2001), ("Never Heard Of It", 2000)])
  out, rep = saferec.curate_sft_rows([others, lone], oracle, backfill=True)
  assert items(out[1]) == [("Heat", 1995)]     # the teacher's unknown Heat stays, no unknown fill
  assert rep["items_backfilled"] == 0


def test_pool_running_out_leaves_the_list_shorter(oracle):
  only = row([("Gore Movie", 2000), ("Far", 1990), ("Almost", 1980), ("Near", 2002)], {GORE: True},
             gt=[("Almost", 1980)])
  helper = row([("Twin", 1999)])
  out, rep = saferec.curate_sft_rows([only, helper], oracle, backfill=True)
  assert items(out[0]) == [("Almost", 1980), ("Twin", 1999)]     # 3 removed, 1 safe to add
  assert "Safe recommendations remaining: 2." in out[0]["completion"]
  assert rep["items_backfilled"] == 1 and rep["items_removed"] == 3
  empty = row([("Gore Movie", 2000)], {GORE: True})
  out, rep = saferec.curate_sft_rows([empty], oracle, backfill=True)
  assert items(out[0]) == [] and rep["rows_empty_target"] == 1 and rep["items_backfilled"] == 0
  assert saferec.curate_sft_rows([], oracle, backfill=True)[0] == []


def test_idempotent_and_dropped_rows_stay_out_of_the_pool(oracle):
  # D has no safe ground truth: dropped, and its list is not in the pool (had
  # it been, Near 1998 would rank before Far 2010 and the second pass, without
  # D, would fill differently).
  d = row([("Near", 1998), ("Gore Movie", 2000)], {GORE: True}, gt=[("Gore Movie", 2000)])
  out, rep = saferec.curate_sft_rows([B, C, d, A], oracle, backfill=True)
  assert rep["dropped_indices"] == [2] and rep["rows_out"] == 3
  assert items(out[2]) == [("almost", 1980), ("Heat", 1995), ("Ghost", 1980), ("Far", 2010)]
  again, rep2 = saferec.curate_sft_rows(out, oracle, backfill=True)
  assert again == out
  assert rep2["items_backfilled"] == rep["items_backfilled"] == 2
  # a curated row curated without back-fill gets the reference target back
  off, _ = saferec.curate_sft_rows(out, oracle)
  assert items(off[2]) == [("almost", 1980), ("Heat", 1995)]


def test_report_counts_every_appended_item(oracle):
  rows = [B, C, A, dict(A, constraints={GORE: True, HORROR: True}, seen_titles=[]),
          row([("Gore Movie", 2000)], {GORE: True}, gt=[("Gore Movie", 2000)])]   # dropped
  out, rep = saferec.curate_sft_rows(rows, oracle, backfill=True)
  kept = [saferec.curate_row(r, oracle)[1]["kept"] for r in rows]
  appended = sum(len(items(c)) - len(k) for c, k in zip(out, [kept[i] for i in (0, 1, 2, 3)]))
  assert rep["items_backfilled"] == appended == 4
  assert items(out[3])[2:] == [("Twin", 1999), ("Far", 2010)]


def test_prepare_rows_and_fingerprint(oracle):
  c = demo.get_config("size=test,relational=off")
  assert c.sft.backfill is False
  base = train_loop.result_settings(c)
  assert "backfill" not in base["sft"]                 # old checkpoints' fingerprint unchanged
  rows, report = sft_data.prepare_rows([B, C, A], c, oracle)
  assert report["items_backfilled"] == 0 and len(items(rows[2])) == 2
  c.sft.backfill = True
  on = train_loop.result_settings(c)
  assert on["sft"]["backfill"] is True and on != base   # a resume with another setting is refused
  assert {k: v for k, v in on["sft"].items() if k != "backfill"} == base["sft"]
  rows, report = sft_data.prepare_rows([B, C, A], c, oracle)
  assert report["items_backfilled"] == 2 and len(items(rows[2])) == 4
