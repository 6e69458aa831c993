"""The decoder, its parameters and its KV cache.

Shape legend: B batch, T new tokens, S key slots, L layers, D hidden, K kv heads,
H head_dim, V vocab.

Parameters are a plain pytree (no flax boxes). The L decoder blocks are stacked on
a leading layer axis under params["layers"] (scan layout); `cfg.scan_layers` only
chooses whether XLA sees a loop (True, compact for deep models) or L unrolled copies
(False, faster for small models on CPU). Both use the same parameters.

KV cache (a dict pytree, see init_cache):
  k, v   [L,B,S,K,H] cfg.dtype   keys / values, slot s of row b
  mask   [B,S] bool              slot holds a real (non-pad) token
  index  [] int32                next slot to write (shared by all rows)
forward_cached writes its T tokens at slots [index, index+T) with
lax.dynamic_update_slice, so a decode step has static shapes and runs inside
lax.while_loop. The caller keeps index + T <= S (XLA clamps the write otherwise).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from safecrs_jax.infra import sharding as shd
from safecrs_jax.models.adapters import COLLECTION, AdapterRun
from safecrs_jax.models.config import ConfigError, ModelConfig
from safecrs_jax.models.layers import Block, DenseParams, RMSNorm, dense, dtype_of, rope_tables


class Decoder(nn.Module):
  """Token ids -> logits. Llama 3.x / Qwen2 / Qwen3 depending on cfg.

  return_hidden: return the final (normed) hidden states [B,T,D] instead of logits
    (the output head is left to models.head, chunked over tokens).
  last_only: apply the output head to the last position only (logits [B,1,V]).
  """
  cfg: ModelConfig
  mesh: Any = None
  rules: Any = None
  return_hidden: bool = False
  last_only: bool = False
  adapters: Any = None   # adapters.AdapterRun: apply the "lora" collection (None: off)

  @nn.compact
  def __call__(self, input_ids, positions, mask, kv=None):
    """input_ids [B,T]; positions [B,T]; mask [B,1,1,T,S] bool; kv see Attention.

    Returns (logits [B,T,V] cfg.dtype, kv'); [B,1,V] with last_only; hidden
    [B,T,D] cfg.dtype with return_hidden.
    """
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    embed = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=cfg.initializer_range), ("vocab", "embed")),
        name="embed_tokens")
    x = embed(input_ids)                                              # [B,T,D]
    x = shd.constrain(x, ("act_batch", "act_length", "act_embed"), self.mesh, self.rules)
    cos, sin = rope_tables(cfg, positions)                            # [B,T,1,H]

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, prevent_cse=not cfg.scan_layers,
                       policy=remat_policy(cfg.remat, self.mesh))
    stack = nn.scan(
        block, variable_axes={"params": 0, COLLECTION: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
        unroll=1 if cfg.scan_layers else cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
    (x, kv), _ = stack(cfg, self.mesh, self.rules, self.adapters, name="layers")(
        (x, kv), cos, sin, mask)

    x = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="norm")(x)
    if self.return_hidden:
      return x, kv
    if self.last_only:
      x = x[:, -1:]                                                   # [B,1,D]
    if cfg.tie_word_embeddings:
      emb = embed.embedding.astype(dt)                                # [V,D]
      logits = jnp.dot(x.reshape(-1, cfg.hidden_size), emb.T)          # [B*T,V]
      logits = logits.reshape(*x.shape[:-1], cfg.vocab_size)          # [B,T,V]
    else:
      head = DenseParams(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg,
                         False, self.adapters, name="lm_head")()
      (logits,) = dense(x, [head], cfg, False)                        # [B,T,V]
    logits = shd.constrain(logits.astype(dt), ("act_batch", "act_length", "act_vocab"),
                           self.mesh, self.rules)
    return logits, kv


def remat_policy(name: str, mesh=None):
  """jax.checkpoint policy of a ModelConfig.remat name ("full" -> None: save nothing).

  "offload" needs a backend with a pinned_host memory (TPU, GPU, and XLA:CPU in
  this jax); the devices of `mesh` (default: jax.devices()) are checked and a
  ConfigError names the alternatives otherwise.
  """
  policies = jax.checkpoint_policies
  if name == "full":
    return None
  if name == "dots_no_batch":
    return policies.dots_with_no_batch_dims_saveable
  if name == "offload":
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    memories = getattr(device, "addressable_memories", None)
    kinds = {m.kind for m in memories()} if memories is not None else {"pinned_host"}
    if "pinned_host" not in kinds:
      raise ConfigError(f"remat='offload' needs host offload (a 'pinned_host' memory); "
                        f"{device.platform} devices have {sorted(kinds)}. "
                        "Use remat='dots_no_batch' or 'full'.")
    return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ConfigError(f"unknown remat policy {name!r}")


# -- parameters -----------------------------------------------------------------

def _boxed_init(cfg: ModelConfig, rng):
  ids = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1, 1, 1), bool)
  # The parameters do not depend on the attention kernel; xla traces on any device.
  cfg = dataclasses.replace(cfg, attention="xla")
  return Decoder(cfg).init(rng, ids, ids, mask)["params"]


def _init_fn(cfg: ModelConfig, rng):
  return nn.unbox(_boxed_init(cfg, rng))


@functools.lru_cache(maxsize=32)
def _abstract_boxed(cfg: ModelConfig):
  return jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0))


def abstract_params(cfg: ModelConfig):
  """Pytree of jax.ShapeDtypeStruct, same structure as init_params; no compute."""
  return nn.unbox(_abstract_boxed(cfg))


def param_logical_axes(cfg: ModelConfig):
  """Pytree (structure of params) of tuples of logical axis names per dimension."""
  boxed = _abstract_boxed(cfg)
  return jax.tree.map(lambda b: tuple(b.names), boxed,
                      is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))


def param_shardings(cfg: ModelConfig, mesh, rules=None):
  """Pytree of NamedSharding for the params on `mesh` (odd dims replicated)."""
  return shd.logical_to_sharding(param_logical_axes(cfg), mesh, rules,
                                 shapes=abstract_params(cfg))


def init_params(cfg: ModelConfig, rng, mesh=None, rules=None):
  """Random parameters (normal(initializer_range), norms = 1), a plain pytree.

  With a mesh: initialised directly into their shardings (abstract shapes via
  eval_shape, then jit with out_shardings); no full copy on one device.
  """
  fn = functools.partial(_init_fn, cfg)
  if mesh is None:
    return jax.jit(fn)(rng)
  return jax.jit(fn, out_shardings=param_shardings(cfg, mesh, rules))(rng)


def count_params(cfg: ModelConfig) -> int:
  return sum(x.size for x in jax.tree.leaves(abstract_params(cfg)))


# -- forward ----------------------------------------------------------------------

def positions_from_mask(attention_mask):
  """[B,T] {0,1} -> [B,T] int32 positions cumsum(mask)-1, clipped at 0."""
  m = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def _full_mask(attention_mask):
  """[B,T] {0,1} -> [B,1,1,T,S=T] bool: causal, pad keys masked."""
  t = attention_mask.shape[1]
  valid = attention_mask.astype(bool)                                 # [B,T]
  causal = jnp.tril(jnp.ones((t, t), bool))                           # [T,S=T]
  return (causal[None] & valid[:, None, :])[:, None, None]            # [B,1,1,T,S]


def _apply(cfg, params, input_ids, attention_mask, mesh, rules, return_hidden, lora,
           lora_scale, lora_dropout, dropout_rng):
  """Decoder over a (left-)padded batch, with optional LoRA adapters (see forward)."""
  variables, rngs, run = {"params": params}, {}, None
  if lora is not None:
    variables[COLLECTION] = lora
    run = AdapterRun(float(lora_scale), float(lora_dropout) if dropout_rng is not None
                     else 0.0)
    if return_hidden and "lm_head" in lora:
      raise ValueError("an lm_head adapter is not applied by forward_hidden; merge it "
                       "(lora.merge) or leave lm_head out of the LoRA targets")
    if run.dropout > 0:
      rngs["dropout"] = dropout_rng
  out, _ = Decoder(cfg, mesh, rules, return_hidden=return_hidden, adapters=run).apply(
      variables, input_ids, positions_from_mask(attention_mask),
      _full_mask(attention_mask), rngs=rngs)
  return out


_STATIC = ("mesh", "rules", "lora_scale", "lora_dropout")


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC)
def forward(cfg: ModelConfig, params, input_ids, attention_mask, *, mesh=None, rules=None,
            lora=None, lora_scale=1.0, lora_dropout=0.0, dropout_rng=None):
  """Logits of a (left-)padded batch.

  input_ids [B,T] int32; attention_mask [B,T] {0,1} -> logits [B,T,V] in cfg.dtype
  (cast to float32 before log_softmax). Attention is causal and skips pad keys.
  `mesh`/`rules` (optional) add sharding constraints on activations.

  LoRA (optional): `lora` is the adapter tree of safecrs_jax.models.lora (lora_a [..,I,r],
  lora_b [..,r,O] per target module); each adapted projection computes
  x W + lora_scale * (dropout(x) A) B (models/adapters.py). Dropout with rate
  `lora_dropout` (static) is applied only when `dropout_rng` (a key) is given; without
  it the logits equal forward(lora.merge(params, lora, lora_scale)).
  """
  return _apply(cfg, params, input_ids, attention_mask, mesh, rules, False, lora,
                lora_scale, lora_dropout, dropout_rng)


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC)
def forward_hidden(cfg: ModelConfig, params, input_ids, attention_mask, *, mesh=None,
                   rules=None, lora=None, lora_scale=1.0, lora_dropout=0.0,
                   dropout_rng=None):
  """Final (normed) hidden states of a (left-)padded batch; the output head is not run.

  input_ids [B,T] int32; attention_mask [B,T] {0,1} -> hidden [B,T,D] in cfg.dtype.
  hidden @ head.head_weight(cfg, params) equals forward()'s logits; use
  head.chunked_token_logprobs / chunked_nll_sum so [B,T,V] is never materialised.
  LoRA arguments as in forward (an lm_head adapter is refused: the head runs outside).
  """
  return _apply(cfg, params, input_ids, attention_mask, mesh, rules, True, lora,
                lora_scale, lora_dropout, dropout_rng)


# -- KV cache ------------------------------------------------------------------

def cache_logical_axes(cfg: ModelConfig) -> dict:
  del cfg
  kv = ("layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim")
  return {"k": kv, "v": kv, "mask": ("cache_batch", "cache_length"), "index": ()}


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, mesh=None, rules=None):
  """Empty cache with slots [0, max_len): see the module docstring for the layout."""
  shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  dt = dtype_of(cfg.dtype)

  def make():
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
            "mask": jnp.zeros((batch_size, max_len), bool),
            "index": jnp.zeros((), jnp.int32)}
  if mesh is None:
    return make()
  shapes = jax.eval_shape(make)
  out = shd.logical_to_sharding(cache_logical_axes(cfg), mesh, rules, shapes=shapes)
  return jax.jit(make, out_shardings=out)()


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mesh", "rules", "last_only"))
def forward_cached(cfg: ModelConfig, params, input_ids, attention_mask, cache, *,
                   mesh=None, rules=None, last_only=False):
  """Runs T new tokens against the cache; returns (logits [B,T,V], cache').

  Prefill: ids [B,P] (left-padded), mask [B,P], empty cache. Decode: ids [B,1],
  mask ones [B,1]. Positions continue from each row's count of valid cached tokens;
  each new token attends to valid earlier slots and itself. The logits equal
  forward() on the concatenated sequence. last_only=True (static) runs the output
  head on the last position only and returns logits [B,1,V] (what a prefill needs).
  """
  b, t = input_ids.shape
  index = cache["index"]
  s = cache["mask"].shape[1]
  new = attention_mask.astype(bool)                                   # [B,T]
  prev = jnp.sum(cache["mask"], axis=1, dtype=jnp.int32)              # [B]
  positions = jnp.maximum(
      prev[:, None] + jnp.cumsum(new.astype(jnp.int32), axis=1) - 1, 0)  # [B,T]
  slot_mask = jax.lax.dynamic_update_slice(cache["mask"], new, (jnp.int32(0), index))
  q_slot = index + jnp.arange(t, dtype=jnp.int32)                     # [T]
  causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot[:, None]  # [T,S]
  mask = (causal[None] & slot_mask[:, None, :])[:, None, None]        # [B,1,1,T,S]
  kv = (cache["k"], cache["v"], jnp.int32(0), index)
  logits, (k, v, _, _) = Decoder(cfg, mesh, rules, last_only=last_only).apply(
      {"params": params}, input_ids, positions, mask, kv)
  return logits, {"k": k, "v": v, "mask": slot_mask, "index": index + t}
