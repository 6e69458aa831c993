"""launch.demo end to end at a reduced size (the full size runs in .ci/run)."""
import json
import os
import subprocess
import sys

import pytest

from safecrs_jax import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_entry_point_smoke(tmp_path):
  work = tmp_path / "demo"
  cmd = [sys.executable, "-m", "launch.demo", f"--workdir={work}", "--size=test",
         "--set=sft.num_steps=4", "--set=gdpo.num_steps=1", "--set=gdpo.max_completion_length=24",
         "--set=eval.max_new_tokens=24", "--set=eval.relational_max_sources=1", "--set=eval.relational_pair_sources=2",
         "--eval_rows=8", "--noprogress", "--check"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert (work / "summary.json").exists(), proc.stderr[-3000:]
  out = proc.stdout
  assert "| model | recall@10 | ndcg@10 | svr@10 | sdcg@10 |" in out
  for name in demo.ROWS:
    assert f"| {name} |" in out
  # A smoke-size run cannot show the effect, and must say so rather than hide it.
  summary = json.load(open(work / "summary.json"))
  assert ("OK:" in summary["verdict"]) == summary["relational_ok"]
  assert summary["verdict_ok"] == demo.verdict(summary["table"])[0]
  assert summary["relational_ok"] <= summary["verdict_ok"]   # both parts, or not OK
  assert proc.returncode == (0 if summary["relational_ok"] else 1)   # --check needs both
  assert summary["relational_pairs"] == 2
  assert summary["verdict"] in out
  assert set(summary["table"]) == set(demo.ROWS)
  for name, metrics in summary["table"].items():
    assert set(metrics) == {"recall@10", "ndcg@10", "svr@10", "sdcg@10"}
    for k, v in metrics.items():
      assert 0.0 <= v <= (1.0 if k != "sdcg@10" else 10.0), (name, k, v)
    report = json.load(open(summary["reports"][name]))
    assert report["metrics"]["num_rows"] == 8
    assert report["split"] == "test"
  assert os.path.getsize(work / "eval" / "models.png") > 1000
  # The relational suite: headline rows per model, the card beside them.
  assert "| model | svr@10 | svr@10/turns=4 | svr@10/disclosure=narrative |" in out
  assert set(summary["relational"]) == set(demo.ROWS)
  assert os.path.exists(summary["relational_card"]) and summary["relational_rows"] > 20
  assert "svr@10/turns=4" in summary["verdict"] and "ofr@10" in summary["verdict"]
  for stage in ("sft", "gdpo", "grpo"):
    assert os.listdir(work / stage / "checkpoints")


@pytest.mark.parametrize("sft_svr,gdpo_svr,sft_rec,gdpo_rec,ok", [
    (0.10, 0.05, 0.08, 0.08, True),
    (0.10, 0.09, 0.08, 0.08, False),   # not a clear cut
    (0.10, 0.02, 0.08, 0.01, False),   # recall collapsed
    (0.0, 0.0, 0.08, 0.08, False),     # nothing to cut
])
def test_verdict(sft_svr, gdpo_svr, sft_rec, gdpo_rec, ok):
  table = {"sft": {"svr@10": sft_svr, "recall@10": sft_rec},
           "gdpo": {"svr@10": gdpo_svr, "recall@10": gdpo_rec}}
  got, message = demo.verdict(table)
  assert got == ok
  assert message.startswith("OK:" if ok else "NOT SHOWN")
