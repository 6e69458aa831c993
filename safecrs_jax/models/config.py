"""ModelConfig: a frozen, hashable description of one decoder, built from HF config.json.

Supported families (field `model_type`):
  llama  — Llama 3.x: GQA, RoPE (default / linear / llama3 scaling), tied or untied
           embeddings, optional attention biases (q, k, v and o).
  qwen2  — Qwen2 / Qwen2.5: biases on q, k, v (not o); full attention only.
  qwen3  — Qwen3: per-head RMSNorm on q and k; `head_dim` independent of
           hidden_size / num_heads.

Both config.json layouts are read: transformers 4 (`rope_theta` + `rope_scaling`) and
transformers 5 (`rope_parameters`). Anything the decoder cannot reproduce exactly
raises ConfigError naming the offending field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from safecrs_jax.infra import storage

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
_DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each decoder block in the backward pass (see decoder.py):
#   none           keep every activation (fastest, most memory)
#   full           keep only the block inputs, recompute the rest
#   dots_no_batch  also keep the outputs of the weight matmuls (projections, MLP);
#                  recompute attention scores, norms and activations
#   offload        like dots_no_batch, but the kept matmul outputs live in host
#                  memory (pinned_host) until the backward pass needs them
REMAT_POLICIES = ("none", "full", "dots_no_batch", "offload")
# Attention kernel of calls without a KV cache (see models/attention.py): auto picks
# splash on TPU, cudnn on GPU (bf16/fp16), xla elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


class ConfigError(ValueError):
  """A config.json (or override) the decoder cannot reproduce exactly."""


def _freeze(value):
  """dicts/lists -> sorted tuples, so the config stays hashable."""
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def _thaw(value):
  """Inverse of _freeze for rope_scaling: tuple of pairs -> dict."""
  if value is None:
    return None
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in value}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the decoder needs; safe as a static argument to jax.jit.

  Change fields with `dataclasses.replace(cfg, dtype="bfloat16")`.
  """
  model_type: str = "llama"
  vocab_size: int = 2048
  hidden_size: int = 256
  intermediate_size: int = 768
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 32
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Sorted ((key, value), ...) of the HF rope scaling dict without rope_theta,
  # e.g. (("factor", 8.0), ..., ("rope_type", "llama3")); None = plain RoPE.
  rope_scaling: tuple | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False       # biases on q, k, v projections
  attention_out_bias: bool = False   # bias on o projection (llama attention_bias=True)
  qk_norm: bool = False              # Qwen3 per-head RMSNorm on q and k
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_id: int | tuple | None = None
  pad_token_id: int | None = None
  # Numerics / execution (not part of HF config.json).
  dtype: str = "float32"             # compute dtype; logits come back in this dtype
  param_dtype: str = "float32"       # storage dtype of parameters (checkpoint dtype ignored)
  # Remat policy by name (REMAT_POLICIES); bools are accepted: False -> "none",
  # True -> "full". Always a string after construction.
  remat: str | bool = "none"
  scan_layers: bool = True           # True: lax.scan over layers; False: unrolled loop
  # Concatenate the q|k|v and gate|up kernels at run time and run one matmul each
  # (faster on CPU / small models). Set False with tensor parallelism, where the
  # concatenation would re-lay out the sharded kernels every step.
  fuse_projections: bool = True
  initializer_range: float = 0.02    # stddev of normal init (HF convention)
  attention: str = "auto"            # ATTENTION_IMPLS: auto | xla | cudnn | splash

  def __post_init__(self):
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat={self.remat!r}; expected a bool or one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      raise ConfigError(f"attention={self.attention!r}; expected one of {ATTENTION_IMPLS}")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(f"model_type={self.model_type!r} is not supported; "
                        f"supported: {SUPPORTED_MODEL_TYPES}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ConfigError(f"{name}={getattr(self, name)!r}; expected one of {_DTYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                        f"num_key_value_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
    rope_type = self.rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported; "
                        f"supported: {SUPPORTED_ROPE_TYPES}")
    scaling = self.rope_scaling_dict
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")}.get(rope_type, ())
    for key in need:
      if key not in scaling:
        raise ConfigError(f"rope_scaling.{key} is required for rope_type={rope_type!r}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError("rope_scaling.partial_rotary_factor != 1 is not supported")

  # -- derived ---------------------------------------------------------------
  @property
  def rope_scaling_dict(self) -> dict:
    return _thaw(self.rope_scaling) or {}

  @property
  def rope_type(self) -> str:
    return self.rope_scaling_dict.get("rope_type", "default")

  @property
  def eos_token_ids(self) -> tuple:
    """eos_token_id as a tuple (HF allows an int or a list)."""
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  # -- HF config.json --------------------------------------------------------
  @classmethod
  def from_hf(cls, path_or_dict: Any, **overrides) -> ModelConfig:
    """Builds a config from a HF model dir, a config.json path or its dict.

    `overrides` set dataclass fields (dtype="bfloat16", remat=True, ...); an unknown
    override raises ConfigError.
    """
    src = "<dict>"
    if isinstance(path_or_dict, (str, os.PathLike)):
      src = os.fspath(path_or_dict)
      if storage.isdir(src):
        src = os.path.join(src, "config.json")
      if not storage.exists(src):
        raise FileNotFoundError(f"config.json not found: {src}")
      with storage.open(src, encoding="utf-8") as f:
        d = json.load(f)
    elif isinstance(path_or_dict, dict):
      d = dict(path_or_dict)
    else:
      raise TypeError(f"from_hf expects a path or a dict, got {type(path_or_dict)}")
    try:
      kw = _fields_from_hf(d)
    except ConfigError as e:
      raise ConfigError(f"{src}: {e}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
      if key not in fields:
        raise ConfigError(f"unknown ModelConfig override {key!r}; fields: {sorted(fields)}")
    kw.update(overrides)
    try:
      return cls(**kw)
    except ConfigError as e:
      raise ConfigError(f"{src}: {e}") from None

  def to_hf_dict(self) -> dict:
    """config.json content that transformers (4.45+ and 5.x) loads as this model."""
    scaling = self.rope_scaling_dict
    rope_parameters = {"rope_theta": self.rope_theta, "rope_type": self.rope_type,
                       **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")}}
    d = {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": ({**scaling, "rope_type": self.rope_type} if scaling else None),
        "rope_parameters": rope_parameters,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
        "pad_token_id": self.pad_token_id,
        "initializer_range": self.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": self.param_dtype,
    }
    if self.model_type == "llama":
      d["attention_bias"] = self.attention_bias
      d["mlp_bias"] = False
    else:
      d["use_sliding_window"] = False
      d["sliding_window"] = None
      d["max_window_layers"] = self.num_layers
      if self.model_type == "qwen3":
        d["attention_bias"] = self.attention_bias
    return d


def _fields_from_hf(d: dict) -> dict:
  """HF config dict -> ModelConfig kwargs; raises ConfigError naming the field."""
  model_type = d.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(f"model_type={model_type!r} is not supported; "
                      f"supported: {SUPPORTED_MODEL_TYPES}")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in d:
      raise ConfigError(f"missing field {key!r}")
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
  if d.get("mlp_bias", False):
    raise ConfigError("mlp_bias=true is not supported")
  if d.get("pretraining_tp", 1) != 1:
    raise ConfigError(f"pretraining_tp={d['pretraining_tp']} is not supported (only 1)")
  if d.get("use_sliding_window", False):
    raise ConfigError("use_sliding_window=true is not supported (full attention only)")
  layer_types = d.get("layer_types") or ()
  if any(t != "full_attention" for t in layer_types):
    raise ConfigError(f"layer_types={list(layer_types)} is not supported "
                      "(only 'full_attention')")

  # RoPE: transformers 5 `rope_parameters`, else legacy `rope_theta` + `rope_scaling`.
  rope = dict(d.get("rope_parameters") or {})
  legacy = d.get("rope_scaling")
  if legacy:
    rope = {**dict(legacy), **rope}
  theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
  if "type" in rope and "rope_type" not in rope:
    rope["rope_type"] = rope["type"]
  rope.pop("type", None)
  rope_type = rope.get("rope_type", "default")
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported; "
                      f"supported: {SUPPORTED_ROPE_TYPES}")
  if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ConfigError("partial_rotary_factor != 1 is not supported")
  rope_scaling = None if rope_type == "default" else _freeze(rope)

  num_heads = d["num_attention_heads"]
  head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
  bias = bool(d.get("attention_bias", False))
  eos = d.get("eos_token_id")
  return dict(
      model_type=model_type,
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=d.get("num_key_value_heads") or num_heads,
      head_dim=head_dim,
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta),
      rope_scaling=rope_scaling,
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      attention_bias=True if model_type == "qwen2" else bias,
      attention_out_bias=bias if model_type in ("llama", "qwen3") else False,
      qk_norm=model_type == "qwen3",
      max_position_embeddings=d.get("max_position_embeddings", 2048),
      bos_token_id=d.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=d.get("pad_token_id"),
      initializer_range=float(d.get("initializer_range", 0.02)),
  )
