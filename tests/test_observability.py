"""Observability of a training run: W&B writer (offline), profiler trace window, device memory."""
import glob
import os
import time

import pytest

from configs import demo
from safecrs_jax.infra import chips, metrics_log
from safecrs_jax.train import loop as train_loop
from safecrs_jax.train import sft, stage


def _config(cache, **log):
  c = demo.get_config("size=test,relational=off")
  c.data.cache_dir = cache
  c.tokenizer.max_length, c.tokenizer.buckets = 384, (384,)
  c.sft.num_steps, c.sft.batch_size, c.sft.grad_accum, c.sft.eval_every = 4, 2, 1, 0
  c.log.every, c.log.progress, c.log.tensorboard = 1, False, False
  c.checkpoint.save_every = 100
  c.log.update(log)
  return c


def test_wandb_offline_and_profile_window(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  work = tmp_path / "run"
  c = _config(str(tmp_path / "cache"), wandb_project="safecrs-test", wandb_mode="offline",
              profile_steps=(1, 3))
  s = sft.train(c, str(work))
  assert s["final_step"] == 4
  # one offline W&B run (id from the workdir) holding the logged metrics and the config
  runs = glob.glob(str(work / "wandb" / "offline-run-*" / "*.wandb"))
  assert len(runs) == 1 and runs[0].endswith("run-safecrs-run.wandb")
  # wandb's service process writes the records after finish() returns; under load that
  # can take a while, so wait (bounded) for them rather than read a half-written file.
  want = (b"train/loss", b"train/tokens_per_s", b"sft")
  deadline = time.monotonic() + 120
  while True:
    blob = open(runs[0], "rb").read()
    if all(w in blob for w in want) or time.monotonic() > deadline:
      break
    time.sleep(0.5)
  assert all(w in blob for w in want), blob[:200]
  assert [r["step"] for r in metrics_log.read_jsonl(work / "metrics.jsonl")] == [1, 2, 3, 4]
  # a profiler trace was written for the window, and only once
  traces = glob.glob(str(work / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_profile_window_off_by_default_and_memory_on_cpu(tmp_path):
  p = train_loop.Profile(str(tmp_path), (-1, -1))
  p.before(0)
  assert not p.active
  assert not os.path.exists(tmp_path / "profile")
  mem = train_loop.device_memory()          # CPU devices report no memory stats
  assert mem == {} or set(mem) <= {"mem/bytes_in_use", "mem/peak_bytes_in_use"}


def test_mfu_uses_the_chip_table():
  class Dev:          # a device as jax describes one: an H100
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"
  # 989 TFLOP/s per device: 2 devices doing 989e12 FLOPs in 1 s run at 50%
  assert chips.mfu(989e12, 1.0, [Dev(), Dev()]) == pytest.approx(0.5)
  assert chips.mfu(1e12, 1.0) is None                 # CPU: no peak to divide by


def test_step_timer_laps_add_up_and_no_mfu_on_cpu():
  timer = stage.StepTimer()
  first, second = timer.lap(), timer.lap()
  assert first >= 0 and second >= 0 and timer.total() == pytest.approx(first + second)
  timer.restart()
  assert timer.total() == 0.0
  assert stage.StepTimer.mfu(1e12, 1.0) == {}                  # CPU: no peak to divide by
