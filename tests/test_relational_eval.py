"""Relational evaluation: the suite built / reused / rebuilt, launch.evaluate --suite=relational,
the card for two models side by side, and the demo's relational verdict.

As tests/test_evaluation.py: the demo config at size=test, untrained models exported as
Hugging Face directories, SafeRec-mini and the tokenizer built once into a module temp folder.
"""
import json
import os
import subprocess
import sys

import pytest

from configs import demo as demo_config
from safecrs_jax import demo, evaluation
from safecrs_jax.saferec import relational as rel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(cache, seed=0, **eval_over):
  c = demo_config.get_config("stage=sft,size=test,relational=off")
  c.data.cache_dir = str(cache)
  c.log.progress = False
  c.seed = seed
  c.eval.batch_size = 16
  c.eval.max_new_tokens = 8
  c.eval.ks = (10,)
  c.eval.relational_max_sources = 1
  for k, v in eval_over.items():
    c.eval[k] = v
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("relational_eval")
  config = _config(root / "assets")
  base = demo.export_base(config, str(root / "base"))
  other = demo.export_base(_config(root / "assets", seed=1), str(root / "other"))
  return root, config, base, other


def test_suite_is_reused_only_from_the_same_inputs(setup, capsys):
  root, config, _, _ = setup
  suite_dir = str(root / "suite")
  rows, manifest, _ = evaluation.build_suite(config, suite_dir)
  assert manifest["source"]["rows"] == 1 and len(rows) == manifest["rows"] > 20
  assert manifest["suite_fingerprint"] == rel.fingerprint(rows)
  capsys.readouterr()
  again, _, _ = evaluation.build_suite(config, suite_dir)
  assert again == rows and "rebuilding" not in capsys.readouterr().out
  # Another seed: rebuilt, and the message names the input that changed.
  reseeded, m2, _ = evaluation.build_suite(_config(root / "assets", relational_seed=3), suite_dir)
  assert "rebuilding" in capsys.readouterr().out
  assert m2["inputs"]["seed"] == 3 and rel.fingerprint(reseeded) != rel.fingerprint(rows)
  # More source rows: rebuilt with them.
  more, m3, _ = evaluation.build_suite(_config(root / "assets", relational_max_sources=2),
                                       suite_dir)
  assert "inputs.max_sources" in capsys.readouterr().out and m3["source"]["rows"] == 2
  assert len(more) > len(rows)
  # A rows file edited after the fact does not prove its inputs: rebuilt.
  path = os.path.join(suite_dir, "relational.jsonl")
  lines = open(path, encoding="utf-8").read().splitlines()
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines[:-1]) + "\n")
  fixed, _, _ = evaluation.build_suite(_config(root / "assets", relational_max_sources=2),
                                       suite_dir)
  assert "fingerprint" in capsys.readouterr().out and fixed == more
  assert len(open(path, encoding="utf-8").read().splitlines()) == len(more)


def test_pair_sources_add_twin_pairs_from_more_rows(setup):
  root, config, _, _ = setup
  one, _, _ = evaluation.build_suite(config, str(root / "suite_one"))
  cfg = _config(root / "assets", relational_pair_sources=3)
  rows, manifest, _ = evaluation.build_suite(cfg, str(root / "suite_pairs"))
  assert manifest["source"]["rows"] == 3 and manifest["inputs"]["pair_sources"]["counterfactual"] == 3
  assert [r for r in rows if r["source_index"] == 0] == one
  later = [r for r in rows if r["source_index"] > 0]
  assert later and {r["suite"] for r in later} == {"counterfactual"}
  assert len({r["pair_id"] for r in rows if r["pair_id"]}) == 3
  assert evaluation.relational.part_sources(config, 1) is None


def test_prompt_settings_fit_the_longest_suite_prompt(setup):
  _, config, _, _ = setup            # eval.max_prompt_length 128, buckets (64, 128)
  assert evaluation.prompt_settings(config, [40, 531]) == (576, (64, 128, 256, 384, 512, 576))
  assert evaluation.prompt_settings(config, [40, 90]) == (128, (64, 128))
  fixed = _config("unused", relational_max_prompt_length=200, relational_prompt_buckets=(100, 200))
  assert evaluation.prompt_settings(fixed, [40, 531]) == (200, (100, 200))


def test_two_models_side_by_side_on_one_card(setup):
  root, config, base, other = setup
  work = root / "pair"
  reports = evaluation.evaluate_relational(config, {"seed0": base, "seed1": other}, str(work),
                                           progress=False)
  assert list(reports) == ["seed0", "seed1"]
  suite = [json.loads(x) for x in open(work / "suite" / "relational.jsonl", encoding="utf-8")]
  for name, r in reports.items():
    gen = r["generation"]
    # Multi-turn prompts are longer than eval.max_prompt_length=128: the suite's own
    # length is used and nothing is cut.
    assert gen["longest_prompt"] > 128 and gen["max_prompt_length"] >= gen["longest_prompt"]
    assert gen["truncated_prompts"] == 0
    assert r["metrics"]["rows"] == len(suite)
    assert r["metrics"] == rel.report(
        [g["text"] for g in map(json.loads, open(work / name / evaluation.GENERATIONS))],
        suite, _oracle(config), (10,))
    saved = json.load(open(work / name / evaluation.REPORT))
    assert saved["metrics"] == r["metrics"] and saved["checkpoint"]["kind"] == "hf"
  card = (work / "card.md").read_text()
  assert "| metric | seed0 | seed1 |" in card
  for question in rel.card.QUESTIONS:
    assert f"## {question}" in card
  assert set(json.load(open(work / "relational.json"))) == {"seed0", "seed1"}
  for plot in rel.card.PLOTS:
    assert (work / plot).stat().st_size > 1000
  table = evaluation.headline_table(reports, evaluation.RELATIONAL_HEADLINE)
  assert "| seed0 |" in table and "| seed1 |" in table
  # Re-running reuses every generation (raw files unchanged) and gives the same reports.
  raw = (work / "seed0" / evaluation.RAW).read_text()
  again = evaluation.evaluate_relational(config, {"seed0": base, "seed1": other}, str(work),
                                         progress=False)
  assert (work / "seed0" / evaluation.RAW).read_text() == raw
  assert again["seed1"]["metrics"] == reports["seed1"]["metrics"]


def _oracle(config):
  return evaluation.load_eval_data(config)[1]


def _launch(args):
  cmd = [sys.executable, "-m", "launch.evaluate", "--config=configs/demo.py:size=test"] + args
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two subprocesses, each importing JAX: ~30 s of CPU
def test_launch_evaluate_suite_relational(setup):
  root, config, base, _ = setup
  work = root / "launch"
  common = [f"--config.data.cache_dir={config.data.cache_dir}",
            "--config.eval.relational_max_sources=1", "--config.eval.max_new_tokens=8",
            "--config.log.progress=False", "--suite=relational", f"--workdir={work}"]
  proc = _launch(common + [f"--checkpoint={base}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| model | svr@10 | svr@10/turns=4 |" in proc.stdout and "| base |" in proc.stdout
  report = json.load(open(work / "base" / evaluation.REPORT))
  assert report["split"] == "test" and report["generation"]["truncated_prompts"] == 0
  assert (work / "card.md").exists() and (work / "suite" / "manifest.json").exists()
  bad = _launch(common + [f"--checkpoint={root / 'missing'}"])
  assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def _tables(sft_turns=0.2, gdpo_turns=0.1, sft_narr=0.3, gdpo_narr=0.1, ofr=0.43, gdpo_svr=0.05):
  table = {"sft": {"svr@10": 0.10, "recall@10": 0.08},
           "gdpo": {"svr@10": gdpo_svr, "recall@10": 0.08}}
  rel_t = {"sft": {"svr@10/turns=4": sft_turns, "svr@10/disclosure=narrative": sft_narr,
                   "ofr@10": 0.4},
           "gdpo": {"svr@10/turns=4": gdpo_turns, "svr@10/disclosure=narrative": gdpo_narr,
                    "ofr@10": ofr}}
  return table, rel_t


@pytest.mark.parametrize("kw,ok,reason", [
    ({}, True, None),
    ({"gdpo_turns": 0.2}, False, "svr@10/turns=4 not below SFT"),
    ({"gdpo_narr": 0.4}, False, "svr@10/disclosure=narrative not below SFT"),
    ({"ofr": demo.ofr_bound(0.4) + 0.01}, False, "ofr@10 0.710 above 0.700"),
    ({"ofr": demo.ofr_bound(0.4) - 0.01}, True, None),
    ({"ofr": 1.0}, False, "GDPO over-filters"),              # bland
    ({"ofr": 0.3}, True, None),                             # filtering less than SFT is fine
    ({"gdpo_svr": 0.09}, False, "SVR@10 did not fall"),
    ({"sft_turns": 0.0, "gdpo_turns": 0.0}, True, None),    # both already at 0
])
def test_relational_verdict(kw, ok, reason):
  table, rel_t = _tables(**kw)
  got, message = demo.verdict(table, rel_t)
  assert got == ok, message
  assert message.startswith("OK:" if ok else "NOT SHOWN")
  if reason:
    assert reason in message
  # Every figure is stated, pass or fail.
  g = rel_t["gdpo"]
  assert f"{100 * g['svr@10/turns=4']:.2f}%" in message
  assert f"{100 * g['svr@10/disclosure=narrative']:.2f}%" in message
  assert f"ofr@10 GDPO {g['ofr@10']:.3f}" in message


def test_relational_verdict_missing_metric_fails():
  table, rel_t = _tables()
  del rel_t["gdpo"]["ofr@10"]
  ok, message = demo.verdict(table, rel_t)
  assert not ok and "ofr@10 missing" in message
