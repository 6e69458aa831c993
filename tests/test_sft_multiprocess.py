"""Two local JAX processes (CPU collectives) train like one process with the same devices."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from safecrs_jax.data import assets
from safecrs_jax.train import sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, os, sys
import jax
pid, nproc, port, out, cache, work = sys.argv[1:7]
pid, nproc = int(pid), int(nproc)
if nproc > 1:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                             process_id=pid, initialization_timeout=120)
from tests.test_sft_multiprocess import config
from safecrs_jax.train import sft
s = sft.train(config(cache), work)
state = s["run"].state
emb = jax.experimental.multihost_utils.process_allgather(state.params["embed_tokens"]["embedding"], tiled=True)
with open(out, "w") as f:
  json.dump({"loss": s["train_loss"], "val": s["val_loss"], "devices": jax.device_count(),
             "processes": jax.process_count(), "emb_sum": float(abs(emb).sum())}, f)
"""


def config(cache):
  """3 steps of the size=test demo model over every device (one mesh for both layouts)."""
  c = demo.get_config("size=test,relational=off")
  c.mesh.num_devices = -1
  c.data.cache_dir = cache
  c.tokenizer.max_length, c.tokenizer.buckets = 384, (384,)
  c.sft.num_steps, c.sft.batch_size, c.sft.grad_accum = 3, 1, 2
  c.sft.eval_every, c.sft.eval_batches = 3, 1
  c.log.every, c.log.progress, c.log.tensorboard = 1, False, False
  c.checkpoint.save_every = 100
  return c


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(pid, nproc, devices, port, tmp, cache):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  out = tmp / f"out_{nproc}_{pid}.json"
  work = tmp / f"run_{nproc}"
  proc = subprocess.Popen(
      [sys.executable, "-c", WORKER, str(pid), str(nproc), str(port), str(out), cache, str(work)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return proc, out


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
  cache = str(tmp_path / "cache")
  c = config(cache)
  assets.resolve_tokenizer_path(c, assets.resolve_data_dir(c))   # build once, before the race
  port = _free_port()
  procs = [_launch(i, 2, 2, port, tmp_path, cache) for i in range(2)]
  try:
    # the reference, meanwhile: one process driving 4 of this session's devices
    c.mesh.num_devices = 4
    ref = sft.train(c, str(tmp_path / "run_1"))
    ref_emb = float(abs(jax.device_get(ref["run"].state.params["embed_tokens"]["embedding"])).sum())
    results = []
    for proc, out in procs:
      log, _ = proc.communicate(timeout=600)
      assert proc.returncode == 0, log[-4000:]
      results.append(json.loads(out.read_text()))
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
  assert [s for s, _ in ref["train_loss"]] == [1, 2, 3]
  for m in results:
    assert (m["devices"], m["processes"]) == (4, 2)
    np.testing.assert_allclose([v for _, v in m["loss"]], [v for _, v in ref["train_loss"]],
                               rtol=1e-5)
    np.testing.assert_allclose([v for _, v in m["val"]], [v for _, v in ref["val_loss"]],
                               rtol=1e-5)
    np.testing.assert_allclose(m["emb_sum"], ref_emb, rtol=1e-5)
  # one run directory, written once, with a checkpoint both processes contributed to
  assert os.listdir(tmp_path / "run_2" / "checkpoints") == ["3"]
  assert (tmp_path / "run_2" / "metrics.jsonl").exists()
