"""gs:// work dirs, checkpoints, data, reports and exports, through a local stand-in bucket."""
import json
import os
import signal

import fake_bucket
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from safecrs_jax import evaluation, models, saferec
from safecrs_jax.data import assets
from safecrs_jax.infra import local_cache, run_lock, storage
from safecrs_jax.train import checkpoint, gdpo, policy, sft


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://b/... lives under <tmp>/bucket/b/...; the cwd is a fresh dir to catch ./gs: leaks."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv("SAFECRS_CACHE", str(tmp_path / "remote_cache"))
  root = fake_bucket.install(tmp_path / "bucket", monkeypatch)
  yield os.path.join(root, "b")
  assert os.listdir(cwd) == [], "something was written to a local path named like the URI"
  monkeypatch.undo()
  fake_bucket.reset()


def test_storage_ops_on_the_bucket(bucket):
  assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/x")
  assert storage.resolve("gs://b/run/") == "gs://b/run"
  assert storage.resolve("rel") == os.path.abspath("rel")
  storage.makedirs("gs://b/run/sub")
  storage.write_atomic("gs://b/run/a.json", json.dumps({"x": 1}))
  storage.write_atomic("gs://b/run/sub/w.bin", b"\0\1")
  with open(os.path.join(bucket, "run", "a.json")) as f:
    assert json.load(f) == {"x": 1}
  assert storage.isfile("gs://b/run/a.json") and storage.isdir("gs://b/run/sub")
  assert sorted(storage.listdir("gs://b/run")) == ["a.json", "sub"]
  assert storage.glob("gs://b/run/*.json") == ["gs://b/run/a.json"]
  # append: each flush publishes the whole object (a preempted run keeps its rows)
  f = storage.open("gs://b/run/m.jsonl", "a")
  f.write("1\n")
  f.flush()
  with open(os.path.join(bucket, "run", "m.jsonl")) as g:
    assert g.read() == "1\n"
  f.write("2\n")
  f.close()
  with storage.open("gs://b/run/m.jsonl", "a") as f:
    f.write("3\n")
  with storage.open("gs://b/run/m.jsonl") as f:
    assert f.read() == "1\n2\n3\n"
  # a local copy for readers of local files; a changed object gets a fresh copy
  local = local_cache.local_copy("gs://b/run")
  assert not storage.is_remote(local)
  with open(os.path.join(local, "sub", "w.bin"), "rb") as f:
    assert f.read() == b"\0\1"
  assert local_cache.local_copy("gs://b/run") == local
  storage.write_atomic("gs://b/run/a.json", "{}")
  assert local_cache.local_copy("gs://b/run") != local
  storage.rmtree("gs://b/run")
  assert not storage.exists("gs://b/run") and not os.path.exists(os.path.join(bucket, "run"))


def test_run_lock_on_the_bucket(bucket):
  path = run_lock.acquire("gs://b/work")
  assert path == "gs://b/work/" + run_lock.LOCK
  with open(os.path.join(bucket, "work", run_lock.LOCK)) as f:
    assert json.load(f)["pid"] == os.getpid()
  with pytest.raises(run_lock.LockError, match="in use"):
    run_lock.acquire("gs://b/work")               # held by a live process
  run_lock.release(path)
  assert not os.path.exists(os.path.join(bucket, "work", run_lock.LOCK))


def test_save_every_minutes_with_a_fake_clock(tmp_path):
  now = [0.0]
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), save_every=1000, async_save=False,
                               save_every_minutes=2.0, clock=lambda: now[0])
  state = {"w": jnp.zeros(3)}
  assert not ck.should_save(1)
  now[0] = 119.0
  assert not ck.should_save(2)
  now[0] = 120.0
  assert ck.should_save(3) and ck.save(3, state, {})
  assert not ck.should_save(4)                     # the clock restarts at each save
  now[0] = 239.0
  assert not ck.should_save(5)
  now[0] = 240.5
  assert ck.should_save(6)
  assert ck.should_save(1000)                      # the step rule still holds
  off = checkpoint.Checkpointer(str(tmp_path / "off"), save_every=1000, clock=lambda: now[0])
  now[0] = 1e9
  assert not off.should_save(7)
  ck.close()
  off.close()


def _sft_config(cache, data_dir, steps):
  c = demo.get_config("size=test,relational=off")
  c.data.cache_dir, c.data.dir = cache, data_dir
  c.tokenizer.max_length, c.tokenizer.buckets = 256, (256,)
  c.sft.num_steps, c.sft.batch_size, c.sft.grad_accum = steps, 2, 1
  c.sft.eval_every, c.sft.eval_batches = 0, 1
  c.log.every, c.log.progress, c.log.tensorboard = 1, False, True
  c.checkpoint.save_every = 100
  c.eval.max_rows, c.eval.batch_size, c.eval.max_new_tokens = 4, 4, 8
  return c


def test_sft_resume_eval_export_and_data_on_the_bucket(bucket, tmp_path):
  cache = str(tmp_path / "assets")
  mini = assets.resolve_data_dir(_sft_config(cache, "mini", 1))
  storage.copy_tree(mini, "gs://b/data")
  rows = saferec.load_split("gs://b/data", "train")
  assert rows == saferec.load_split(mini, "train") and rows

  def sigterm_at_2(step, state):
    del state
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  c = _sft_config(cache, "gs://b/data", 3)
  c.log.profile_steps = (1, 2)
  first = sft.train(c, "gs://b/sft", step_hook=sigterm_at_2)
  assert first["preempted"] and first["final_step"] == 2
  assert list(storage.walk_files("gs://b/sft/profile"))   # traced locally, then copied up
  run = os.path.join(bucket, "sft")
  assert {"model_config.json", "tokenizer", "config.json", "metrics.jsonl", "checkpoints"} <= set(
      os.listdir(run))
  assert "tb" not in os.listdir(run)               # TensorBoard is off for remote workdirs
  assert os.path.exists(os.path.join(run, "checkpoints", "2", checkpoint.STEP_ITEMS[0]))
  assert os.path.exists(os.path.join(run, "checkpoints", "2", "checksums.json"))
  resumed = sft.train(_sft_config(cache, "gs://b/data", 3), "gs://b/sft")
  assert resumed["start_step"] == 2 and resumed["final_step"] == 3
  with open(os.path.join(run, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert 1 in steps and 3 in steps

  cfg, params = policy.load_params("gs://b/sft")
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(resumed["run"].state.params))
  policy.export_hf("gs://b/sft", "gs://b/hf")
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
      os.listdir(os.path.join(bucket, "hf")))
  cfg2, params2 = models.load_hf("gs://b/hf")
  assert cfg2.vocab_size == cfg.vocab_size
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params2), params)

  c = _sft_config(cache, "gs://b/data", 3)
  reports = evaluation.evaluate(c, "gs://b/sft", workdir="gs://b/eval", progress=False)
  assert [r["checkpoint"]["step"] for r in reports] == [2, 3]
  out = os.path.join(bucket, "eval", c.eval.split, "step_3")
  assert {"report.json", "generations.jsonl"} <= set(os.listdir(out))
  with open(os.path.join(out, "report.json")) as f:
    assert json.load(f)["metrics"] == reports[-1]["metrics"]


@pytest.mark.slow
def test_gdpo_starts_from_a_bucket_checkpoint(bucket, tmp_path):
  cache = str(tmp_path / "assets")
  sft.train(_sft_config(cache, "mini", 1), "gs://b/sft")
  c = demo.get_config("stage=gdpo,size=test,relational=off")
  c.data.cache_dir, c.gdpo.init_checkpoint = cache, "gs://b/sft"
  c.gdpo.num_steps, c.gdpo.batch_size, c.gdpo.group_size, c.gdpo.grad_accum = 1, 4, 2, 1
  c.gdpo.max_prompt_length, c.gdpo.prompt_buckets, c.gdpo.max_completion_length = 96, (96,), 8
  c.log.progress, c.log.tensorboard, c.checkpoint.save_every = False, False, 100
  out = gdpo.train(c, "gs://b/gdpo")
  assert out["final_step"] == 1
  assert os.path.isdir(os.path.join(bucket, "gdpo", "checkpoints", "1", "state"))
