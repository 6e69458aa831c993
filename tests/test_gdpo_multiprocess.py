"""Two local JAX processes (CPU collectives) run Safe-GDPO like one process with the same devices.

Rollouts (full prompt arrays uploaded on every process, completions gathered
back), host rewards, the sharded learner step and the checkpoint all cross the
process boundary here.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from safecrs_jax.train import gdpo
from tests.test_gdpo_loop import demo_gdpo_config, sft_run  # noqa: F401 (fixture)
from tests.test_sft_multiprocess import _free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("rollout/svr", "rollout/hit", "rollout/length", "reward/relevance", "reward/safety",
        "adv/abs_mean", "train/loss", "train/kl", "train/grad_norm")

WORKER = r"""
import json, sys
import jax
pid, port, out, init, work = sys.argv[1:6]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=int(pid), initialization_timeout=120)
from tests.test_gdpo_multiprocess import config, KEYS
from safecrs_jax.train import gdpo
s = gdpo.train(config(init), work)
emb = jax.experimental.multihost_utils.process_allgather(
    s["run"].state.params["embed_tokens"]["embedding"], tiled=True)
with open(out, "w") as f:
  json.dump({"history": [{k: h[k] for k in KEYS} for h in s["history"]],
             "devices": jax.device_count(), "processes": jax.process_count(),
             "emb_sum": float(abs(emb).sum())}, f)
"""


def config(init):
  """2 loop steps on every device: 4 completions per device x 4 devices = 4 prompts x G = 4."""
  c = demo_gdpo_config(init, **{"gdpo.num_steps": 2, "gdpo.group_size": 4, "gdpo.batch_size": 4,
                                "gdpo.max_completion_length": 24, "log.every": 1,
                                "checkpoint.save_every": 100})
  c.mesh.num_devices = -1
  c.checkpoint.async_save = False
  return c


@pytest.mark.multiprocess
def test_two_processes_match_one(sft_run, tmp_path):  # noqa: F811 (fixture)
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = []
  for pid in range(2):
    out = tmp_path / f"out_{pid}.json"
    procs.append((subprocess.Popen(
        [sys.executable, "-c", WORKER, str(pid), str(port), str(out), sft_run,
         str(tmp_path / "run_2")], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True), out))
  try:
    c = config(sft_run)
    c.mesh.num_devices = 4                  # the reference: one process, 4 of the 8 devices
    ref = gdpo.train(c, str(tmp_path / "run_1"))
    ref_emb = float(abs(jax.device_get(ref["run"].state.params["embed_tokens"]["embedding"])).sum())
    results = []
    for proc, out in procs:
      log, _ = proc.communicate(timeout=900)
      assert proc.returncode == 0, log[-4000:]
      results.append(json.loads(out.read_text()))
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
  want = [{k: h[k] for k in KEYS} for h in ref["history"]]
  assert len(want) == 2 and want[-1]["train/grad_norm"] > 0      # a real update happened
  for m in results:
    assert (m["devices"], m["processes"]) == (4, 2)
    for got, exp in zip(m["history"], want):
      for k in KEYS:
        np.testing.assert_allclose(got[k], exp[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(m["emb_sum"], ref_emb, rtol=1e-5)
  assert os.listdir(tmp_path / "run_2" / "checkpoints") == ["2"]
