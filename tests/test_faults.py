"""Fault injection: SIGKILL at fixed, seeded points of each stage; the rerun equals a straight run.

Each stage runs in a subprocess (tests/fault_driver.py) that kills itself at a
point drawn from a seeded generator — during an async checkpoint write, in
the middle of a step, between evaluation appends — and the same command is
then finished here. The finished run must equal an uninterrupted one bit for
bit (train state, losses, generations), its metrics.jsonl must hold every
step once, and nothing stale (another model's generations) may be reused.
Also: SIGTERM makes launch.train_gdpo exit 143 with a checkpoint, without
orbax INFO logs.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from safecrs_jax import evaluation
from safecrs_jax.infra import metrics_log
from safecrs_jax.train import gdpo, sft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_driver  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "fault_driver.py")
RNG = np.random.default_rng(13)          # the fixed seed of every kill point


def _sft_spec(cache, workdir, **over):
  return {"stage": "sft", "workdir": str(workdir), "config": dict({
      "data.cache_dir": cache, "tokenizer.max_length": 384, "tokenizer.buckets": (384,),
      "sft.num_steps": 6, "sft.batch_size": 2, "sft.grad_accum": 2, "sft.eval_every": 3,
      "sft.eval_batches": 1, "log.every": 1, "log.progress": False, "log.tensorboard": False,
      "checkpoint.save_every": 2, "mesh.num_devices": 1}, **over)}


def _gdpo_spec(cache, init, workdir, **over):
  return {"stage": "gdpo", "workdir": str(workdir), "config": dict({
      "data.cache_dir": cache, "gdpo.init_checkpoint": str(init), "gdpo.num_steps": 3,
      "gdpo.batch_size": 2, "gdpo.group_size": 2, "gdpo.max_completion_length": 8,
      "gdpo.max_prompt_length": 96, "gdpo.prompt_buckets": (96,), "log.every": 1,
      "log.progress": False, "log.tensorboard": False, "checkpoint.save_every": 1,
      "mesh.num_devices": 1}, **over)}


def _killed(spec, at, n):
  """Runs spec in a subprocess that SIGKILLs itself at (at, n); asserts it died so."""
  proc = subprocess.run([sys.executable, DRIVER, json.dumps(dict(spec, kill={"at": at, "n": n}))],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _steps(workdir):
  return [r["step"] for r in metrics_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("fault_cache"))


@pytest.fixture(scope="module")
def sft_straight(cache, tmp_path_factory):
  work = tmp_path_factory.mktemp("sft_straight")
  return work, sft.train(fault_driver.config_of(_sft_spec(cache, work)), str(work))


def test_sft_killed_during_async_save_and_mid_step_resumes_bit_identical(cache, sft_straight,
                                                                         tmp_path):
  straight_dir, straight = sft_straight
  work = tmp_path / "sft"
  spec = _sft_spec(cache, work)
  save_at = int(RNG.choice([2, 4]))                    # a step whose async save is in flight
  _killed(spec, "save", save_at)
  _killed(spec, "step", save_at + 1)                   # dies before the next checkpoint
  resumed = sft.train(fault_driver.config_of(spec), str(work))
  # a save cut short never became a step: the run resumed from a finished one
  assert resumed["start_step"] in (0, 2, 4) and resumed["start_step"] <= save_at
  assert resumed["final_step"] == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight["run"].state),
               jax.device_get(resumed["run"].state))
  # every step logged exactly once, with the straight run's losses
  assert _steps(work) == [1, 2, 3, 4, 5, 6]
  want = {r["step"]: r["train/loss"] for r in metrics_log.read_jsonl(
      straight_dir / "metrics.jsonl") if "train/loss" in r}
  got = {r["step"]: r["train/loss"] for r in metrics_log.read_jsonl(work / "metrics.jsonl")
         if "train/loss" in r}
  assert got == want
  kept = sorted(os.listdir(work / "checkpoints"))
  assert kept == ["2", "4", "6"]
  for step in kept:                                    # every kept step got its checksums
    assert (work / "checkpoints" / step / "checksums.json").exists()


def test_gdpo_killed_during_async_save_resumes_bit_identical(cache, sft_straight, tmp_path):
  init = sft_straight[0]
  straight = gdpo.train(fault_driver.config_of(_gdpo_spec(cache, init, tmp_path / "a")),
                        str(tmp_path / "a"))
  spec = _gdpo_spec(cache, init, tmp_path / "b")
  n = int(RNG.integers(1, 3))
  _killed(spec, "save", n)
  resumed = gdpo.train(fault_driver.config_of(spec), str(tmp_path / "b"))
  assert resumed["start_step"] <= n and resumed["final_step"] == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight["run"].state),
               jax.device_get(resumed["run"].state))
  assert _steps(tmp_path / "b") == [1, 2, 3]


def test_evaluation_killed_between_appends_resumes_and_never_reuses_stale(cache, sft_straight,
                                                                          tmp_path):
  run_dir = sft_straight[0]
  step6 = str(run_dir / "checkpoints" / "6")
  over = {"eval.max_rows": 12, "eval.batch_size": 4, "eval.max_new_tokens": 10}
  spec = dict(_sft_spec(cache, tmp_path / "cut", **over), stage="eval", checkpoint=step6)
  cfg = fault_driver.config_of(spec)
  full = evaluation.evaluate(cfg, step6, workdir=str(tmp_path / "full"), progress=False)[0]
  n = int(RNG.integers(2, 4))
  _killed(spec, "generate", n)                         # n - 1 batches appended, then killed
  raw = tmp_path / "cut" / "test" / "step_6" / evaluation.RAW
  assert len(raw.read_text().splitlines()) == 1 + 4 * (n - 1)      # header + 4 prompts/batch
  resumed = evaluation.evaluate(cfg, step6, workdir=str(tmp_path / "cut"), progress=False)[0]
  assert resumed["metrics"] == full["metrics"]
  assert (tmp_path / "cut" / "test" / "step_6" / evaluation.GENERATIONS).read_text() == (
      tmp_path / "full" / "test" / "step_6" / evaluation.GENERATIONS).read_text()
  # the same directory now evaluated for step 4: generated anew, equal to a fresh run
  step4 = str(run_dir / "checkpoints" / "4")
  fresh = evaluation.evaluate(cfg, step4, workdir=str(tmp_path / "fresh"), progress=False)[0]
  os.rename(tmp_path / "cut" / "test" / "step_6", tmp_path / "cut" / "test" / "step_4")
  other = evaluation.evaluate(cfg, step4, workdir=str(tmp_path / "cut"), progress=False)[0]
  assert other["metrics"] == fresh["metrics"]
  assert other["provenance"]["checkpoint"]["step"] == 4


def test_sigterm_makes_train_gdpo_exit_143_quietly(cache, sft_straight, tmp_path):
  work = tmp_path / "gdpo"
  cfg = _gdpo_spec(cache, sft_straight[0], work, **{"gdpo.num_steps": 200,
                                                    "checkpoint.save_every": 1000})["config"]
  cmd = [sys.executable, "-m", "launch.train_gdpo",
         "--config=configs/demo.py:stage=gdpo,size=test", f"--workdir={work}"]
  cmd += [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
          for k, v in cfg.items()]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not (work / "metrics.jsonl").exists():
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 143, err[-3000:]
  steps = os.listdir(work / "checkpoints")
  assert len(steps) == 1 and int(steps[0]) >= 1 and int(steps[0]) < 200
  assert "SIGTERM at step" in out + err
  assert not [line for line in err.splitlines() if line.startswith("I") and "orbax" in line]
  assert not (work / ".lock").exists()


_TIMING = ("time", "train/tokens_per_s", "train/step_time_s")


def _comparable_rows(workdir):
  """metrics.jsonl rows without the fields that measure time or memory."""
  return [{k: v for k, v in r.items() if k not in _TIMING and not k.startswith(
      ("time/", "perf/", "mem/"))} for r in metrics_log.read_jsonl(os.path.join(workdir,
                                                                               "metrics.jsonl"))]


def test_metrics_after_a_resume_equal_a_straight_run_row_for_row(cache, tmp_path):
  """log.every=4, SIGTERM at step 3: the preemption row is marked, and the resumed run's rows
  (its first train/loss averages steps 1-4, as the straight run's) equal the straight run's."""
  spec = _sft_spec(cache, tmp_path / "straight", **{"log.every": 4,
                                                     "checkpoint.save_every": 100})
  sft.train(fault_driver.config_of(spec), str(tmp_path / "straight"))

  def sigterm_at_3(step, state):
    del state
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
  cfg = fault_driver.config_of(spec)
  killed = sft.train(cfg, str(tmp_path / "resumed"), step_hook=sigterm_at_3)
  assert killed["preempted"] and killed["final_step"] == 3
  sft.train(fault_driver.config_of(spec), str(tmp_path / "resumed"))
  straight, resumed = _comparable_rows(tmp_path / "straight"), _comparable_rows(
      tmp_path / "resumed")
  cut = [r for r in resumed if r.get("preempted")]
  assert [r["step"] for r in cut] == [3] and "train/loss" in cut[0]
  assert [r for r in resumed if not r.get("preempted")] == straight
  assert [r["step"] for r in straight if "train/loss" in r] == [4, 6]
