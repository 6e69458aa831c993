"""A stage's device programs, as jitted functions over abstract inputs (no arrays, no data).

    progs = stage_programs(config, mesh, rules)   # [Program], see below

Each Program is what the stage jits (the same step functions, shardings and
donation as sft.Run / gdpo.Run / evaluation) with jax.ShapeDtypeStruct inputs
whose shapes come from the config: batch sizes, sequence lengths, G. The
state is built by jax.eval_shape, so an 8B model costs nothing to describe.

`resident` counts what the stage keeps on the devices while the program runs
without passing it in (the optimizer state while rollouts decode from the
params; the reference params while the learner updates), per device, so that
peak = program bytes + resident.

Shape letters (package legend): A micro-batches, B rows per micro-batch, P
prompt tokens, T completion (or SFT sequence) tokens, G samples per prompt.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from safecrs_jax import models
from safecrs_jax.infra import flops
from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import lora as lora_lib
from safecrs_jax.rl import rollout, steps
from safecrs_jax.train import gdpo_setup, optim, policy
from safecrs_jax.train import state as ts


@dataclasses.dataclass
class Program:
  name: str               # sft_train | gdpo_rollout | gdpo_reference | gdpo_learner | eval_generate
  fn: Callable            # a jax.jit-wrapped function
  args: tuple             # abstract arguments (ShapeDtypeStructs with shardings)
  resident: int           # bytes per device held outside the program's arguments
  flops: float            # analytic model FLOPs of one call (all devices)
  kind: str               # "train" | "forward" | "generate" (how the MFU ceiling is read)
  shapes: str             # the shapes in words, for the table
  gen_tokens: int = 0     # decode steps (generate programs)
  seq: int = 0            # tokens per row (train / forward programs)
  read_bytes: int = 0     # per device: weights + KV cache a decode step reads


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if not jnp.issubdtype(x.dtype, jnp.number) and x.dtype != jnp.bool_:
      continue
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _key(mesh):
  k = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=shd.replicated(mesh))


def _abstract_state(config, model_cfg, mesh, rules, tx, lora_rank=0):
  params = models.abstract_params(model_cfg)
  lora_p = (lora_lib.abstract(params, lora_rank, tuple(config.sft.lora.targets))
            if lora_rank else None)
  abstract = jax.eval_shape(lambda p, lp: ts.create(p, tx, lp), params, lora_p)
  sh = ts.shardings(abstract, models.param_logical_axes(model_cfg), mesh, rules)
  return ts.with_shardings(abstract, sh), sh


def _chunk(config):
  return int(config.model.logits_chunk)


def sft_programs(config, model_cfg, mesh, rules):
  """The Safe-SFT train step at the longest bucket."""
  tx, sched = optim.make_optimizer(config.optim, 1000)
  rank = int(config.sft.lora.rank)
  state, state_sh = _abstract_state(config, model_cfg, mesh, rules, tx, rank)
  a = int(config.sft.grad_accum)
  b = int(config.sft.batch_size) * shd.data_parallel_size(mesh)
  t = max(int(config.tokenizer.max_length), *map(int, config.tokenizer.buckets))
  bsh = shd.batch_sharding(mesh, 3, batch_dim=1)
  batch = steps.TokenBatch(*(_sds((a, b, t), jnp.int32, bsh) for _ in range(3)))
  repl = shd.replicated(mesh)
  fn = jax.jit(functools.partial(
      steps.sft_train_step, model_cfg=model_cfg, tx=tx, schedule=sched,
      lora_scale=lora_lib.scale(config.sft.lora.alpha, rank) if rank else None,
      lora_dropout=float(config.sft.lora.dropout) if rank else 0.0,
      logits_chunk=_chunk(config), mesh=mesh, rules=rules),
      in_shardings=(state_sh, bsh, repl), out_shardings=(state_sh, repl), donate_argnums=0)
  return [Program("sft_train", fn, (state, batch, _key(mesh)), 0,
                  flops.train(model_cfg, a * b, t, t - 1), "train", f"A={a} B={b} T={t}",
                  seq=t)]


def _generate_program(name, model_cfg, params, mesh, rules, n_prompts, p, sampling,
                      resident):
  ids = _sds((n_prompts, p), jnp.int32, shd.batch_sharding(mesh, 2))
  fn = jax.jit(lambda prm, i, m, k: rollout.generate(model_cfg, prm, i, m, k, sampling,
                                                     mesh=mesh, rules=rules))
  t, g = sampling.max_new_tokens, sampling.num_samples
  cache = jax.eval_shape(lambda: models.init_cache(model_cfg, n_prompts * g, p + t))
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  read = per_device_bytes(params) + cache_bytes // shd.data_parallel_size(mesh)
  return Program(name, fn, (params, ids, ids, _key(mesh)), resident,
                 flops.generate(model_cfg, n_prompts * g, p, t), "generate",
                 f"prompts={n_prompts} G={g} P={p} T={t}", gen_tokens=t, read_bytes=read)


def gdpo_programs(config, model_cfg, mesh, rules):
  """Rollout generation, the reference forward (beta > 0) and the learner update."""
  g = config.gdpo
  tx, sched = optim.make_optimizer(config.optim, 1000)
  state, state_sh = _abstract_state(config, model_cfg, mesh, rules, tx)
  geo = gdpo_setup.batch_geometry(g, shd.data_parallel_size(mesh))  # the stage's geometry
  group, a, b = geo["group"], geo["accum"], geo["micro_rows"]
  prompts = geo["chunk_prompts"]                                   # prompts per rollout call
  p = max(int(g.max_prompt_length), *map(int, g.prompt_buckets))
  t = int(g.max_completion_length)
  beta = float(g.beta) > 0
  ref_bytes = per_device_bytes(state.params) if beta else 0
  opt_bytes = per_device_bytes(state.opt_state)
  sampling = rollout.SamplingConfig(
      max_new_tokens=t, num_samples=group, temperature=float(g.temperature),
      top_p=float(g.top_p), top_k=int(g.top_k), stop_ids=model_cfg.eos_token_ids,
      pad_id=int(model_cfg.pad_token_id or 0))
  out = [_generate_program("gdpo_rollout", model_cfg, state.params, mesh, rules, prompts, p,
                           sampling, opt_bytes + ref_bytes)]
  sh3 = shd.batch_sharding(mesh, 3, batch_dim=1)
  adv_sh = shd.batch_sharding(mesh, 2, batch_dim=1)
  i32 = lambda n: _sds((a, b, n), jnp.int32, sh3)   # noqa: E731
  f32 = lambda: _sds((a, b, t), jnp.float32, sh3)   # noqa: E731
  batch = steps.RolloutBatch(i32(p), i32(p), i32(t), i32(t), f32(),
                             _sds((a, b), jnp.float32, adv_sh), f32() if beta else None)
  b_sh = jax.tree.map(lambda x: x.sharding, batch)
  temp = float(g.temperature) if float(g.temperature) > 0 else 1.0
  kw = dict(model_cfg=model_cfg, temperature=temp, logits_chunk=_chunk(config), mesh=mesh,
            rules=rules)
  shapes = f"A={a} B={b} P={p} T={t}"
  if beta:
    ref_fn = jax.jit(functools.partial(steps.reference_logprobs, **kw),
                     in_shardings=(state_sh.params, b_sh), out_shardings=sh3)
    out.append(Program("gdpo_reference", ref_fn, (state.params, batch), per_device_bytes(state),
                       flops.forward(model_cfg, a * b, p + t, t), "forward", shapes,
                       seq=p + t))
  learn = jax.jit(functools.partial(steps.gdpo_train_step,
                                    loss_cfg=gdpo_setup.loss_config(g), tx=tx,
                                    schedule=sched, **kw),
                  in_shardings=(state_sh, None, b_sh),
                  out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=0)
  out.append(Program("gdpo_learner", learn, (state, None, batch), ref_bytes,
                     flops.train(model_cfg, a * b, p + t, t), "train", shapes, seq=p + t))
  return out


def eval_program(config, model_cfg, mesh, rules):
  """Greedy evaluation generation from params restored in their shardings."""
  e = config.eval
  params = ts.with_shardings(models.abstract_params(model_cfg),
                             models.param_shardings(model_cfg, mesh, rules))
  dp = shd.data_parallel_size(mesh)
  n = -(-int(e.batch_size) // dp) * dp
  p = max(int(e.max_prompt_length), *map(int, e.prompt_buckets))
  sampling = rollout.SamplingConfig(max_new_tokens=int(e.max_new_tokens), greedy=True,
                                    stop_ids=model_cfg.eos_token_ids,
                                    pad_id=int(model_cfg.pad_token_id or 0))
  return _generate_program("eval_generate", model_cfg, params, mesh, rules, n, p, sampling, 0)


def stage_programs(config, mesh, rules) -> tuple[Any, list]:
  """(ModelConfig, [Program]) of config.stage, evaluation generation last."""
  model_cfg = policy.model_config(config)
  build = sft_programs if config.stage == "sft" else gdpo_programs
  return model_cfg, build(config, model_cfg, mesh, rules) + [
      eval_program(config, model_cfg, mesh, rules)]
