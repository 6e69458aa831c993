"""Decode-only path of the decoder: weights laid out once per rollout, per-layer KV caches.

Shape legend: B prompts, N = B * R rows (R repeats of each prompt), P prompt slots,
S cache slots, L layers, D hidden, K kv heads, Q = heads // K query heads per kv head,
H head_dim, F intermediate, V vocab.

Why a second path: decoder.Decoder serves training and prefill. Its cache is one stacked
[L,B,S,K,H] array and its weights are stacked [L, ...], so inside a decode loop every
token pays, per layer, a [B,S,K,H] -> [B,K,S,H] transposed copy of both cache slices and
copies of the stacked weights' layer slices — most of a small model's decode step on
CPU. Here the work is done once per rollout, outside the loop:

  weights = layout(cfg, params, fuse)            # compute dtype, per layer, fused q|k|v, gate|up
  logits, cache = prefill(cfg, weights, ids, mask)   # the B unique prompts, P slots
  cache = from_prefill(cache, S, R)              # per-layer keys [N,K,H,S], values
                                                 # [N,K,S,H], repeated R times

and each token is one `step` (the cache write is an in-place dynamic_update_slice of the
loop carry). Keys are stored transposed, [N,K,H,S]: the scores matmul q [Q,H] @ k [H,S]
then reads them in stored order. With [N,K,S,H] keys XLA:CPU ran it as a transposed
operand at a quarter of the speed of the values matmul of the same bytes (2.1 vs
0.5 ms of a ~6 ms step, tiny model, batch 32, 2 cores). The arithmetic is the
decoder's op for op: RMSNorm statistics in float32, layers.rope_tables /
apply_rope, layers.attend, logits in cfg.dtype.

On CPU the prefill writes the cache in this layout directly (no stacked [L,B,P,K,H] cache
to transpose afterwards) and runs the last layer's query, attention and MLP on the
last position only; with the tiny model, batch 32 x 128 prompt tokens, it went from
0.235 s to 0.193 s (best of 8, quiet 2 cores) and the whole 128-token call from 0.80 s
to 0.71 s. Same greedy tokens; log-probs within 1e-5.

Weight placement (`weight_shardings`): "replicated" (every device holds the whole model:
no weight collective at all while decoding) or "tensor" (the logical rules with their
fsdp / data axes dropped: weights stay split over `tensor` only, and the decode step
communicates activations, never weights). `choose_placement` picks by device memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from safecrs_jax.infra import chips
from safecrs_jax.infra import sharding as shd
from safecrs_jax.models.attention import platform_of
from safecrs_jax.models.config import ModelConfig
from safecrs_jax.models.decoder import abstract_params, param_logical_axes
from safecrs_jax.models.layers import apply_rope, attend, dtype_of, rope_tables

PLACEMENTS = ("replicated", "tensor")
# "auto" replicates when the compute-dtype weights take at most this share of one
# device's memory (the rest holds the training state, KV cache and activations).
REPLICATE_SHARE = 0.25


# -- placement --------------------------------------------------------------------

def weight_bytes(cfg: ModelConfig) -> int:
  """Bytes of the parameters in the compute dtype (what the decode loop reads)."""
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))
  return n * dtype_of(cfg.dtype).itemsize


def choose_placement(cfg: ModelConfig, mesh, share: float = REPLICATE_SHARE) -> str:
  """"replicated" if the weights fit in `share` of a device's memory (or it is unknown)."""
  if mesh is None:
    return "replicated"
  limit = chips.device_memory(mesh.devices.flat[0])    # also for compile-only TPU devices
  if not limit or weight_bytes(cfg) <= share * limit:
    return "replicated"
  return "tensor"


def _tensor_only_rules(cfg: ModelConfig, rules):
  """rules with the batch axes (data, fsdp) removed from every parameter name's entry."""
  rules = shd.DEFAULT_RULES if rules is None else rules
  names = set(jax.tree.leaves(param_logical_axes(cfg)))               # tuples flatten to names
  out = []
  for name, axes in rules:
    if name in names:
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      axes = tuple(a for a in axes if a not in shd.BATCH_AXES) or None
    out.append((name, axes))
  return tuple(out)


def weight_shardings(cfg: ModelConfig, mesh, rules=None, placement="replicated"):
  """Pytree (structure of params) of NamedSharding for the decode weights."""
  if placement not in PLACEMENTS:
    raise ValueError(f"placement={placement!r}; expected one of {PLACEMENTS}")
  if placement == "replicated":
    return jax.tree.map(lambda _: shd.replicated(mesh), abstract_params(cfg))
  return shd.logical_to_sharding(param_logical_axes(cfg), mesh,
                                 _tensor_only_rules(cfg, rules), shapes=abstract_params(cfg))


def place(cfg: ModelConfig, params, mesh=None, rules=None, placement="replicated"):
  """params cast to cfg.dtype, constrained to the decode placement (inside jit)."""
  dt = dtype_of(cfg.dtype)
  params = jax.tree.map(lambda x: x.astype(dt), params)
  if mesh is None:
    return params
  return jax.lax.with_sharding_constraint(
      params, weight_shardings(cfg, mesh, rules, placement))


# -- weights and cache --------------------------------------------------------------

def _fused(parts, fuse):
  """[a, b, ...] -> [concat(parts, -1)] when fuse (one wider matmul), else unchanged."""
  return [jnp.concatenate(parts, axis=-1)] if fuse and len(parts) > 1 else list(parts)


def layout(cfg: ModelConfig, params, fuse: bool):
  """Standard params (already cast / placed) -> per-layer decode weights.

  fuse: concatenate q|k|v and gate|up kernels (and biases); only with tensor size 1,
  where it does not re-lay out a sharded dimension.
  Returns {"embed" [V,D], "head" [D,V], "norm" [D], "layers": [per-layer dicts]}.
  """
  lay = params["layers"]
  attn, mlp = lay["self_attn"], lay["mlp"]
  qkv = ("q_proj", "k_proj", "v_proj")
  layers = []
  for i in range(cfg.num_layers):
    at = lambda tree, key, i=i: tree[key][i]                            # noqa: E731
    w = {"ln1": at(lay["input_layernorm"], "scale"),
         "ln2": at(lay["post_attention_layernorm"], "scale"),
         "qkv": _fused([at(attn[n], "kernel") for n in qkv], fuse),
         "o": at(attn["o_proj"], "kernel"),
         "gate_up": _fused([at(mlp[n], "kernel") for n in ("gate_proj", "up_proj")], fuse),
         "down": at(mlp["down_proj"], "kernel")}
    if cfg.attention_bias:
      w["qkv_bias"] = _fused([at(attn[n], "bias") for n in qkv], fuse)
    if cfg.attention_out_bias:
      w["o_bias"] = at(attn["o_proj"], "bias")
    if cfg.qk_norm:
      w["q_norm"] = at(attn["q_norm"], "scale")
      w["k_norm"] = at(attn["k_norm"], "scale")
    layers.append(w)
  embed = params["embed_tokens"]["embedding"]                           # [V,D]
  head = embed.T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
  return {"embed": embed, "head": head, "norm": params["norm"]["scale"], "layers": layers}


def from_decoder_cache(cfg: ModelConfig, cache):
  """A decoder.init_cache-layout cache (k, v [L,B,P,K,H]) -> the prefill layout below."""
  return {"k": tuple(cache["k"][i].transpose(0, 2, 3, 1) for i in range(cfg.num_layers)),
          "v": tuple(cache["v"][i].transpose(0, 2, 1, 3) for i in range(cfg.num_layers)),
          "mask": cache["mask"], "index": cache["index"]}


def from_prefill(cache, max_len: int, repeats: int, mesh=None, rules=None):
  """The prefill's cache of B rows and P slots -> the decode cache of N = B * repeats rows.

  cache: as `prefill` (or `from_decoder_cache`) returns it: per-layer keys [B,K,H,P],
  values [B,K,P,H], mask [B,P], index = P. Each row is repeated `repeats` times
  (consecutive rows); slots [P, max_len) start empty.
  """
  rep = lambda x: jnp.repeat(x, repeats, axis=0)                      # noqa: E731
  dec = {"k": tuple(map(rep, cache["k"])), "v": tuple(map(rep, cache["v"])),
         "mask": rep(cache["mask"]), "index": cache["index"]}
  return grow(dec, max_len, mesh, rules)


def grow(cache, max_len: int, mesh=None, rules=None):
  """A decode cache of S slots -> the same cache with max_len >= S slots (new ones empty).

  The decode loop runs in segments whose caches hold only the slots used so far
  (rollout.py), so attention reads S slots with S the segment's window, not P + T.
  """
  pad = max_len - cache["mask"].shape[1]
  if pad < 0:
    raise ValueError(f"grow: cache has {cache['mask'].shape[1]} slots > max_len={max_len}")
  kv_names = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")     # values
  k_names = ("cache_batch", "cache_kv_heads", "head_dim", "cache_length")      # keys

  def per_layer(x, names):
    axis = names.index("cache_length")
    if pad:
      x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(4)])
    return shd.constrain(x, names, mesh, rules)

  mask = jnp.pad(cache["mask"], ((0, 0), (0, pad)))
  return {"k": tuple(per_layer(x, k_names) for x in cache["k"]),
          "v": tuple(per_layer(x, kv_names) for x in cache["v"]),
          "mask": shd.constrain(mask, ("cache_batch", "cache_length"), mesh, rules),
          "index": cache["index"]}


# -- the prompt -----------------------------------------------------------------------

def _prompt_attention(cfg, w, x, cos, sin, mask, last_only, mesh, rules):
  """x [B,P,D] normed -> (out [B,P',D], keys [B,K,H,P], values [B,K,P,H]).

  P' = 1 with last_only (only the last position's query is attended: what the last
  layer of a prefill needs), else P. mask [B,1,1,P,P].
  """
  b = x.shape[0]
  nh, kh, hd, g = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_groups
  dt = dtype_of(cfg.dtype)
  q, k, v = _heads(cfg, w, x)                                         # [B,P,heads|K,H]
  keys = apply_rope(k, cos, sin).transpose(0, 2, 3, 1)                # [B,K,H,P]
  values = v.transpose(0, 2, 1, 3)                                    # [B,K,P,H]
  if last_only:
    q, cos, sin, mask = q[:, -1:], cos[:, -1:], sin[:, -1:], mask[:, :, :, -1:]
  tq = q.shape[1]
  q = apply_rope(q, cos, sin).reshape(b, tq, kh, g, hd).transpose(0, 2, 3, 1, 4)
  q = q * jnp.asarray(hd ** -0.5, dt)                                 # [B,K,Q,P',H]
  out = attend(q, keys, values, mask, dt, keys_transposed=True)      # [B,K,Q,P',H]
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, tq, nh * hd)
  out = shd.constrain(out, ("act_batch", "act_length", "act_heads"), mesh, rules)
  (y,) = _project(out, [w["o"]], [w["o_bias"]] if "o_bias" in w else None, (cfg.hidden_size,))
  return y, keys, values


def prefill(cfg: ModelConfig, weights, ids, mask, mesh=None, rules=None):
  """Left-padded prompts ids / mask [B,P] -> (logits [B,V] of the last position, cache).

  The cache holds P slots in the decode layout (per-layer keys [B,K,H,P], values
  [B,K,P,H], mask [B,P] bool, index P); `from_prefill` repeats and grows it. The
  arithmetic is decoder.forward_cached's on an empty cache, except that the last
  layer runs its query, attention and MLP on the last position only (its keys and
  values still cover every position): a prefill needs only the last logits, and the
  last layer's other positions are a 1/L share of the prefill's work. Left padding
  means every row's last position is a real token.

  Used on CPU (rollout.py). Elsewhere the rollout prefills with the decoder's scanned
  forward_cached: its layers unrolled, this function's XLA program needs more memory
  for long prompts (Llama-3.1-8B evaluation generation, 7168-token prompts, v5p-16:
  32.0 GiB per chip against 27.2).
  """
  dt = dtype_of(cfg.dtype)
  eps = cfg.rms_norm_eps
  p = ids.shape[1]
  valid = mask.astype(bool)                                           # [B,P]
  positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
  causal = jnp.tril(jnp.ones((p, p), bool))                           # [P,P]
  att_mask = (causal[None] & valid[:, None, :])[:, None, None]        # [B,1,1,P,P]
  cos, sin = rope_tables(cfg, positions)                              # [B,P,1,H]
  x = jnp.take(weights["embed"], ids, axis=0)                         # [B,P,D]
  x = shd.constrain(x, ("act_batch", "act_length", "act_embed"), mesh, rules)
  ks, vs = [], []
  for i, w in enumerate(weights["layers"]):
    last = i == len(weights["layers"]) - 1
    a, keys, values = _prompt_attention(cfg, w, _rms_norm(x, w["ln1"], eps, dt), cos, sin,
                                        att_mask, last, mesh, rules)
    ks.append(keys.astype(dt))
    vs.append(values.astype(dt))
    x = _mlp_residual(cfg, w, (x[:, -1:] if last else x) + a, ("act_batch", "act_length"),
                      mesh, rules)
  x = _rms_norm(x[:, -1], weights["norm"], eps, dt)                    # [B,D]
  logits = shd.constrain(jnp.dot(x, weights["head"]), ("act_batch", "act_vocab"), mesh, rules)
  return logits, {"k": tuple(ks), "v": tuple(vs), "mask": valid, "index": jnp.int32(p)}


# -- one token ----------------------------------------------------------------------

def _rms_norm(x, scale, eps, dt):
  """As layers.RMSNorm: statistics in float32, scale and result in dt."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return scale * y.astype(dt)


def _project(x, kernels, biases, sizes):
  """x [N,in] @ kernels (fused or not) + biases -> one [N, size] array per size."""
  ys = [jnp.dot(x, k) for k in kernels]
  if biases is not None:
    ys = [y + b for y, b in zip(ys, biases)]
  if len(ys) == 1 and len(sizes) > 1:
    ys = jnp.split(ys[0], np.cumsum(sizes)[:-1].tolist(), axis=-1)
  return ys


def _heads(cfg, w, x):
  """x [...,D] normed -> q [...,heads,H], k and v [...,K,H] (q / k RMS-normed with qk_norm)."""
  nh, kh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q, k, v = _project(x, w["qkv"], w.get("qkv_bias"), (nh * hd, kh * hd, kh * hd))
  lead = x.shape[:-1]
  q, k, v = q.reshape(*lead, nh, hd), k.reshape(*lead, kh, hd), v.reshape(*lead, kh, hd)
  if cfg.qk_norm:
    dt = dtype_of(cfg.dtype)
    q = _rms_norm(q, w["q_norm"], cfg.rms_norm_eps, dt)
    k = _rms_norm(k, w["k_norm"], cfg.rms_norm_eps, dt)
  return q, k, v


def _mlp_residual(cfg, w, x, names, mesh, rules):
  """x + SwiGLU(RMSNorm(x)) for one layer; names: x's logical axes before the last."""
  dt, f = dtype_of(cfg.dtype), cfg.intermediate_size
  gate, up = _project(_rms_norm(x, w["ln2"], cfg.rms_norm_eps, dt), w["gate_up"], None, (f, f))
  hmid = shd.constrain(jax.nn.silu(gate) * up, names + ("act_mlp",), mesh, rules)
  (down,) = _project(hmid, [w["down"]], None, (cfg.hidden_size,))
  return shd.constrain(x + down, names + ("act_embed",), mesh, rules)


def _attention(cfg, w, x, cos, sin, k_cache, v_cache, mask, index, mesh, rules):
  """x [N,D] normed -> (out [N,D], k_cache', v_cache'); k_cache [N,K,H,S], v_cache [N,K,S,H]."""
  n_rows = x.shape[0]
  nh, kh, hd, g = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_groups
  dt = dtype_of(cfg.dtype)
  q, k, v = _heads(cfg, w, x)                                         # [N,heads|K,H]
  q = q[:, None]                                                      # [N,1,heads,H]
  k = k[:, None]                                                      # [N,1,K,H]
  v = v[:, :, None]                                                   # [N,K,1,H]
  q = apply_rope(q, cos, sin)
  k = apply_rope(k, cos, sin).reshape(n_rows, kh, hd, 1)              # [N,K,H,1]
  zero = jnp.zeros((), jnp.int32)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype),
                                         (zero, zero, zero, index))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype),
                                         (zero, zero, index, zero))
  q = q.reshape(n_rows, kh, g, 1, hd) * jnp.asarray(hd ** -0.5, dt)   # [N,K,Q,1,H]
  out = attend(q, k_cache.astype(dt), v_cache.astype(dt), mask, dt, keys_transposed=True,
                scores_by_sum=platform_of(mesh) == "cpu")             # [N,K,Q,1,H]
  out = shd.constrain(out.reshape(n_rows, nh * hd), ("act_batch", "act_heads"), mesh, rules)
  (y,) = _project(out, [w["o"]], [w["o_bias"]] if "o_bias" in w else None, (cfg.hidden_size,))
  return y, k_cache, v_cache


def step(cfg: ModelConfig, weights, tok, pos, cache, mesh=None, rules=None):
  """One token per row: tok [N] int32 at positions pos [N] -> (logits [N,V] cfg.dtype, cache').

  The token is written at slot cache["index"] of every row and attends every valid
  slot up to it (equal to decoder.forward_cached on a [N,1] input).
  """
  dt = dtype_of(cfg.dtype)
  eps = cfg.rms_norm_eps
  index = cache["index"]
  slot_mask = jax.lax.dynamic_update_slice(
      cache["mask"], jnp.ones((tok.shape[0], 1), bool), (jnp.int32(0), index))  # [N,S]
  mask = slot_mask[:, None, None, None, :]                            # [N,1,1,1,S]
  cos, sin = rope_tables(cfg, pos[:, None])                           # [N,1,1,H]
  x = jnp.take(weights["embed"], tok, axis=0)                         # [N,D]
  x = shd.constrain(x, ("act_batch", "act_embed"), mesh, rules)
  ks, vs = [], []
  for w, k_cache, v_cache in zip(weights["layers"], cache["k"], cache["v"]):
    a, k_cache, v_cache = _attention(cfg, w, _rms_norm(x, w["ln1"], eps, dt), cos, sin,
                                     k_cache, v_cache, mask, index, mesh, rules)
    ks.append(k_cache)
    vs.append(v_cache)
    x = _mlp_residual(cfg, w, x + a, ("act_batch",), mesh, rules)
  x = _rms_norm(x, weights["norm"], eps, dt)
  logits = shd.constrain(jnp.dot(x, weights["head"]), ("act_batch", "act_vocab"), mesh, rules)
  return logits, {"k": tuple(ks), "v": tuple(vs), "mask": slot_mask, "index": index + 1}
