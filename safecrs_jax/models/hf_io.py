"""Hugging Face checkpoints <-> our parameter pytree.

load_hf reads a local HF directory (config.json + model.safetensors, or shards listed
in model.safetensors.index.json) straight into the requested shardings: every device
receives only its slice, read from a memory map of the file. save_hf writes
config.json + safetensors that transformers' AutoModelForCausalLM loads, gathering
one tensor (one layer) at a time, so no host ever holds the whole model.

Name mapping (l = layer; kernels are transposed, HF Linear stores [out, in]):
  embed_tokens/embedding            model.embed_tokens.weight
  layers/<path>/kernel [L,in,out]   model.layers.{l}.<path>.weight [out,in]
  layers/<path>/bias   [L,out]      model.layers.{l}.<path>.bias
  layers/<path>/scale  [L,D]        model.layers.{l}.<path>.weight
  norm/scale                        model.norm.weight
  lm_head/kernel [D,V]              lm_head.weight [V,D]   (untied models only)
"""
from __future__ import annotations

import collections
import json
import os
import re

import jax
import numpy as np

from safecrs_jax.infra import local_cache, storage
from safecrs_jax.models import safetensors_io as st
from safecrs_jax.models.config import ModelConfig
from safecrs_jax.models.decoder import abstract_params, param_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some older checkpoints carry that are not parameters.
_IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


class CheckpointError(ValueError):
  """A checkpoint that does not match the config (message names tensor and file)."""


# -- name mapping -----------------------------------------------------------------

def _leaf_specs(cfg: ModelConfig):
  """[(path tuple, hf template, stacked, transpose, ShapeDtypeStruct)] for every param."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
  out = []
  for kpath, sds in flat:
    path = tuple(k.key for k in kpath)
    leaf = path[-1]
    suffix = "bias" if leaf == "bias" else "weight"
    transpose = leaf == "kernel"
    if path[0] == "layers":
      template = "model.layers.{l}." + ".".join(path[1:-1]) + "." + suffix
      out.append((path, template, True, transpose, sds))
    elif path[0] == "lm_head":
      out.append((path, "lm_head.weight", False, True, sds))
    else:
      out.append((path, "model." + ".".join(path[:-1]) + "." + suffix, False, transpose, sds))
  return out


def _hf_shape(sds_shape, stacked, transpose):
  shape = tuple(sds_shape[1:] if stacked else sds_shape)
  return shape[::-1] if transpose else shape


# -- loading --------------------------------------------------------------------

def _open_checkpoint(path: str) -> dict[str, st.SafeFile]:
  """Tensor name -> SafeFile holding it; validates the index against the files."""
  if not storage.isdir(path):
    raise FileNotFoundError(f"checkpoint directory not found: {path}")
  path = local_cache.local_copy(path)   # remote: read from a local copy (safetensors are mmapped)
  index_path = os.path.join(path, INDEX_FILE)
  files: dict[str, st.SafeFile] = {}

  def open_file(fname):
    if fname not in files:
      fpath = os.path.join(path, fname)
      if not storage.exists(fpath):
        raise FileNotFoundError(f"safetensors file {fpath} not found"
                                + (f" (listed in {index_path})" if storage.exists(index_path)
                                   else ""))
      files[fname] = st.SafeFile(fpath)
    return files[fname]

  where: dict[str, st.SafeFile] = {}
  if storage.exists(index_path):
    with storage.open(index_path, encoding="utf-8") as f:
      try:
        weight_map = json.load(f)
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index_path}: no 'weight_map'")
    for name, fname in weight_map.items():
      # A file of this directory: no absolute path, no '..' (links inside the directory, as
      # in a Hugging Face cache snapshot, are fine).
      if (not isinstance(fname, str) or not fname or os.path.isabs(fname)
          or ".." in fname.replace("\\", "/").split("/")):
        raise CheckpointError(f"{index_path}: weight_map[{name!r}] = {fname!r} is not a file "
                              f"name inside {path}")
      sf = open_file(fname)
      if name not in sf.header:
        raise CheckpointError(f"tensor {name!r} is listed in {index_path} but missing "
                              f"from {sf.path}")
      where[name] = sf
  else:
    names = sorted(n for n in storage.listdir(path) if n.endswith(".safetensors"))
    if not names:
      raise FileNotFoundError(f"no *.safetensors (nor {INDEX_FILE}) in {path}")
    for fname in names:
      sf = open_file(fname)
      for name in sf.keys():
        if name in where:
          raise CheckpointError(f"tensor {name!r} appears in both {where[name].path} "
                                f"and {sf.path}")
        where[name] = sf
  return where


def _check_tensors(cfg: ModelConfig, where: dict[str, st.SafeFile], path: str):
  expected = {}
  for _, template, stacked, transpose, sds in _leaf_specs(cfg):
    shape = _hf_shape(sds.shape, stacked, transpose)
    for name in ([template.format(l=i) for i in range(cfg.num_layers)] if stacked
                 else [template]):
      expected[name] = shape
  for name, shape in expected.items():
    if name not in where:
      raise CheckpointError(f"tensor {name!r} (shape {list(shape)}) is missing from the "
                            f"checkpoint in {path}")
    got = where[name].shape(name)
    if got != shape:
      raise CheckpointError(f"tensor {name!r} in {where[name].path} has shape {list(got)}, "
                            f"expected {list(shape)} for this config")
  for name, sf in where.items():
    if name in expected or any(p.match(name) for p in _IGNORED):
      continue
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue  # some tied checkpoints store the (identical) head too
    raise CheckpointError(f"unexpected tensor {name!r} in {sf.path}: not a parameter of "
                          f"this {cfg.model_type} config (wrong model_type / biases / "
                          f"num_hidden_layers?)")


def _reader(cfg, where, template, stacked, transpose, sds, sharding):
  """Callback for make_array_from_callback: index (slices of our global shape) -> block.

  A block needed by several devices (replication) is read once and kept only until
  its last device has taken it, so host memory holds about one device's share.
  """
  def hf_block(name, idx):
    arr = where[name].get(name)
    if transpose:
      return arr[tuple(reversed(idx))].T
    return arr[idx]

  def key(index):
    return tuple((s.start, s.stop, s.step) for s in index)

  pending = collections.Counter(
      key(idx) for idx in sharding.addressable_devices_indices_map(sds.shape).values())
  cache = {}

  def read(index):
    k = key(index)
    block = cache.pop(k, None)
    if block is None:
      if stacked:
        layers = range(cfg.num_layers)[index[0]]
        block = np.stack([hf_block(template.format(l=i), tuple(index[1:])) for i in layers])
      else:
        block = hf_block(template, tuple(index))
      block = np.ascontiguousarray(block.astype(sds.dtype))
    pending[k] -= 1
    if pending[k] > 0:
      cache[k] = block
    return block
  return read


def check_hf(path: str) -> tuple[ModelConfig, dict]:
  """What load_hf checks, without reading any weights: (config, {"tensors", "files"}).

  The config is supported, every expected tensor is there with its shape and none is
  extra, and each file holds all the bytes its header promises. Raises as load_hf does
  (ConfigError, CheckpointError, SafetensorsError, FileNotFoundError), naming the
  field, tensor or file.
  """
  path = os.fspath(path)
  cfg = ModelConfig.from_hf(path)
  where = _open_checkpoint(path)
  _check_tensors(cfg, where, path)
  files = {sf.path: sf for sf in where.values()}
  for sf in files.values():
    sf.check()
  return cfg, {"tensors": len(where), "files": len(files)}


def load_hf(path: str, mesh=None, rules=None, **overrides):
  """Loads a local HF model dir -> (cfg, params).

  overrides: ModelConfig fields (dtype="bfloat16", param_dtype=..., remat=True, ...).
  With `mesh`, each parameter is created directly in its NamedSharding (per-device
  slices read from the files); otherwise on the default device.
  """
  path = os.fspath(path)
  cfg = ModelConfig.from_hf(path, **overrides)
  where = _open_checkpoint(path)
  _check_tensors(cfg, where, path)
  specs = _leaf_specs(cfg)
  if mesh is not None:
    shardings = jax.tree.leaves(param_shardings(cfg, mesh, rules))
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = [dev] * len(specs)
  leaves = []
  for (_, template, stacked, transpose, sds), sharding in zip(specs, shardings):
    read = _reader(cfg, where, template, stacked, transpose, sds, sharding)
    leaves.append(jax.make_array_from_callback(sds.shape, sharding, read))
  treedef = jax.tree.structure(abstract_params(cfg))
  return cfg, jax.tree.unflatten(treedef, leaves)


# -- saving ---------------------------------------------------------------------

def _host_block(arr, layer=None) -> np.ndarray:
  """arr (or arr[layer]) as one numpy array, gathered shard by shard."""
  if isinstance(arr, np.ndarray):
    return arr if layer is None else arr[layer]
  if not arr.is_fully_addressable:  # multi-host: all processes take part
    from jax.experimental import multihost_utils
    part = arr if layer is None else arr[layer]
    return np.asarray(multihost_utils.process_allgather(part, tiled=True))
  shape = arr.shape if layer is None else arr.shape[1:]
  out = np.empty(shape, arr.dtype)
  for shard in arr.addressable_shards:
    if shard.replica_id != 0:
      continue
    idx = shard.index
    if layer is None:
      out[idx] = np.asarray(shard.data)
    else:
      start, stop, _ = idx[0].indices(arr.shape[0])
      if start <= layer < stop:
        out[idx[1:]] = np.asarray(shard.data[layer - start])
  return out


def save_hf(cfg: ModelConfig, params, out_dir: str, max_shard_bytes: int = 4 << 30) -> None:
  """Writes config.json + safetensors (sharded with an index above max_shard_bytes).

  Works on sharded and multi-host params: each tensor is gathered on its own (one
  layer at a time); only process 0 writes.
  """
  out_dir = os.fspath(out_dir)
  specs = _leaf_specs(cfg)
  flat = jax.tree.leaves(params)
  if jax.tree.structure(params) != jax.tree.structure(abstract_params(cfg)):
    raise CheckpointError("params do not match the config's parameter tree: "
                          f"{jax.tree.structure(params)}")
  entries = []  # (hf name, hf shape, dtype, producer)
  for (path, template, stacked, transpose, sds), arr in zip(specs, flat):
    if tuple(arr.shape) != tuple(sds.shape):
      raise CheckpointError(f"param {'/'.join(path)} has shape {arr.shape}, "
                            f"config expects {sds.shape}")
    shape = _hf_shape(sds.shape, stacked, transpose)
    dtype = np.dtype(arr.dtype)
    layers = range(cfg.num_layers) if stacked else [None]
    for i in layers:
      name = template.format(l=i) if stacked else template

      def produce(arr=arr, i=i, transpose=transpose):
        block = _host_block(arr, i)
        return block.T if transpose else block
      entries.append((name, shape, dtype, produce))

  main = jax.process_index() == 0
  if main:
    storage.makedirs(out_dir)
    with storage.open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(cfg.to_hf_dict(), f, indent=2, sort_keys=True)
  # Group into shards by size.
  shards, cur, size = [], [], 0
  for e in entries:
    nbytes = st.tensor_nbytes(e[1], e[2])
    if cur and size + nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(e)
    size += nbytes
  shards.append(cur)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for fname, shard in zip(names, shards):
    producers = {e[0]: e[3] for e in shard}
    if main:
      with storage.local_dir_for(out_dir) as local:   # remote: a local file, then copied
        st.write(os.path.join(local, fname), [(e[0], e[1], e[2]) for e in shard],
                 lambda n, producers=producers: producers[n]())
    else:  # still take part in the collective gathers
      for e in shard:
        e[3]()
    weight_map.update({e[0]: fname for e in shard})
  if main and len(shards) > 1:
    total = sum(st.tensor_nbytes(e[1], e[2]) for e in entries)
    with storage.open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if main:  # drop stale files of an earlier save into the same directory
    keep = set(names) | ({INDEX_FILE} if len(shards) > 1 else set())
    for fname in storage.listdir(out_dir):
      if fname not in keep and (fname.endswith(".safetensors") or fname == INDEX_FILE):
        storage.remove(os.path.join(out_dir, fname))
