"""sft.py: the jitted step (sharding, accumulation, LoRA) and the loop (resume, SIGTERM)."""
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common, demo
from safecrs_jax import models
from safecrs_jax.data import assets, tokens
from safecrs_jax.infra import metrics_log
from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import lora
from safecrs_jax.rl import steps as train_steps
from safecrs_jax.train import checkpoint, optim, policy, sft
from safecrs_jax.train import state as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = models.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                         scan_layers=False)


def _optim(warmup=0.0):
  c = common.build(stage="sft").optim
  c.lr, c.warmup_ratio, c.weight_decay = 1e-2, warmup, 0.01
  return optim.make_optimizer(c, 10)


def _batch(a, m, t, seed=0):
  """Random [a, m, t] batch; rows have different lengths and prompt lengths."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, CFG.vocab_size, (a, m, t)).astype(np.int32)
  lens = rng.integers(t // 3, t + 1, (a, m))
  prompt = rng.integers(1, t // 3, (a, m))
  pos = np.arange(t)
  attn = (pos < lens[..., None]).astype(np.int32)
  loss = (attn * (pos >= prompt[..., None])).astype(np.int32)
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _tb(batch):
  return train_steps.TokenBatch(**batch)


def _run_steps(mesh, batch, steps=2, rank=0, sgd=False, cfg=CFG):
  tx, sched = _optim()
  if sgd:  # linear in the gradient: Adam's first step (~sign(g)) amplifies float noise
    tx = optax.sgd(1.0)
  params = models.init_params(cfg, jax.random.key(0), mesh=mesh)
  lora_p = lora.init(params, rank, ("q_proj", "v_proj"), jax.random.key(1)) if rank else None
  state = ts.create(params, tx, lora_p)
  sh = ts.shardings(jax.eval_shape(lambda: state), models.param_logical_axes(cfg), mesh)
  state = jax.device_put(state, sh)
  bs = NamedSharding(mesh, P(None, shd.BATCH_AXES, None))
  rep = NamedSharding(mesh, P())
  step = jax.jit(functools.partial(train_steps.sft_train_step, model_cfg=cfg, tx=tx, schedule=sched,
                                   lora_scale=2.0 if rank else None, mesh=mesh),
                 in_shardings=(sh, bs, rep), out_shardings=(sh, rep), donate_argnums=0)
  batch = jax.device_put(_tb(batch), bs)
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch, jax.random.key(2))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def _one_device():
  return shd.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), devices=jax.devices()[:1])


def _close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def test_shifted_nll_counts_only_target_tokens():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
  ids = jnp.array([[0, 1, 2]])
  s, n = train_steps.shifted_nll(logits, ids, jnp.array([[0, 0, 1]]))   # only token 2 is a target
  assert float(n) == 1.0
  np.testing.assert_allclose(float(s), -np.log(0.1), rtol=1e-6)  # predicted at position 1
  s2, n2 = train_steps.shifted_nll(logits, ids, jnp.array([[1, 1, 1]]))  # token 0 is never a target
  assert float(n2) == 2.0
  np.testing.assert_allclose(float(s2), -np.log(0.25) - np.log(0.1), rtol=1e-6)


def test_sharded_step_matches_single_device():
  batch = _batch(2, 8, 24)
  mesh8 = shd.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
  s1, m1 = _run_steps(_one_device(), batch)
  s8, m8 = _run_steps(mesh8, batch)
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  assert m1[1]["loss"] < m1[0]["loss"]
  _close(s1.params, s8.params, atol=2e-5)
  _close(s1.opt_state, s8.opt_state, atol=2e-5)


def test_grad_accumulation_equals_one_big_batch():
  k = 3
  acc = _batch(4, k, 20, seed=1)                       # 4 micro-batches of k rows
  big = {n: v.reshape(1, 4 * k, 20) for n, v in acc.items()}
  sa, ma = _run_steps(_one_device(), acc, steps=1, sgd=True)
  sb, mb = _run_steps(_one_device(), big, steps=1, sgd=True)
  # token counts differ per micro-batch, so a mean of micro-batch means would differ
  per = acc["loss_mask"][:, :, 1:].sum(axis=(1, 2))
  assert len(set(per.tolist())) > 1
  np.testing.assert_allclose(ma[0]["loss"], mb[0]["loss"], rtol=1e-6)
  np.testing.assert_allclose(ma[0]["grad_norm"], mb[0]["grad_norm"], rtol=1e-5)
  assert ma[0]["loss_tokens"] == per.sum()
  _close(sa.params, sb.params, atol=1e-6)


def test_bf16_compute_keeps_float32_master_weights():
  batch = _batch(1, 4, 16, seed=4)
  bf = dataclasses.replace(CFG, dtype="bfloat16")
  s16, m16 = _run_steps(_one_device(), batch, steps=1, cfg=bf)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.params))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.opt_state) if x.ndim)
  p0 = models.init_params(CFG, jax.random.key(0))
  s32, n32 = train_steps.batch_nll(p0, None, _tb({k: v[0] for k, v in batch.items()}), model_cfg=CFG)
  assert m16[0]["loss_tokens"] == n32
  np.testing.assert_allclose(m16[0]["loss"], s32 / n32, rtol=2e-2)   # same loss, bf16 math
  assert np.isfinite(m16[0]["grad_norm"]) and m16[0]["grad_norm"] > 0


def test_lora_trains_only_adapters_and_merge_matches():
  batch = _batch(1, 4, 16, seed=3)
  tx, _ = _optim()
  s0 = models.init_params(CFG, jax.random.key(0))
  state, metrics = _run_steps(_one_device(), batch, steps=2, rank=4)
  jax.tree.map(np.testing.assert_array_equal, state.params, jax.device_get(s0))  # frozen
  b = state.lora["layers"]["self_attn"]["q_proj"]["lora_b"]
  assert np.abs(b).max() > 0                                     # adapters moved from B = 0
  assert metrics[1]["loss"] < metrics[0]["loss"]
  assert set(state.lora["layers"]["self_attn"]) == {"q_proj", "v_proj"}
  mb = _tb({k: v[0] for k, v in batch.items()})
  with_adapters = train_steps.sft_eval_step(state, mb, model_cfg=CFG, lora_scale=2.0)
  merged = lora.merge(state.params, state.lora, 2.0)
  plain = train_steps.sft_eval_step(ts.TrainState(state.step, merged, None, None), mb, model_cfg=CFG)
  np.testing.assert_allclose(with_adapters[0], plain[0], rtol=1e-6)


# --------------------------------------------------------------------------
# The loop on SafeRec-mini (size=test model).


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def _config(cache, **sft_over):
  c = demo.get_config("size=test,relational=off")
  c.data.cache_dir = cache
  c.tokenizer.max_length, c.tokenizer.buckets = 384, (384,)
  c.sft.num_steps, c.sft.batch_size, c.sft.grad_accum = 6, 2, 2
  c.sft.eval_every, c.sft.eval_batches = 3, 1
  c.log.every, c.log.progress, c.log.tensorboard = 1, False, False
  c.checkpoint.save_every = 100
  c.sft.update(sft_over)
  return c


def test_kill_and_resume_continues_the_same_trajectory(cache, tmp_path):
  """6 steps straight == SIGTERM at 3 + resume; then export, reload, and bad checkpoints."""
  full = sft.train(_config(cache), str(tmp_path / "full"))
  assert full["final_step"] == 6 and not full["preempted"]

  def sigterm_at_3(step, state):
    del state
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
  killed = sft.train(_config(cache), str(tmp_path / "resumed"), step_hook=sigterm_at_3)
  assert killed["preempted"] and killed["final_step"] == 3
  ckdir = tmp_path / "resumed" / "checkpoints"
  assert sorted(os.listdir(ckdir)) == ["3"]
  data = json.loads((ckdir / "3" / "data" / "metadata").read_text())
  assert (data["epoch"], data["index"], data["step"], data["rng_seed"]) == (0, 3, 3, 0)

  resumed = sft.train(_config(cache), str(tmp_path / "resumed"))
  assert resumed["start_step"] == 3 and resumed["final_step"] == 6
  losses = dict(killed["train_loss"] + resumed["train_loss"])
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                             [loss for _, loss in full["train_loss"]], rtol=0, atol=0)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full["run"].state),
               jax.device_get(resumed["run"].state))
  assert dict(full["val_loss"])[6] == dict(resumed["val_loss"])[6]

  # the run dir describes itself; params load for the next stage and export to HF
  run_dir = tmp_path / "full"
  assert {"model_config.json", "tokenizer", "config.json", "metrics.jsonl"} <= set(
      os.listdir(run_dir))
  recs = metrics_log.read_jsonl(run_dir / "metrics.jsonl")
  assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
          "train/step_time_s"} <= set(recs[1]) and recs[0]["step"] == 0
  cfg, params = policy.load_params(str(run_dir))
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.device_get(full["run"].state.params))
  out = str(tmp_path / "hf")                          # through the real entry point
  proc = subprocess.run([sys.executable, "-m", "launch.export_hf",
                         f"--checkpoint={run_dir / 'checkpoints' / '6'}", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg2, params2 = models.load_hf(out)
  assert cfg2.vocab_size == cfg.vocab_size and os.path.exists(os.path.join(out, "tokenizer.json"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params2), params)

  # an incompatible or corrupt checkpoint is a clear error naming the directory
  ckdir = run_dir / "checkpoints"
  other = _config(cache)
  other.model.overrides = (("hidden_size", 48), *demo.SIZES["test"][1:])
  with pytest.raises(checkpoint.CheckpointError, match=str(ckdir)):
    sft.Run(other, str(run_dir))                          # different param shapes
  with_lora = _config(cache)
  with_lora.sft.lora.rank = 4
  with pytest.raises(checkpoint.CheckpointError, match="incompatible"):
    sft.Run(with_lora, str(run_dir))
  for root, _, files in os.walk(ckdir / "6" / "state"):
    for f in files:
      if f != "commit_success.txt":
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match=str(ckdir)):
    sft.Run(_config(cache), str(run_dir))


def test_demo_config_learns_through_the_entry_point(cache, tmp_path):
  """30 steps of configs/demo.py (the real tiny model) through launch.train_sft."""
  work = tmp_path / "demo"
  cmd = [sys.executable, "-m", "launch.train_sft", "--config=configs/demo.py",
         f"--workdir={work}", "--config.sft.num_steps=30", "--config.sft.eval_every=30",
         "--config.sft.eval_batches=2", f"--config.data.cache_dir={cache}",
         "--config.log.progress=False"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  val = {r["step"]: r["val/loss"] for r in metrics_log.read_jsonl(work / "metrics.jsonl")
         if "val/loss" in r}
  assert set(val) == {0, 30}
  assert val[30] < val[0] - 3.0, val            # ~7.4 (uniform over the vocab) -> ~2.4


def test_lora_run_from_hf_dir_saves_adapters_and_loads_merged(cache, tmp_path):
  """Starts from models.load_hf (model_dir + its tokenizer), trains LoRA, loads merged."""
  c = _config(cache, num_steps=2, eval_every=0)
  tok_dir = assets.resolve_tokenizer_path(c)
  base_cfg = policy.model_config(c, tokens.load_tokenizer(tok_dir))
  hf = str(tmp_path / "base_hf")
  models.save_hf(base_cfg, models.init_params(base_cfg, jax.random.key(7)), hf)
  tokens.load_tokenizer(tok_dir).save_pretrained(hf)
  c.model.hf_dir, c.model.overrides, c.tokenizer.path = hf, (), ""
  c.sft.lora.rank, c.sft.lora.targets = 4, ("q_proj", "down_proj")
  s = sft.train(c, str(tmp_path / "lora"))
  state = jax.device_get(s["run"].state)
  _, base = models.load_hf(hf)
  jax.tree.map(np.testing.assert_array_equal, state.params, jax.device_get(base))  # frozen
  assert set(state.lora["layers"]["self_attn"]) == {"q_proj"}
  assert checkpoint.saved_lora_info(str(tmp_path / "lora"))["rank"] == 4
  _, merged = policy.load_params(str(tmp_path / "lora"))
  want = lora.merge(state.params, state.lora, 32.0 / 4)     # alpha 32 (the reference default)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), merged, want)
  _, base2, adapters, scale = policy.load_params(str(tmp_path / "lora"), merge_lora=False)
  assert scale == 8.0
  jax.tree.map(np.testing.assert_array_equal, base2, state.params)
