"""The decoder (Llama 3.x, Qwen2/2.5, Qwen3) in flax.linen, its KV cache and HF I/O.

  cfg = ModelConfig.from_hf(path_or_dict, **overrides)
  cfg, params = load_hf(path, mesh=None, rules=None, **overrides)
  save_hf(cfg, params, out_dir)
  cfg, info = check_hf(path)          # what load_hf checks, no weights read
  params = init_params(cfg, rng, mesh=None, rules=None)
  logits = forward(cfg, params, input_ids, attention_mask)          # [B,T,V]
  hidden = forward_hidden(cfg, params, input_ids, attention_mask)   # [B,T,D]
  logp = chunked_token_logprobs(hidden, head_weight(cfg, params), targets)  # [B,T]
  forward(..., lora=adapters, lora_scale=s, lora_dropout=p, dropout_rng=key)  # LoRA
  cache = init_cache(cfg, batch_size, max_len)
  logits, cache = forward_cached(cfg, params, input_ids, attention_mask, cache)
  (last_only=True: logits [B,1,V] of the last position, for prefill)
"""
from safecrs_jax.models.config import ConfigError, ModelConfig
from safecrs_jax.models.decoder import (
    Decoder,
    abstract_params,
    cache_logical_axes,
    count_params,
    forward,
    forward_cached,
    forward_hidden,
    init_cache,
    init_params,
    param_logical_axes,
    param_shardings,
    positions_from_mask,
)
from safecrs_jax.models.head import chunked_nll_sum, chunked_token_logprobs, head_weight
from safecrs_jax.models.hf_io import CheckpointError, check_hf, load_hf, save_hf
from safecrs_jax.models.presets import PRESETS

__all__ = [
    "CheckpointError", "ConfigError", "Decoder", "ModelConfig", "PRESETS", "abstract_params",
    "cache_logical_axes", "check_hf", "chunked_nll_sum", "chunked_token_logprobs",
    "count_params", "forward", "forward_cached", "forward_hidden", "head_weight", "init_cache",
    "init_params", "load_hf", "param_logical_axes", "param_shardings",
    "positions_from_mask", "save_hf",
]
