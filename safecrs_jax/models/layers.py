"""Building blocks of the decoder: RMSNorm, RoPE, attention, MLP, one block.

Shape legend:
  B batch, T query length, S key length (T, or cache slots), L layers,
  D hidden_size, N query heads, K kv heads, Q = N // K query heads per kv head, H head_dim,
  F intermediate_size, V vocab.
Parameter names follow the HF checkpoint (q_proj, gate_proj, input_layernorm ...);
kernels are [in, out] (HF stores [out, in]).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import adapters as adapters_lib
from safecrs_jax.models import attention as attention_lib
from safecrs_jax.models.config import ModelConfig

Array = jax.Array
# Tests only: run the splash kernel in Pallas interpret mode (any device, slow).
SPLASH_INTERPRET = False


def dtype_of(name: str):
  return jnp.dtype(name)


# -- RoPE -----------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """[H/2] inverse frequencies, with `linear` / `llama3` scaling (as HF computes)."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h))
  sc = cfg.rope_scaling_dict
  if cfg.rope_type == "linear":
    inv = inv / sc["factor"]
  elif cfg.rope_type == "llama3":
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
  """positions [B,T] int -> (cos, sin) each [B,T,1,H] in cfg.dtype."""
  inv = jnp.asarray(rope_inv_freq(cfg))                                 # [H/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv                # [B,T,H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]         # [B,T,1,H]
  dt = dtype_of(cfg.dtype)
  return jnp.cos(emb).astype(dt), jnp.sin(emb).astype(dt)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B,T,n,H] rotated by (cos, sin) [B,T,1,H] (HF rotate_half convention)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


# -- modules --------------------------------------------------------------------

def _init(cfg: ModelConfig, names: tuple):
  return nn.with_logical_partitioning(
      nn.initializers.normal(stddev=cfg.initializer_range), names)


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale, statistics in float32 (as HF LlamaRMSNorm)."""
  eps: float
  dtype: Any
  param_dtype: Any
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class Weights(NamedTuple):
  """One projection: kernel [in, out], bias [out] or None, adapter (adapters.py) or None."""
  kernel: Array
  bias: Array | None
  adapter: adapters_lib.Adapter | None = None


class DenseParams(nn.Module):
  """Declares kernel [in, out] (+ bias [out]) with logical names; returns Weights.

  With `adapters` set and a LoRA adapter for this module in the "lora" collection,
  the adapter (and, for dropout, a "dropout" rng) rides along in Weights.adapter.
  """
  in_features: int
  features: int
  names: tuple                 # logical names of (in, out)
  cfg: ModelConfig
  use_bias: bool = False
  adapters: Any = None         # adapters.AdapterRun, or None: no adapter code at all

  @nn.compact
  def __call__(self) -> Weights:
    pdt = dtype_of(self.cfg.param_dtype)
    kernel = self.param("kernel", _init(self.cfg, self.names),
                        (self.in_features, self.features), pdt)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.names[1:]), (self.features,), pdt)
    adapter = None
    col = adapters_lib.COLLECTION
    if self.adapters is not None and self.has_variable(col, "lora_a"):
      run = self.adapters
      rng = (self.make_rng("dropout") if run.dropout > 0 and self.has_rng("dropout")
             else None)
      adapter = adapters_lib.Adapter(self.get_variable(col, "lora_a"),
                                     self.get_variable(col, "lora_b"), run, rng)
    return Weights(kernel, bias, adapter)


def _split_cols(y: Array, kernels) -> list:
  return jnp.split(y, np.cumsum([k.shape[1] for k in kernels])[:-1].tolist(), axis=1)


@jax.custom_jvp
def fused_dot(x2: Array, *kernels: Array) -> tuple:
  """[x2 @ k for k in kernels] as one matmul over the kernels concatenated [in, sum out].

  The JVP (so the VJP) keeps the input gradient fused (one matmul against the
  concatenation) but forms each kernel's gradient by its own matmul x2^T @ dy_k.
  Autodiff of the plain concat-then-slice would slice one [in, sum out] gradient,
  and under FSDP the TPU compiler then all-reduces that whole gradient at full size
  (its slices of the all-reduce's per-device piece no longer match a reduce-scatter);
  per-kernel gradients are reduce-scattered. Same values either way.
  """
  return tuple(_split_cols(jnp.dot(x2, jnp.concatenate(kernels, axis=1)), kernels))


def _fused_dot_jvp(primals, tangents):
  x2, *kernels = primals
  dx2, *dks = tangents
  cat = jnp.concatenate(kernels, axis=1)
  ys = _split_cols(jnp.dot(x2, cat), kernels)
  zero = jax.custom_derivatives.SymbolicZero
  outs = (_split_cols(jnp.dot(dx2, cat), kernels) if not isinstance(dx2, zero)
          else [None] * len(kernels))
  for i, dk in enumerate(dks):
    if not isinstance(dk, zero):
      d = jnp.dot(x2, dk)
      outs[i] = d if outs[i] is None else outs[i] + d
  return tuple(ys), tuple(jnp.zeros_like(y) if t is None else t for y, t in zip(ys, outs))


fused_dot.defjvp(_fused_dot_jvp, symbolic_zeros=True)


def dense(x: Array, weights: list, cfg: ModelConfig, fuse: bool) -> list:
  """[x @ kernel (+ bias) (+ adapter delta) for each Weights] in cfg.dtype.

  x is flattened to [rows, in] (one contracting dim, so the weight gradient is a plain
  GEMM on XLA:CPU, no transposed copy of the activations). fuse=True concatenates
  the kernels and runs one wider matmul (q|k|v, gate|up); adapters are added per
  projection (adapters.adapter_delta).
  """
  dt = dtype_of(cfg.dtype)
  x2 = x.reshape(-1, x.shape[-1])                                     # [rows, in]
  if fuse and len(weights) > 1:
    ys = fused_dot(x2, *[w.kernel.astype(dt) for w in weights])
  else:
    ys = [jnp.dot(x2, w.kernel.astype(dt)) for w in weights]
  out = []
  for y, w in zip(ys, weights):
    if w.bias is not None:
      y = y + w.bias.astype(dt)
    if w.adapter is not None:
      y = y + adapters_lib.adapter_delta(x2, w.adapter, dt)
    out.append(y.reshape(*x.shape[:-1], y.shape[-1]))
  return out


def attend(q, k, v, mask, dt, keys_transposed=False, scores_by_sum=False):
  """Softmax attention. q [B,K,Q,T,H] (pre-scaled); k, v [B,K,S,H]; mask [B,1,1,T,S].

  keys_transposed: k is [B,K,H,S] (the decode cache's layout: the scores matmul reads
  keys in stored order instead of as a transposed operand). scores_by_sum (with
  keys_transposed): the scores as H multiply-adds of [S] rows instead of a matmul; on
  XLA:CPU one fused loop beats a batched matmul whose rows are Q*T = 1 or 2 long
  (decode), -5..14% of a tiny-model rollout call, same tokens.

  The Q query heads of a kv head are merged into the row dim (Q*T rows), so every
  matmul contracts a single dim: XLA:CPU runs them as plain batched GEMMs in the
  backward pass too (no transposed copies of [T, S] arrays). The softmax
  normalisation is deferred to the [T, H] output (one pass less over the scores);
  fully masked rows become uniform, not NaN. Returns [B,K,Q,T,H] in dt.
  """
  b, kh, g, t, h = q.shape
  s = k.shape[3] if keys_transposed else k.shape[2]
  qm = q.reshape(b, kh, g * t, h)
  if keys_transposed and scores_by_sum:
    scores = qm[..., 0, None] * k[:, :, None, 0, :]
    for i in range(1, h):
      scores = scores + qm[..., i, None] * k[:, :, None, i, :]           # [B,K,Q*T,S]
  else:
    spec = "bkmh,bkhs->bkms" if keys_transposed else "bkmh,bksh->bkms"
    scores = jnp.einsum(spec, qm, k)                                      # [B,K,Q*T,S]
  scores = scores.reshape(b, kh, g, t, s).astype(jnp.float32)             # [B,K,Q,T,S]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = jnp.exp(scores - peak).astype(dt)                             # [B,K,Q,T,S]
  denom = jnp.sum(weights, axis=-1, keepdims=True, dtype=jnp.float32)     # [B,K,Q,T,1]
  out = jnp.einsum("bkms,bksh->bkmh", weights.reshape(b, kh, g * t, s), v)  # [B,K,Q*T,H]
  return out.reshape(b, kh, g, t, h) / denom.astype(dt)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; optional KV cache."""
  cfg: ModelConfig
  mesh: Any = None
  rules: Any = None
  adapters: Any = None         # adapters.AdapterRun or None

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv=None):
    """x [B,T,D]; cos/sin [B,T,1,H]; mask [B,1,1,T,S] bool.

    kv: None (S == T, keys are this call's tokens) or (cache_k, cache_v, layer, index)
    with cache_k/v [L,B,S,K,H]: the T new keys are written at slots [index, index+T)
    of layer `layer`, then all S slots are attended. Returns (y [B,T,D], kv').
    """
    cfg = self.cfg
    b, t, _ = x.shape
    n, k, h, g = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_groups
    dt = dtype_of(cfg.dtype)
    d = x.shape[-1]
    bias = cfg.attention_bias
    ad = self.adapters
    q, kk, v = dense(x, [
        DenseParams(d, n * h, ("embed", "heads"), cfg, bias, ad, name="q_proj")(),
        DenseParams(d, k * h, ("embed", "kv_heads"), cfg, bias, ad, name="k_proj")(),
        DenseParams(d, k * h, ("embed", "kv_heads"), cfg, bias, ad, name="v_proj")(),
    ], cfg, cfg.fuse_projections)
    q = q.reshape(b, t, n, h)                                         # [B,T,N,H]
    kk = kk.reshape(b, t, k, h)                                       # [B,T,K,H]
    v = v.reshape(b, t, k, h)                                         # [B,T,K,H]
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, dt, dtype_of(cfg.param_dtype), "head_dim",
                  name="q_norm")(q)
      kk = RMSNorm(cfg.rms_norm_eps, dt, dtype_of(cfg.param_dtype), "head_dim",
                   name="k_norm")(kk)
    q = apply_rope(q, cos, sin)
    kk = apply_rope(kk, cos, sin)

    if kv is not None:                                                # write the cache
      cache_k, cache_v, layer, index = kv
      zero = jnp.zeros((), jnp.int32)
      start = (layer, zero, index, zero, zero)
      cache_k = jax.lax.dynamic_update_slice(cache_k, kk[None].astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
      kk = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)  # [B,S,K,H]
      v = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)   # [B,S,K,H]
      kv = (cache_k, cache_v, layer, index)

    q = q.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)              # [B,K,Q,T,H]
    q = q * jnp.asarray(h ** -0.5, dt)
    kk = kk.astype(dt).transpose(0, 2, 1, 3)                          # [B,K,S,H]
    v = v.astype(dt).transpose(0, 2, 1, 3)                            # [B,K,S,H]
    out = self._attention(q, kk, v, mask, cached=kv is not None)      # [B,K,Q,T,H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n * h)           # [B,T,N*H]
    out = shd.constrain(out, ("act_batch", "act_length", "act_heads"), self.mesh, self.rules)
    (y,) = dense(out, [DenseParams(n * h, cfg.hidden_size, ("heads", "embed"), cfg,
                                   cfg.attention_out_bias, self.adapters, name="o_proj")()],
                 cfg, False)
    return y, kv


  def _attention(self, q, k, v, mask, cached):
    """q [B,K,Q,T,H] pre-scaled; k, v [B,K,S,H]; mask [B,1,1,T,S] -> [B,K,Q,T,H]."""
    impl = "xla" if cached else attention_lib.resolve(self.cfg, self.mesh)
    if impl == "cudnn":
      return attention_lib.sdpa_attention(q, k, v, attention_lib.key_validity(mask))
    if impl == "splash":
      return attention_lib.splash_attention(q, k, v, attention_lib.key_validity(mask),
                                            mesh=self.mesh, rules=self.rules,
                                            interpret=SPLASH_INTERPRET)
    return attend(q, k, v, mask, dtype_of(self.cfg.dtype))


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig
  mesh: Any = None
  rules: Any = None
  adapters: Any = None         # adapters.AdapterRun or None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d, f = cfg.hidden_size, cfg.intermediate_size
    gate, up = dense(x, [
        DenseParams(d, f, ("embed", "mlp"), cfg, False, self.adapters, name="gate_proj")(),
        DenseParams(d, f, ("embed", "mlp"), cfg, False, self.adapters, name="up_proj")(),
    ], cfg, cfg.fuse_projections)                                     # [B,T,F] each
    hmid = jax.nn.silu(gate) * up                                     # [B,T,F]
    hmid = shd.constrain(hmid, ("act_batch", "act_length", "act_mlp"), self.mesh, self.rules)
    (y,) = dense(hmid, [DenseParams(f, d, ("mlp", "embed"), cfg, False, self.adapters,
                                    name="down_proj")()], cfg, False)
    return y


class Block(nn.Module):
  """Pre-norm decoder block; the scan body (carry = (x, kv))."""
  cfg: ModelConfig
  mesh: Any = None
  rules: Any = None
  adapters: Any = None         # adapters.AdapterRun or None

  @nn.compact
  def __call__(self, carry, cos, sin, mask):
    x, kv = carry                                                     # x [B,T,D]
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
    a, kv = Attention(cfg, self.mesh, self.rules, self.adapters, name="self_attn")(
        h, cos, sin, mask, kv)
    x = x + a
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
    x = x + MLP(cfg, self.mesh, self.rules, self.adapters, name="mlp")(h)
    x = shd.constrain(x, ("act_batch", "act_length", "act_embed"), self.mesh, self.rules)
    if kv is not None:
      cache_k, cache_v, layer, index = kv
      kv = (cache_k, cache_v, layer + 1, index)
    return (x, kv), None
