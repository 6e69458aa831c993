"""The policy of a run: its model config, what a checkpoint path holds, the one loader.

    cfg = policy.model_config(config, tokenizer)            # numerics from the config
    kind = policy.checkpoint_kind(path)                      # "hf" | "step" | "run"
    pol = policy.load_policy(config, path, mesh, rules)     # Policy(model_cfg, params, tokenizer, ...)
    ident = policy.source_identity(config, path)             # what exactly `path` holds
    policy.export_hf(path, out_dir)                          # orbax step -> HF dir for serving

Every stage starts its model here: Safe-SFT (from `model.hf_dir` or a random
preset), Safe-GDPO (from `gdpo.init_checkpoint`), evaluation (each target) and
export. A path is one of
  hf    a Hugging Face directory: config.json + *.safetensors (or their index);
        its tokenizer when it has one, else the config's tokenizer;
  step  an orbax step directory (`<run>/checkpoints/<step>`, holding state/);
  run   a run directory or its checkpoints/ directory: its latest step.
An orbax step restores only the params (LoRA adapters merged); its model
config and tokenizer come from the run directory. Its checksums.json is
verified first (checkpoint.verify): a damaged step is an error naming it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from safecrs_jax import models
from safecrs_jax.data import assets, tokens
from safecrs_jax.infra import provenance, storage
from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import lora as lora_lib
from safecrs_jax.train import checkpoint
from safecrs_jax.train import state as ts

KINDS = ("hf", "step", "run")


def numerics(config) -> dict:
  """ModelConfig overrides a run config sets: dtype, param_dtype, remat, scan_layers, attention.

  Fused q|k|v and gate|up matmuls are turned off when the mesh has a `tensor`
  axis other than 1 (or -1): a fused kernel would be sharded across the seams
  of its parts. The params are the same either way.
  """
  over = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
              remat=config.model.remat, attention=config.model.attention)
  tensor = dict(shd.as_tuples(config.mesh.shape)).get("tensor", 1)
  if int(tensor) != 1:
    over["fuse_projections"] = False
  over["scan_layers"] = bool(config.model.scan_layers)
  return over


def model_config(config, tokenizer=None) -> models.ModelConfig:
  """ModelConfig from model.hf_dir or model.preset, with the config's numerics.

  A preset model takes its vocabulary size and special ids from the tokenizer
  (rounded up to a multiple of 64); an HF model must cover the tokenizer.
  """
  over = numerics(config)
  extra = dict(shd.as_tuples(config.model.overrides))
  if config.model.hf_dir:
    if extra:
      raise ValueError(f"model.overrides {extra} only apply to a preset, not model.hf_dir")
    cfg = models.ModelConfig.from_hf(config.model.hf_dir, **over)
  else:
    if config.model.preset not in models.PRESETS:
      raise ValueError(f"model.preset {config.model.preset!r} unknown; "
                       f"known: {sorted(models.PRESETS)} (or set model.hf_dir)")
    if tokenizer is not None:
      over["vocab_size"] = -(-len(tokenizer) // 64) * 64
      over["eos_token_id"] = tokens.end_of_turn_id(tokenizer)
      over["pad_token_id"] = tokens.pad_id(tokenizer)
      over["bos_token_id"] = tokenizer.bos_token_id
    over.update(extra)
    cfg = models.ModelConfig.from_hf(models.PRESETS[config.model.preset], **over)
  if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
    raise ValueError(f"tokenizer has {len(tokenizer)} tokens > model vocab_size "
                     f"{cfg.vocab_size}")
  return cfg


def is_hf_dir(path) -> bool:
  """config.json plus safetensors weights (one file, shards, or their index)."""
  if not storage.isdir(path) or not storage.isfile(os.path.join(path, "config.json")):
    return False
  return any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
             for n in storage.listdir(path))


def checkpoint_kind(path) -> str:
  """"hf", "step" or "run" for `path` (module docstring); raises when it is none of them."""
  if not storage.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if is_hf_dir(path):
    return "hf"
  if storage.isdir(os.path.join(path, "state")) or (
      os.path.basename(storage.resolve(path)).isdigit()
      and os.path.basename(os.path.dirname(storage.resolve(path))) == checkpoint.CHECKPOINTS):
    return "step"      # a damaged step (no state/) is reported as such by its readers
  ckdir = os.path.join(path, checkpoint.CHECKPOINTS)
  if checkpoint.saved_steps(ckdir if storage.isdir(ckdir) else path):
    return "run"
  raise FileNotFoundError(
      f"{path} holds no checkpoint: expected a Hugging Face directory (config.json + "
      f"*.safetensors), an orbax step dir (with state/), or a run dir with "
      f"{checkpoint.CHECKPOINTS}/<step>/")


@dataclasses.dataclass
class Policy:
  """A loaded model: config, params (in their shardings), tokenizer, where from."""
  model_cfg: models.ModelConfig
  params: Any
  tokenizer: Any
  source: str          # the path loaded, or "preset:<name>" / the model.hf_dir
  kind: str            # "hf" | "step" | "run" | "preset"


def source_identity(config, path):
  """What exactly `path` (as load_policy reads it) holds, for fingerprints.

  orbax: {kind, path, step, manifest}: the step dir and a hash of its
  checksums.json; hf: {kind, path, hash} (content of the directory); "" : the
  config's model section (model.hf_dir's hash, or the random preset + seed).
  """
  if not path:
    if config.model.hf_dir:
      return source_identity(config, config.model.hf_dir)
    return {"kind": "preset", "preset": config.model.preset,
            "overrides": [list(x) for x in shd.as_tuples(config.model.overrides)],
            "seed": int(config.seed)}
  if checkpoint_kind(path) == "hf":
    return {"kind": "hf", "path": storage.resolve(path), "hash": provenance.tree_hash(path)}
  step_dir = checkpoint.find_step_dir(path)
  checkpoint.check_step(step_dir, verify=False)
  # records checksums.json of a step without one, when the user accepts it unverified
  checkpoint.step_problem(step_dir, accept_unverified=config.checkpoint.accept_unverified)
  files = provenance.read_manifest(step_dir)
  return {"kind": "orbax", "path": step_dir, "step": int(os.path.basename(step_dir)),
          "manifest": provenance.digest(files) if files is not None else None}


def load_params(path, mesh=None, rules=None, *, merge_lora=True, verify=True,
                accept_unverified=False, **overrides):
  """(ModelConfig, params) of an orbax run / checkpoints / step dir.

  The model config comes from the run's model_config.json (`overrides` set
  ModelConfig fields such as dtype). With a mesh, params are restored straight
  into their shardings. A LoRA run's adapters are merged (W + scale·A@B) unless
  merge_lora=False, in which case (cfg, params, lora, scale) is returned.
  """
  step_dir = checkpoint.find_step_dir(path)
  run_dir = checkpoint.run_dir_of(step_dir)
  if run_dir is None:
    raise checkpoint.CheckpointError(
        f"{step_dir}: no {checkpoint.MODEL_CONFIG} in its run directory; "
        "cannot tell which model the checkpoint holds")
  cfg = models.ModelConfig.from_hf(os.path.join(run_dir, checkpoint.MODEL_CONFIG), **overrides)
  abstract = {"params": models.abstract_params(cfg), "lora": None}
  info = checkpoint.saved_lora_info(step_dir)
  if info:
    abstract["lora"] = lora_lib.abstract(abstract["params"], info["rank"], info["targets"])
  if mesh is not None:
    axes = models.param_logical_axes(cfg)
    sh = shd.logical_to_sharding(axes, mesh, rules, shapes=abstract["params"])
    abstract["params"] = ts.with_shardings(abstract["params"], sh)
    if abstract["lora"] is not None:
      l_axes = lora_lib.logical_axes(axes, abstract["lora"])
      l_sh = shd.logical_to_sharding(l_axes, mesh, rules, shapes=abstract["lora"])
      abstract["lora"] = ts.with_shardings(abstract["lora"], l_sh)
  out = checkpoint.load_state_items(step_dir, abstract, verify=verify,
                                    accept_unverified=accept_unverified)
  params, adapters = out["params"], out["lora"]
  scale = lora_lib.scale(info["alpha"], info["rank"]) if info else None
  if not merge_lora:
    return cfg, params, adapters, scale
  if adapters is not None:
    params = jax.jit(lora_lib.merge, static_argnums=2)(params, adapters, scale)
  return cfg, params


def _config_tokenizer(config, data_dir=None):
  return tokens.load_tokenizer(assets.resolve_tokenizer_path(config, data_dir))


def _from_model_section(config, mesh, rules, data_dir, init_key):
  """The model the config's `model` section names: model.hf_dir, else a random preset."""
  tok = _config_tokenizer(config, data_dir)
  if config.model.hf_dir:
    cfg, params = models.load_hf(config.model.hf_dir, mesh=mesh, rules=rules, **numerics(config))
    return Policy(cfg, params, tok, storage.resolve(config.model.hf_dir), "hf")
  cfg = model_config(config, tok)
  key = jax.random.key(int(config.seed)) if init_key is None else init_key
  params = models.init_params(cfg, key, mesh=mesh, rules=rules)
  return Policy(cfg, params, tok, f"preset:{config.model.preset}", "preset")


def load_policy(config, path, mesh=None, rules=None, *, data_dir=None, init_key=None):
  """The Policy at `path` (module docstring), with the config's numerics.

  path "" (or None): the config's model section — model.hf_dir, else a random
  init of model.preset from `init_key` (default key(seed)); the tokenizer is
  the config's (tokenizer.path).
  """
  if not path:
    return _from_model_section(config, mesh, rules, data_dir, init_key)
  kind = checkpoint_kind(path)
  over = numerics(config)
  if kind == "hf":
    cfg, params = models.load_hf(path, mesh=mesh, rules=rules, **over)
    has_tok = storage.exists(os.path.join(path, "tokenizer_config.json"))
    tok = tokens.load_tokenizer(path) if has_tok else _config_tokenizer(config, data_dir)
    return Policy(cfg, params, tok, storage.resolve(path), kind)
  cfg, params = load_params(path, mesh, rules, verify=config.checkpoint.verify,
                            accept_unverified=config.checkpoint.accept_unverified,
                            **over)
  tok = tokens.load_tokenizer(checkpoint.tokenizer_dir(path))
  return Policy(cfg, params, tok, checkpoint.find_step_dir(path), kind)


GENERATION_CONFIG = "generation_config.json"


def trained_dtype(path) -> str | None:
  """model.dtype (the compute dtype) of the run that `path` belongs to, from its config.json;
  None when the run directory has none."""
  run_dir = checkpoint.run_dir_of(checkpoint.find_step_dir(path))
  config_file = os.path.join(run_dir or "", "config.json")
  if run_dir is None or not storage.exists(config_file):
    return None
  with storage.open(config_file, encoding="utf-8") as f:
    return json.load(f).get("model", {}).get("dtype") or None


def generation_config(tokenizer) -> dict:
  """generation_config.json content: the ids our generation stops at (EOS and the chat
  template's end-of-turn token, tokens.stop_token_ids), so a server stops where we do."""
  stops = list(tokens.stop_token_ids(tokenizer))
  out = {"eos_token_id": stops[0] if len(stops) == 1 else stops,
         "pad_token_id": tokens.pad_id(tokenizer)}
  if tokenizer.bos_token_id is not None:
    out["bos_token_id"] = int(tokenizer.bos_token_id)
  return out


def export_hf(path, out_dir, dtype=None, accept_unverified=False):
  """Writes the orbax checkpoint at `path` (LoRA merged) as an HF model dir + tokenizer +
  generation_config.json.

  dtype: of the written weights; None = the run's model.dtype, the dtype it trained in
  (bfloat16 for the paper configs, so a server's `--dtype auto` serves that; float32 for
  the demo), else the parameters' own.
  """
  cfg, params = load_params(path, accept_unverified=accept_unverified)
  dtype = dtype or trained_dtype(path) or cfg.param_dtype
  if dtype != cfg.param_dtype:
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  models.save_hf(cfg, params, out_dir)
  tok = checkpoint.tokenizer_dir(path)
  if jax.process_index() == 0:
    for name in storage.listdir(tok):
      storage.copy_file(os.path.join(tok, name), os.path.join(out_dir, name))
    with storage.open(os.path.join(out_dir, GENERATION_CONFIG), "w", encoding="utf-8") as f:
      json.dump(generation_config(tokens.load_tokenizer(tok)), f, indent=2, sort_keys=True)
  return out_dir
