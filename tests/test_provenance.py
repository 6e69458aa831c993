"""Issue 13, one reproduction per finding: nothing is reused unless it came from the same inputs."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from safecrs_jax import evaluation, saferec
from safecrs_jax.data import assets
from safecrs_jax.infra import provenance, run_lock
from safecrs_jax.train import checkpoint, gdpo, policy, sft, sft_data

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_driver  # noqa: E402


def _config(cache, stage="sft", **over):
  spec = {"stage": stage, "config": dict({
      "data.cache_dir": cache, "tokenizer.max_length": 384, "tokenizer.buckets": (384,),
      "sft.num_steps": 4, "sft.batch_size": 2, "sft.grad_accum": 1, "sft.eval_every": 0,
      "log.every": 1, "log.progress": False, "log.tensorboard": False,
      "checkpoint.save_every": 2, "mesh.num_devices": 1, "gdpo.num_steps": 1,
      "gdpo.batch_size": 2, "gdpo.group_size": 2, "gdpo.max_completion_length": 6,
      "gdpo.max_prompt_length": 96, "gdpo.prompt_buckets": (96,),
      "eval.max_rows": 8, "eval.batch_size": 4, "eval.max_new_tokens": 10}, **over)}
  return fault_driver.config_of(spec)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("prov_cache"))


@pytest.fixture(scope="module")
def sft_run(cache, tmp_path_factory):
  """A 4-step Safe-SFT run with checkpoints at steps 2 and 4 (copied by tests that damage it)."""
  work = tmp_path_factory.mktemp("prov") / "sft"
  sft.train(_config(cache), str(work))
  return work


def _copy(run, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(run, out)
  return out


def _largest_state_file(step_dir):
  files = [os.path.join(d, n) for d, _, ns in os.walk(step_dir / "state") for n in ns]
  return max(files, key=os.path.getsize)


# 1 -------------------------------------------------------------------------
def test_evaluation_with_other_settings_regenerates(cache, sft_run, tmp_path, capsys):
  step4 = str(sft_run / "checkpoints" / "4")
  a = evaluation.evaluate(_config(cache), step4, workdir=str(tmp_path), progress=False)[0]
  assert a["generation"]["mean_completion_tokens"] > 4
  b = evaluation.evaluate(_config(cache, **{"eval.max_new_tokens": 4}), step4,
                          workdir=str(tmp_path), progress=False)[0]
  assert "regenerating" in capsys.readouterr().out
  assert b["sampling"]["max_new_tokens"] == 4
  assert b["generation"]["mean_completion_tokens"] <= 4      # not A's 10-token texts
  assert b["provenance"]["generation"]["max_new_tokens"] == 4


# 2 -------------------------------------------------------------------------
def test_tokenizer_cache_is_keyed_by_content_and_empty_builds_fail(tmp_path):
  root = str(tmp_path)
  with pytest.raises(ValueError, match="train split of /data/x has no rows"):
    assets.local_tokenizer_dir(lambda: [], 300, root, what="train split of /data/x")
  assert not [n for n in os.listdir(root) if n.startswith("tokenizer")]   # nothing cached
  rows = [{"prompt": [{"role": "user", "content": f"films like Heat {i}"}],
           "completion": "Alien (1979)"} for i in range(3)]
  first = assets.local_tokenizer_dir(lambda: rows, 300, root)
  assert assets.local_tokenizer_dir(lambda: rows, 300, root) == first
  changed = rows + [{"prompt": [{"role": "user", "content": "something else"}]}]
  assert assets.local_tokenizer_dir(lambda: changed, 300, root) != first


# 3, 9 (strict=False prints the first errors; line numbers) ----------------------
def _row(i, **over):
  return dict({"prompt": [{"role": "user", "content": f"hi {i}"}], "completion": "Heat (1995)",
               "groundtruth_with_release_year": [["Heat", 1995]], "seen_titles": [],
               "constraints": {}}, **over)


def test_non_utf8_byte_names_file_line_and_field(tmp_path, caplog):
  lines = [json.dumps(_row(0)).encode(), b""]
  bad = json.dumps(_row(1, seen_titles=["AB"])).encode().replace(b"AB", b"A\xffB")
  lines += [bad] * 7 + [json.dumps(_row(2)).encode()]
  (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  with pytest.raises(saferec.SafeRecDataError,
                     match=r"train.jsonl row 1 \(line 3\) field 'seen_titles\[0\]': not valid "
                           r"UTF-8 \(byte 0xff"):
    saferec.load_split(str(tmp_path), "train")
  with caplog.at_level(logging.WARNING):
    ok, rep = saferec.load_split(str(tmp_path), "train", strict=False, return_report=True)
  assert [r["prompt"][0]["content"] for r in ok] == ["hi 0", "hi 2"]
  assert rep["rows_skipped"] == 7
  logged = caplog.text
  assert "skipped 7 of 9 rows" in logged
  assert "(line 7)" in logged and "(line 8)" not in logged      # the first five: lines 3-7


# 4 -------------------------------------------------------------------------
def test_changed_sft_run_is_never_mixed_into_gdpo(cache, sft_run, tmp_path, capsys):
  run = _copy(sft_run, tmp_path)
  g_cfg = _config(cache, "gdpo", **{"gdpo.init_checkpoint": str(run)})
  first = gdpo.train(g_cfg, str(tmp_path / "gdpo"))
  assert first["run"].init_identity["step"] == 4
  longer = _config(cache, **{"sft.num_steps": 6})
  with pytest.raises(provenance.ProvenanceError, match=r"sft.num_steps recorded 4, now 6"):
    sft.train(longer, str(run))                          # stops: no silent continuation
  longer.checkpoint.overwrite = True
  assert sft.train(longer, str(run))["final_step"] == 6   # retrained from scratch
  assert checkpoint.saved_steps(str(run / "checkpoints")) == [2, 4, 6]   # all new
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r"init\.(manifest|path|step)"):
    gdpo.Run(g_cfg, str(tmp_path / "gdpo"))
  g_cfg.checkpoint.overwrite = True
  again = gdpo.train(g_cfg, str(tmp_path / "gdpo"))
  assert again["start_step"] == 0 and again["run"].init_identity["step"] == 6
  assert "overwrite: discarding" in capsys.readouterr().out


# 6 -------------------------------------------------------------------------
def test_evaluating_an_empty_split_is_an_error(cache, sft_run, tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "test.jsonl").write_text("")
  cfg = _config(cache, **{"data.dir": str(data)})
  with pytest.raises(saferec.SafeRecDataError, match=f"split 'test' of {data} has no rows"):
    evaluation.evaluate(cfg, str(sft_run), workdir=str(tmp_path / "eval"), progress=False)
  assert not os.path.exists(tmp_path / "eval" / "test")


# 7 -------------------------------------------------------------------------
def test_damaged_newest_step_is_refused_everywhere(cache, sft_run, tmp_path):
  run = _copy(sft_run, tmp_path)
  shutil.rmtree(run / "checkpoints" / "4" / "state")
  assert checkpoint.saved_steps(str(run / "checkpoints")) == [2, 4]
  msg = r"checkpoint step 4 .* is damaged: its state/ directory is missing"
  with pytest.raises(checkpoint.CheckpointError, match=msg):
    policy.export_hf(str(run), str(tmp_path / "hf"))
  assert not os.path.exists(tmp_path / "hf")
  with pytest.raises(checkpoint.CheckpointError, match=msg):
    evaluation.resolve_targets(str(run))
  with pytest.raises(checkpoint.CheckpointError, match=msg):
    sft.Run(_config(cache), str(run))
  # naming the intact step explicitly still works
  assert [t.step for t in evaluation.resolve_targets(str(run / "checkpoints" / "2"))] == [2]


# 8, 9 (truncated file) -------------------------------------------------------------
def test_flipped_or_truncated_bytes_are_detected(cache, sft_run, tmp_path):
  run = _copy(sft_run, tmp_path)
  target = _largest_state_file(run / "checkpoints" / "4")
  data = bytearray(open(target, "rb").read())
  lo = len(data) // 4
  data[lo:lo + 4096] = bytes(b ^ 0x5A for b in data[lo:lo + 4096])
  open(target, "wb").write(bytes(data))
  for call in (lambda: sft.Run(_config(cache), str(run)),
               lambda: policy.load_params(str(run)),
               lambda: policy.export_hf(str(run), str(tmp_path / "hf"))):
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"{target} does not match its recorded sha256"):
      call()
  # Truncation, read without the sha256 check. Which OCDBT data file holds the params
  # (rather than the optimizer state, which load_params never reads) is up to
  # TensorStore, so every data file is cut in half.
  for d, _, names in os.walk(run / "checkpoints" / "4" / "state"):
    if os.path.basename(d) == "d":
      for n in names:
        f = os.path.join(d, n)
        blob = open(f, "rb").read()
        open(f, "wb").write(blob[:len(blob) // 2])
  with pytest.raises(checkpoint.CheckpointError) as err:
    policy.load_params(str(run), verify=False)
  assert "\n" not in str(err.value) and str(run / "checkpoints" / "4") in str(err.value)


# 9 -------------------------------------------------------------------------
def test_curation_report_is_saved_in_the_run_dir(sft_run):
  report = json.loads((sft_run / "curation.json").read_text())
  for split in ("train", "validation"):
    r = report[split]
    assert r["rows_in"] - r["rows_out"] == r["rows_dropped_no_safe_gt"] == len(r["dropped"])
    assert r["rows_dropped_no_safe_gt"] > 0
    assert all(set(d) == {"index", "request", "constraints"} for d in r["dropped"])
  lines = sft_data.curation_lines(report["train"], "train")
  assert f"({report['train']['rows_dropped_no_safe_gt']} dropped" in lines[0]
  assert len(lines) == 1 + min(5, report["train"]["rows_dropped_no_safe_gt"])


def test_gdpo_without_init_checkpoint_warns(cache, tmp_path, capsys):
  gdpo.Run(_config(cache, "gdpo"), str(tmp_path / "g"))
  assert "WARNING: gdpo.init_checkpoint is empty: training from a RANDOM init" in (
      capsys.readouterr().out)


def test_run_lock_names_the_holder_and_takes_over_stale_ones(tmp_path, capsys):
  with run_lock.hold(str(tmp_path)):
    with pytest.raises(run_lock.LockError, match=f"in use by pid {os.getpid()} on "):
      run_lock.acquire(str(tmp_path))
  assert not (tmp_path / ".lock").exists()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                              "time": "earlier"}))
  path = run_lock.acquire(str(tmp_path))
  assert "taking over the stale lock of pid" in capsys.readouterr().out
  assert json.loads(open(path).read())["pid"] == os.getpid()
  run_lock.release(path)
