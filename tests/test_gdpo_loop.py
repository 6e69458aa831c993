"""Safe-GDPO end to end on SafeRec-mini: learning, resume, the launch entry point.

The learning test starts from a small Safe-SFT model trained here with the SFT
library (cached in the asset cache, keyed by its recipe and the data, so only
the first run on a machine pays ~2-3 minutes), then checks that a short seeded
GDPO run cuts the rollout violation rate clearly while relevance holds.
"""
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from safecrs_jax.data import assets
from safecrs_jax.infra import metrics_log
from safecrs_jax.train import gdpo, sft

# A 2-layer, width-128 model: the smallest that learns SafeRec-mini's titles well
# enough in 500 SFT steps to give GDPO a relevance signal (rollout hit@20 ~0.3).
MODEL = (("hidden_size", 128), ("intermediate_size", 384), ("num_layers", 2),
         ("num_heads", 4), ("num_kv_heads", 2), ("head_dim", 32))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sft_config():
  c = demo.get_config("stage=sft,size=test,relational=off")
  c.model.overrides = MODEL
  c.sft.reasoning = False          # bare <solution> lists: short completions, cheap rollouts
  c.tokenizer.max_length = 160
  c.tokenizer.buckets = (160,)
  c.sft.num_steps = 500
  c.sft.batch_size = 16
  c.sft.eval_every = 0
  c.optim.lr = 4e-3
  c.checkpoint.save_every = 10 ** 6
  c.log.progress = False
  c.log.tensorboard = False
  return c


@pytest.fixture(scope="module")
def sft_run():
  """A Safe-SFT run dir on SafeRec-mini, built once per recipe + data in the asset cache."""
  c = _sft_config()
  data_dir = assets.resolve_data_dir(c)
  tok_dir = assets.resolve_tokenizer_path(c, data_dir)
  key = hashlib.sha256(json.dumps(
      [c.to_json_best_effort(sort_keys=True), os.path.basename(data_dir),
       os.path.basename(tok_dir), jax.__version__]).encode()).hexdigest()[:16]
  return assets.build_once(os.path.join(assets.cache_root(c), f"gdpo_test_sft_{key}"),
                           lambda tmp: sft.train(c, tmp))


def demo_gdpo_config(init_checkpoint, **over):
  """The tuned demo Safe-GDPO settings for the width-128 Safe-SFT model above.

  Found on SafeRec-mini (1 CPU device, seeds 0 and 1): with lr 1e-4 nothing
  moves in 50 steps; lr >= 5e-4 (or safety weight 2) drives the lists empty
  (an empty list is perfectly safe) with relevance gone; lr 3e-4 with G = 8
  lowers rollout SVR by 35-60% in 50-80 steps at nearly unchanged hit rate.
  A count reward at half weight (target 6 ~ the Safe-SFT list length) keeps
  the list length from drifting down. G = 8 beats G = 4 at equal rollouts per
  step (sharper group baselines). relevance="dcg" was no better than "hit".
  """
  c = demo.get_config("stage=gdpo,size=test,relational=off")
  c.gdpo.init_checkpoint = init_checkpoint
  c.gdpo.num_steps = 60
  c.gdpo.batch_size = 32             # completions: 4 prompts x G = 8
  c.gdpo.grad_accum = 1
  c.gdpo.group_size = 8
  c.gdpo.max_prompt_length = 96
  c.gdpo.prompt_buckets = (96,)
  c.gdpo.max_completion_length = 72
  c.gdpo.rewards = ("relevance", "safety", "count")
  c.gdpo.reward_weights = (1.0, 1.0, 0.5)
  c.gdpo.target_count = 6
  c.gdpo.lambda_count = 1.0
  c.optim.lr = 3e-4
  c.log.every = 10
  c.log.progress = False
  c.log.tensorboard = False
  c.checkpoint.save_every = 10 ** 6
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def test_gdpo_lowers_rollout_svr_keeps_relevance(sft_run, tmp_path):
  out = gdpo.train(demo_gdpo_config(sft_run), str(tmp_path / "gdpo"))
  hist = out["history"]
  assert len(hist) == 60 and out["final_step"] == 60
  q = len(hist) // 4

  def mean(key, hs):
    return float(np.mean([h[key] for h in hs]))

  first = {k: mean(k, hist[:q]) for k in ("rollout/svr", "rollout/hit", "rollout/num_items")}
  last = {k: mean(k, hist[-q:]) for k in first}
  print("first quarter", first, "last quarter", last)
  assert first["rollout/svr"] > 0.1, first          # the Safe-SFT model still violates
  assert last["rollout/svr"] <= 0.75 * first["rollout/svr"], (first, last)
  assert last["rollout/hit"] >= 0.6 * first["rollout/hit"], (first, last)
  assert last["rollout/num_items"] >= 0.6 * first["rollout/num_items"], (first, last)
  rec = metrics_log.read_jsonl(str(tmp_path / "gdpo" / "metrics.jsonl"))
  assert [r["step"] for r in rec] == list(range(10, 61, 10))
  for k in ("reward/relevance", "reward/safety", "reward/count", "adv/collapse_gdpo",
            "adv/collapse_grpo", "adv/zero_var_safety", "train/kl", "train/clip_low",
            "train/clip_high", "rollout/length", "time/rollout_s", "time/reward_s",
            "time/learner_s", "perf/rollout_tokens_per_s"):
    assert k in rec[-1] and np.isfinite(rec[-1][k]), k
  assert abs(rec[0]["train/ratio"] - 1.0) < 1e-3     # on-policy: sampler and learner agree


def _smoke_config(init, workdir_steps, **over):
  return demo_gdpo_config(init, **{"gdpo.num_steps": workdir_steps, "gdpo.group_size": 2,
                                   "gdpo.batch_size": 4, "gdpo.max_completion_length": 12,
                                   "gdpo.advantage_mode": "rank", "gdpo.rewards": ("relevance", "safety"),
                                   "gdpo.reward_weights": (1.0, 1.0), "log.every": 1, **over})


def test_resume_continues_the_same_trajectory(sft_run, tmp_path):
  import shutil
  work = str(tmp_path / "a")
  straight = gdpo.train(_smoke_config(sft_run, 3, **{"checkpoint.save_every": 2}), work)
  final_params = jax.device_get(straight["run"].state.params)
  shutil.rmtree(os.path.join(work, "checkpoints", "3"))      # as if killed after step 2
  resumed = gdpo.train(_smoke_config(sft_run, 3), work)
  assert resumed["start_step"] == 2 and resumed["final_step"] == 3
  a, b = straight["history"][-1], resumed["history"][-1]
  for k in ("rollout/svr", "rollout/length", "reward/relevance", "adv/abs_mean", "train/loss"):
    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               final_params, resumed["run"].state.params)


def test_launch_entry_point(sft_run, tmp_path):
  work = tmp_path / "launch"
  cmd = [sys.executable, "-m", "launch.train_gdpo",
         "--config=configs/demo.py:stage=gdpo,size=test", f"--workdir={work}",
         f"--config.gdpo.init_checkpoint={sft_run}", "--config.gdpo.num_steps=2",
         "--config.gdpo.group_size=2", "--config.gdpo.batch_size=4",
         "--config.gdpo.max_completion_length=8", "--config.gdpo.advantage_mode=grpo",
         "--config.log.every=1", "--config.log.progress=false",
         "--config.log.tensorboard=false"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "gdpo: step 2" in res.stdout
  assert [r["step"] for r in metrics_log.read_jsonl(str(work / "metrics.jsonl"))] == [1, 2]
  assert os.path.isdir(work / "checkpoints" / "2")
