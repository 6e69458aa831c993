"""The decoder (Llama 3.x, Qwen2/2.5, Qwen3) in flax.linen, its KV cache and HF I/O.

  cfg = ModelConfig.from_hf(path_or_dict, **overrides)
  cfg, params = load_hf(path, mesh=None, rules=None, **overrides)
  save_hf(cfg, params, out_dir)
  params = init_params(cfg, rng, mesh=None, rules=None)
  logits = forward(cfg, params, input_ids, attention_mask)          # [B,T,V]
  cache = init_cache(cfg, batch_size, max_len)
  logits, cache = forward_cached(cfg, params, input_ids, attention_mask, cache)
"""
from safecrs_jax.models.config import ConfigError, ModelConfig
from safecrs_jax.models.decoder import (
    Decoder,
    abstract_params,
    cache_logical_axes,
    count_params,
    forward,
    forward_cached,
    init_cache,
    init_params,
    param_logical_axes,
    param_shardings,
    positions_from_mask,
)
from safecrs_jax.models.hf_io import CheckpointError, hf_tensor_names, load_hf, save_hf
from safecrs_jax.models.presets import PRESETS

__all__ = [
    "CheckpointError", "ConfigError", "Decoder", "ModelConfig", "PRESETS", "abstract_params",
    "cache_logical_axes", "count_params", "forward", "forward_cached", "init_cache",
    "hf_tensor_names", "init_params", "load_hf", "param_logical_axes", "param_shardings",
    "positions_from_mask", "save_hf",
]
