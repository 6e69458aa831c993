"""Evaluation: metrics from saved generations, resume, run summaries.

One small untrained model (the demo config at size=test, exported as a
Hugging Face directory) serves every test; SafeRec-mini and the local
tokenizer are built once into a module temp folder.
"""
import json
import os

import numpy as np
import pytest

from configs import demo as demo_config
from safecrs_jax import demo, evaluation, saferec
from safecrs_jax.data import assets
from safecrs_jax.train import policy


def _config(cache, **eval_over):
  c = demo_config.get_config("stage=sft,size=test,relational=off")
  c.data.cache_dir = str(cache)
  c.log.progress = False
  c.eval.max_rows = 12
  c.eval.batch_size = 4
  c.eval.max_new_tokens = 12
  for k, v in eval_over.items():
    c.eval[k] = v
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluation")
  config = _config(root / "assets")
  base = demo.export_base(config, str(root / "base"))
  return root, config, base


def _read_jsonl(path):
  """The records of a JSON-lines file (the header line of raw generations left out)."""
  with open(path, encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if "header" not in r]


def test_metrics_match_hand_computation_from_saved_generations(setup):
  root, config, base = setup
  rows, oracle, _ = evaluation.load_eval_data(config)
  # Hand-written completions for the first rows; the rest stay empty. The
  # raw file is complete, so evaluation scores it without generating.
  r0, r1, r2 = rows[0], rows[1], rows[2]
  gt0 = r0["groundtruth_with_release_year"]
  trait1 = next(t for t, v in r1["constraints"].items() if v)
  catalog = saferec.load_catalog(assets.resolve_data_dir(config))
  unsafe1 = next((t, y) for t, y in catalog.items
                 if oracle.is_unsafe(t, y, {trait1: True}))
  safe1 = next((t, y) for t, y in catalog.items
               if not oracle.is_unsafe(t, y, {trait1: True})
               and oracle.resolve(t, y) >= 0
               and t not in {g[0] for g in r1["groundtruth_with_release_year"]})
  seen2 = r2["seen_titles"][0]
  gt2 = r2["groundtruth_with_release_year"][0]
  texts = {
      # hit at rank 1 (year off by 2 still counts), then a miss with a bad year.
      0: f"<solution>\n{gt0[0][0]} ({gt0[0][1] + 2})\nNo Such Film ({gt0[0][1]})\n</solution>",
      # safe, then unsafe: one violation among two items, at rank 2.
      1: f"1. {safe1[0]} ({safe1[1]})\n2. {unsafe1[0]} ({unsafe1[1]})",
      # the seen title is dropped before Recall / NDCG, so the GT hit moves to rank 1;
      # SVR / S-DCG keep it (the paper's protocol).
      2: f"{seen2} (1999)\n{gt2[0]} ({gt2[1]})",
  }
  prompts, row_to_prompt = evaluation.unique_prompts(rows)
  out = root / "hand" / "test" / "base"
  out.mkdir(parents=True)
  tok = policy.load_policy(config, base).tokenizer
  header = evaluation.generation_header(config, evaluation.resolve_targets(base)[0], rows, tok)
  with open(out / evaluation.RAW, "w", encoding="utf-8") as f:
    f.write(json.dumps({"header": header}) + "\n")   # made for this model, rows and settings
    for pid in range(len(prompts)):
      row = row_to_prompt.index(pid)
      f.write(json.dumps({"prompt_id": pid, "text": texts.get(row, "no idea"),
                          "num_tokens": 3, "stopped": True,
                          "prompt_truncated": False}) + "\n")
  reports = evaluation.evaluate(config, base, workdir=str(root / "hand"))
  m = reports[0]["metrics"]

  n = len(rows)
  d1, d2 = 1.0, 1 / np.log2(3)
  recall = (1 / len(gt0) + 0 + 1 / len(r2["groundtruth_with_release_year"])) / n
  # paper ideal DCG: min(num_gt, list length, K) ones -> row 0: min(G, 2), row 2: 1.
  idcg0 = sum(1 / np.log2(k + 2) for k in range(min(len(gt0), 2)))
  ndcg = (1 / idcg0 + 0 + 1.0) / n
  # Violations item by item with the single-movie oracle call.
  v0 = oracle.is_unsafe(gt0[0][0], gt0[0][1] + 2, r0["constraints"])
  v_seen = oracle.is_unsafe(seen2, 1999, r2["constraints"])
  v2 = oracle.is_unsafe(gt2[0], gt2[1], r2["constraints"])
  svr = (v0 / 2 + 0.5 + (v_seen + v2) / 2) / n
  sdcg = (v0 * d1 + d2 + v_seen * d1 + v2 * d2) / n
  for k in (5, 10, 15, 20):
    assert m[f"recall@{k}"] == pytest.approx(recall)
    assert m[f"ndcg@{k}"] == pytest.approx(ndcg)
    assert m[f"svr@{k}"] == pytest.approx(svr)
    assert m[f"sdcg@{k}"] == pytest.approx(sdcg)
  assert m["parse_failures"] == n - 3
  assert m[f"svr@10/{trait1}"] > 0

  # The report and the generations file agree item by item.
  gens = _read_jsonl(out / evaluation.GENERATIONS)
  assert len(gens) == n
  assert gens[1]["violations"] == [0, 1]
  assert gens[0]["violations"] == [int(v0), 0]
  assert gens[0]["hits"] == [1, 0]
  assert gens[2]["parsed"] == [[seen2, 1999], [gt2[0], gt2[1]]] and gens[2]["hits"] == [0, 1]
  flat_v = sum(sum(g["violations"]) / len(g["violations"]) for g in gens if g["violations"])
  assert flat_v / n == pytest.approx(m["svr@10"])
  report = json.load(open(out / evaluation.REPORT))
  assert report["metrics"] == m
  assert report["dataset_fingerprint"] == evaluation.dataset_fingerprint(rows)
  assert report["checkpoint"]["kind"] == "hf"


def test_interrupted_evaluation_resumes_to_the_same_report(setup):
  root, config, base = setup
  target = evaluation.resolve_targets(base)[0]
  rows, oracle, catalog = evaluation.load_eval_data(config)
  full_dir, cut_dir = root / "full", root / "cut"
  full_dir.mkdir()
  cut_dir.mkdir()
  full = evaluation.evaluate_target(config, target, rows, oracle, catalog, str(full_dir),
                                    progress=False)
  # Stop after one batch, leaving a torn line as a crash would.
  assert evaluation.evaluate_target(config, target, rows, oracle, catalog, str(cut_dir),
                                    progress=False, max_batches=1) is None
  done = _read_jsonl(cut_dir / evaluation.RAW)
  assert len(done) == config.eval.batch_size
  with open(cut_dir / evaluation.RAW, "a", encoding="utf-8") as f:
    f.write('{"prompt_id": 99, "te')
  resumed = evaluation.evaluate_target(config, target, rows, oracle, catalog, str(cut_dir),
                                       progress=False)
  assert resumed["metrics"] == full["metrics"]
  assert _read_jsonl(cut_dir / evaluation.GENERATIONS) == _read_jsonl(
      full_dir / evaluation.GENERATIONS)
  # The first batch was not generated again: its lines are still first, unchanged.
  assert _read_jsonl(cut_dir / evaluation.RAW)[:len(done)] == done


def test_run_summary_writes_csv_plots_and_table(tmp_path):
  reports = []
  for step, svr in ((10, 0.4), (20, 0.2), (30, 0.1)):
    reports.append({"checkpoint": {"name": f"step_{step}", "step": step},
                    "metrics": {"recall@10": 0.1, "ndcg@10": 0.05, "svr@10": svr,
                                "sdcg@10": svr / 2, "recall@20": 0.2, "svr@20": svr}})
  evaluation.write_run_summary(reports, str(tmp_path))
  lines = (tmp_path / "metrics.csv").read_text().splitlines()
  assert lines[0].split(",")[:3] == ["checkpoint", "step", "recall@10"]
  assert lines[2].startswith("step_20,20,")
  assert (tmp_path / "plots" / "svr_at_10.png").stat().st_size > 1000
  table = (tmp_path / "comparison.md").read_text()
  assert "| step_30 | 0.1000 | 0.0500 | 10.00% | 0.0500 |" in table


def test_checkpoint_resolution_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluation.resolve_targets(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    evaluation.resolve_targets(str(tmp_path))
  ck = tmp_path / "checkpoints"
  for s in (5, 10):
    (ck / str(s) / "state").mkdir(parents=True)
  assert [t.step for t in evaluation.resolve_targets(str(tmp_path))] == [5, 10]
  assert [t.step for t in evaluation.resolve_targets(str(tmp_path), ["10"])] == [10]
  with pytest.raises(FileNotFoundError, match=r"steps \[7\] not saved"):
    evaluation.resolve_targets(str(tmp_path), ["7"])


def test_launch_evaluate_entry_point(setup):
  import subprocess
  import sys
  root, config, base = setup
  work = root / "launch"
  cmd = [sys.executable, "-m", "launch.evaluate", "--config=configs/demo.py:size=test",
         f"--config.data.cache_dir={config.data.cache_dir}", "--config.eval.max_rows=4",
         "--config.eval.max_new_tokens=8", "--config.log.progress=False",
         f"--checkpoint={base}", "--split=validation", f"--workdir={work}"]
  proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| base |" in proc.stdout
  report = json.load(open(work / "validation" / "base" / evaluation.REPORT))
  assert report["split"] == "validation" and report["metrics"]["num_rows"] == 4


def test_compare_runs_side_by_side_and_counts_cut_prompts(setup):
  """evaluation.compare (launch.evaluate --runs): one table and one plot for several runs."""
  root, config, base = setup
  other_cfg = _config(root / "assets", max_rows=3, max_prompt_length=16, prompt_buckets=(16,))
  other_cfg.seed = 1
  other = demo.export_base(other_cfg, str(root / "other"))
  work = root / "compare"
  reports = evaluation.compare(other_cfg, {"seed0": base, "seed1": other}, workdir=str(work),
                               progress=False)
  assert list(reports) == ["seed0", "seed1"]
  table = (work / "test" / "comparison.md").read_text()
  assert "| seed0 |" in table and "| seed1 |" in table
  assert (work / "test" / "models.png").stat().st_size > 0
  for name, rep in reports.items():
    assert rep["metrics"]["num_rows"] == 3
    gen = rep["generation"]
    # every SafeRec-mini prompt is longer than 16 tokens: all are cut, and counted
    assert gen["truncated_prompts"] == gen["distinct_prompts"] == 3, name
    assert os.path.exists(work / name / "test" / rep["checkpoint"]["name"] / evaluation.REPORT)
