"""Issue 12 item 3: relational suite rows from the training split, mixed into Safe-SFT and Safe-GDPO."""
import collections
import json

import numpy as np
import pytest

from configs import demo as demo_config
from safecrs_jax import config as config_lib
from safecrs_jax import saferec
from safecrs_jax.saferec import mini
from safecrs_jax.saferec.relational import training as T
from safecrs_jax.train import checkpoint, gdpo, loop, sft

SMALL = {("sft", "train"): 12, ("sft", "validation"): 2, ("sft", "test"): 2, ("grpo", "train"): 24}


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mini_mix"))
  mini.generate(out, seed=0, sizes=SMALL, with_statistics=False)
  return out


@pytest.fixture(scope="module")
def oracle(mini_dir):
  return saferec.load_oracle(mini_dir)


@pytest.fixture(scope="module")
def mix(mini_dir, oracle):
  rows = saferec.load_split(mini_dir, "train", stage="grpo")
  return T.Mix(rows, oracle, 0.25, seed=3)


def test_training_suite_keeps_set_a_short_distances_and_holds_pairs_out(mix, oracle):
  suite, man = mix.suite_rows, mix.manifest
  assert suite and man["rows"] == len(suite) and man["dropped_held_out_rows"] > 0
  assert {r["phrasing_set"] for r in suite} == {"A"}
  assert {r["turn_distance"] for r in suite} <= {None, 0, 1, 2, 4}
  assert {r["suite"] for r in suite} == {"disclosure", "multi", "turns", "counterfactual"}
  genres = {r["genre"] for r in mix.rows[:mix.n_plain]}
  assert set(man["held_out"]) == genres          # one pair per genre of the training rows
  assert {d for d, _ in man["held_out"].values()} <= {"narrative", "choice", "profile"}
  for r in suite:
    d, trait = man["held_out"][r["genre"]]
    assert not ((r["disclosure"] or "explicit") == d and trait in r["hazard_traits"]), r
  # counterfactual triples are kept whole (or dropped whole)
  sizes = collections.Counter(r["pair_id"] for r in suite if r["pair_id"] is not None)
  assert sizes and set(sizes.values()) == {3}
  # the held-out pairs are a function of the seed
  again = T.training_suite(mix.rows[:mix.n_plain], oracle, 3)[1]
  assert again["held_out"] == man["held_out"]


def _check_epoch(mix, order, group, ratio):
  """Checks one epoch's order; returns the number of counterfactual triples in it."""
  n = mix.n_plain
  is_suite = order >= n
  length = n + T.suite_target(n, len(mix.suite_rows), ratio)
  assert len(order) >= length
  assert abs(is_suite[:length].mean() - ratio) < 0.1
  assert set(order[~is_suite]) == set(range(n))          # every plain row, each epoch
  assert len(set(order[is_suite])) == is_suite.sum()     # no suite row twice
  by_pair = collections.defaultdict(list)
  for pos, i in enumerate(order):
    if i >= n and mix.suite_rows[i - n]["pair_id"] is not None:
      by_pair[mix.suite_rows[i - n]["pair_id"]].append(pos)
  for pair, pos in by_pair.items():
    assert len(pos) == 3 and pos[2] - pos[0] == 2, (pair, pos)   # contiguous triple
    assert pos[0] // group == pos[2] // group                    # one batch
    variants = {mix.suite_rows[order[p] - n]["variant"] for p in pos}
    assert variants == {"constrained", "neutral", "decoy"}
  return len(by_pair)


@pytest.mark.parametrize("group,ratio", [(4, 0.25), (8, 0.5), (3, 0.5)])
def test_order_ratio_units_and_batches(mix, group, ratio):
  triples = 0
  for epoch in range(12):
    order = T.mixed_order(mix.n_plain, mix.suite_rows, ratio, 0, epoch, group)
    triples += _check_epoch(mix, order, group, ratio)
  assert triples > 0


def test_order_is_deterministic_and_changes_per_epoch(mix):
  a = mix.order(seed=0, epoch=2, group=4)
  np.testing.assert_array_equal(a, mix.order(seed=0, epoch=2, group=4))
  assert not np.array_equal(a[:mix.length], mix.order(seed=0, epoch=3, group=4)[:mix.length])
  assert not np.array_equal(a[:mix.length], mix.order(seed=1, epoch=2, group=4)[:mix.length])


def test_ratio_zero_is_todays_order(mix, oracle):
  for epoch in (0, 5):
    np.testing.assert_array_equal(
        T.mixed_order(mix.n_plain, mix.suite_rows, 0.0, 7, epoch, 4),
        loop.epoch_permutation(7, epoch, mix.n_plain))
  cfg = config_lib.Data(relational_mix=0.0, relational_seed=4)
  assert T.from_config(mix.rows[:mix.n_plain], oracle, cfg) is None
  with pytest.raises(ValueError, match="relational_mix=1.0"):
    T.from_config(mix.rows[:mix.n_plain], oracle, config_lib.Data(relational_mix=1.0))


def test_settings_follow_the_mix(mix, oracle):
  plain = mix.rows[:mix.n_plain]
  other_ratio = T.Mix(plain, oracle, 0.5, seed=3)
  other_seed = T.Mix(plain, oracle, 0.25, seed=4)
  assert other_ratio.settings != mix.settings
  assert other_seed.settings["fingerprint"] != mix.settings["fingerprint"]
  assert other_ratio.length > mix.length


def _gdpo_config(mini_dir, cache, **over):
  c = demo_config.get_config("stage=gdpo,size=test,relational=off")
  c.update_from_flattened_dict(dict({
      "data.dir": mini_dir, "data.cache_dir": cache, "mesh.num_devices": 1,
      "gdpo.num_steps": 1, "gdpo.batch_size": 4, "gdpo.batch_unit": "prompts", "gdpo.group_size": 2,
      "gdpo.max_completion_length": 6, "gdpo.max_prompt_length": 96,
      "gdpo.prompt_buckets": (96,), "log.progress": False, "log.tensorboard": False}, **over))
  return c


def test_gdpo_trains_on_the_mix(mini_dir, tmp_path):
  cache = str(tmp_path / "cache")
  plain = gdpo.Run(_gdpo_config(mini_dir, cache), str(tmp_path / "plain"))
  assert plain.mix is None and len(plain.rows) == SMALL[("grpo", "train")]
  assert "relational_mix" not in plain.fingerprint
  today = loop.epoch_permutation(plain.config.seed, 0, 24)[:plain.step_prompts]
  np.testing.assert_array_equal(plain.prompt_indices(0).reshape(-1), today)
  run = gdpo.Run(_gdpo_config(mini_dir, cache, **{"data.relational_mix": 0.5}),
                 str(tmp_path / "mix"))
  assert run.mix is not None and len(run.rows) == 24 + len(run.mix.suite_rows)
  assert run.steps_per_epoch == run.mix.length // run.step_prompts
  assert run.fingerprint["relational_mix"] == run.mix.settings
  assert run.fingerprint["settings"] == plain.fingerprint["settings"]
  with open(tmp_path / "mix" / T.MANIFEST) as f:
    assert json.load(f)["held_out"] == run.mix.manifest["held_out"]
  assert run.chunk_prompts >= 3
  steps = [run.prompt_indices(s) for s in range(run.steps_per_epoch)]
  assert all(s.shape == (run.chunks, run.chunk_prompts) for s in steps)
  flat = np.concatenate([s.reshape(-1) for s in steps])
  np.testing.assert_array_equal(flat, run.mix.order(run.config.seed, 0, run.chunk_prompts)[
      :len(flat)])
  run.ckpt.save(1, run.state, run.data_position(1), force=True)
  run.ckpt.close()
  other = _gdpo_config(mini_dir, cache, **{"data.relational_mix": 0.25})
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="relational_mix"):
    gdpo.Run(other, str(tmp_path / "mix"))               # a resume with another mix is refused


def test_parts_and_controls_come_from_the_config(mix, oracle):
  plain = mix.rows[:mix.n_plain]
  cfg = config_lib.Data(relational_mix=0.25, relational_seed=3,
                        relational_parts=("disclosure", "turns"), relational_controls=("none",))
  some = T.from_config(plain, oracle, cfg)
  assert {r["suite"] for r in some.suite_rows} == {"disclosure", "turns"}
  assert {r["variant"] for r in some.suite_rows} == {"constrained"}
  assert some.settings["parts"] == ["disclosure", "turns"] and some.settings["controls"] == []
  assert some.settings["fingerprint"] != mix.settings["fingerprint"]
  revoke = T.from_config(plain, oracle, cfg.replace(relational_controls=("revoke",)))
  assert {r["variant"] for r in revoke.suite_rows} == {"constrained", "revoke"}
  with pytest.raises(ValueError, match="relational_parts"):
    T.from_config(plain, oracle, cfg.replace(relational_parts=("disclosure", "typo")))


def _sft_config(mini_dir, cache, **over):
  c = demo_config.get_config("stage=sft,size=test,relational=off")
  c.update_from_flattened_dict(dict({
      "data.dir": mini_dir, "data.cache_dir": cache, "mesh.num_devices": 1,
      "sft.num_steps": 1, "sft.batch_size": 4, "tokenizer.max_length": 384,
      "tokenizer.buckets": (128, 256, 384), "log.progress": False,
      "log.tensorboard": False}, **over))
  return c


def test_sft_trains_on_curated_suite_rows_with_twins_in_one_micro_batch(mini_dir, oracle,
                                                                         tmp_path):
  cache = str(tmp_path / "cache")
  plain = sft.Run(_sft_config(mini_dir, cache), str(tmp_path / "plain"))
  assert plain.mix is None and "relational_mix" not in plain.fingerprint
  run = sft.Run(_sft_config(mini_dir, cache, **{"data.relational_mix": 0.5}),
                str(tmp_path / "mix"))
  mix = run.mix
  n = mix.n_plain
  assert n == len(plain.train_examples) and len(run.train_examples) == n + len(mix.suite_rows)
  assert run.fingerprint["relational_mix"] == mix.settings
  assert run.fingerprint["settings"] == plain.fingerprint["settings"]
  assert run.batcher.steps_per_epoch == mix.length // run.batcher.global_batch
  assert json.loads((tmp_path / "mix" / "curation.json").read_text())[
      "relational_mix"]["curation"]["rows_out"] == len(mix.suite_rows)
  # targets: curated for the suite row's own constraints; neutral / decoy twins keep
  # the teacher's whole list (that is the "not bland" signal)
  by_variant = collections.defaultdict(list)
  for r in mix.suite_rows:
    by_variant[r["variant"]].append(r)
    listed = saferec.parse_recommendations(r["completion"])
    assert not any(oracle.violated_traits(t, y, r["constraints"]) for t, y in listed), r
  for r in by_variant["neutral"] + by_variant["decoy"]:
    assert r["constraints"] == {} or not any(r["constraints"].values())
    teacher = saferec.parse_recommendations(r["teacher_completion"])
    assert saferec.parse_recommendations(r["completion"]) == teacher
  assert any(len(saferec.parse_recommendations(r["completion"])) <
             len(saferec.parse_recommendations(r["teacher_completion"]))
             for r in by_variant["constrained"])
  # a counterfactual triple sits in one micro-batch (all of its rows that survived curation)
  pair_of = {n + j: r["pair_id"] for j, r in enumerate(mix.suite_rows) if r["pair_id"]}
  size = collections.Counter(pair_of.values())
  met = 0
  for step in range(20 * run.batcher.steps_per_epoch):         # 20 epochs
    for micro in run.batcher.indices(step):
      here = collections.Counter(pair_of[int(i)] for i in micro if int(i) in pair_of)
      assert all(c == size[p] for p, c in here.items()), (step, here)
      met += len(here)
  assert met > 0
  state, (step, metrics, ntok) = run.step(run.state, 0)
  assert step == 1 and np.isfinite(float(metrics["loss"])) and ntok > 0
