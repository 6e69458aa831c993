"""Two local JAX processes (2 CPU devices each) load, run and save one sharded model."""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safecrs_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          initializer_range=0.2, tie_word_embeddings=False)

WORKER = r"""
import json, sys
import jax, numpy as np
from jax.experimental import multihost_utils
from safecrs_jax import models
from safecrs_jax.infra import sharding
ckpt, out_dir, ids_path, result = sys.argv[1:5]
assert sharding.maybe_initialize_distributed()
assert jax.process_count() == 2 and jax.device_count() == 4
mesh = sharding.make_mesh((("data", 1), ("fsdp", -1), ("tensor", 2)))
cfg, params = models.load_hf(ckpt, mesh=mesh)
q = params["layers"]["self_attn"]["q_proj"]["kernel"]
local = [s.data.shape for s in q.addressable_shards]
batch = np.load(ids_path)
bs = sharding.batch_sharding(mesh)
lo, hi = sharding.local_rows(bs, batch["ids"].shape, 0)
ids = sharding.to_global(batch["ids"][lo:hi], bs, batch["ids"].shape)
mask = sharding.to_global(batch["mask"][lo:hi], bs, batch["mask"].shape)
logits = models.forward(cfg, params, ids, mask)
logits = multihost_utils.process_allgather(logits, tiled=True)
models.save_hf(cfg, params, out_dir)
if sharding.is_main_process():
  np.save(result + ".npy", np.asarray(logits))
  json.dump({"local_shards": local, "addressable": q.is_fully_addressable}, open(result, "w"))
multihost_utils.sync_global_devices("done")
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_process_load_forward_save(tmp_path):
  cfg = models.ModelConfig.from_hf(HF)
  params = models.init_params(cfg, jax.random.key(0))
  models.save_hf(cfg, params, tmp_path / "ckpt")
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 128, (4, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  np.savez(tmp_path / "batch.npz", ids=ids, mask=mask)
  ref = np.asarray(models.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))

  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs.append(subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "ckpt"), str(tmp_path / "out"),
         str(tmp_path / "batch.npz"), str(tmp_path / "result.json")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    for p in procs:
      log, _ = p.communicate(timeout=300)
      assert p.returncode == 0, log[-4000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["addressable"] is False                # really spread over two processes
  assert result["local_shards"] == [[2, 32, 32], [2, 32, 32]]   # [L, D/fsdp, N*H/tensor]
  np.testing.assert_allclose(np.load(tmp_path / "result.json.npy"), ref, atol=2e-5)
  _, saved = models.load_hf(tmp_path / "out")          # gathered tensor by tensor
  jax.tree.map(np.testing.assert_array_equal, saved, params)
