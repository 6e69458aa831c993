"""Attention kernels by backend: today's einsum (xla), cuDNN flash (GPU), splash (TPU).

Shape legend: B batch, T query length, S key length (T without a cache), N query
heads, K kv heads, Q = N // K query heads per kv head, H head_dim. Queries arrive pre-scaled by H^-0.5.

ModelConfig.attention picks the kernel of calls without a KV cache (training, the
learner's and reference log-probs, forward / forward_hidden):
  auto    splash on TPU, cudnn on GPU with a bf16/fp16 compute dtype, else xla
  xla     layers.attend: [B,K,Q,T,S] float32 scores, any mask, any device
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): flash attention,
          no [T,S] buffer; GPU only, bf16/fp16, head_dim a multiple of 8
  splash  Pallas splash attention inside shard_map (batch and kv heads sharded as
          the activations are); TPU only, T a multiple of 128
Calls with a KV cache (prefill, decode) always use xla: a decode step's scores are
[B,K,Q,1,S], and the cache's slot layout is not what the kernels expect.

Padding. Both flash kernels take the per-key validity of a (left- and/or
right-)padded batch, key_valid [B,T], whose valid tokens must be one contiguous run
per row (prompt + completion, as the tokenizer builds them). cudnn rolls each row
so its run starts at 0 and uses sequence lengths (PADDING_CAUSAL), then rolls back;
splash uses segment ids (pad = 0, token = 1) with a causal mask. Outputs at pad
positions differ between kernels (they never reach a real token).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from safecrs_jax.infra import sharding as shd
from safecrs_jax.models.config import ConfigError, ModelConfig

try:  # Pallas TPU kernels; present in jax, but keep CPU-only installs importable
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
except ImportError:  # pragma: no cover
  splash = None

SPLASH_BLOCK = 512   # largest tile; 256 or 128 when the length needs it


def platform_of(mesh=None) -> str:
  """"tpu" / "gpu" / "cpu": the platform of mesh's devices (default jax.devices())."""
  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
  return device.platform


def resolve(cfg: ModelConfig, mesh=None) -> str:
  """cfg.attention with "auto" resolved for the devices; raises ConfigError when the
  chosen kernel cannot run there."""
  name, platform = cfg.attention, platform_of(mesh)
  half = cfg.dtype in ("bfloat16", "float16")
  if name == "auto":
    if platform == "tpu":
      return "splash"
    return "cudnn" if platform == "gpu" and half else "xla"
  if name == "cudnn" and (platform != "gpu" or not half):
    raise ConfigError(f"attention='cudnn' needs a GPU and dtype bfloat16/float16; got "
                      f"{platform} devices, dtype={cfg.dtype}. Use 'xla' or 'auto'.")
  if name == "splash" and platform != "tpu":
    raise ConfigError(f"attention='splash' runs on TPU only (got {platform} devices); "
                      "use 'xla' or 'auto'.")
  return name


def key_validity(mask):
  """[B,1,1,T,S=T] causal & valid-key mask (decoder.forward's) -> key_valid [B,S] bool.

  The last query row of a causal mask sees every key, so it is the key validity.
  """
  return mask[:, 0, 0, -1, :]


def _row_runs(key_valid):
  """key_valid [B,T] -> (start [B], length [B]) int32 of each row's valid run."""
  start = jnp.argmax(key_valid, axis=1).astype(jnp.int32)
  length = jnp.sum(key_valid, axis=1, dtype=jnp.int32)
  return start, length


def _roll_rows(x, shift):
  """x [B,T,...] with row b rolled left by shift[b]: y[b, t] = x[b, (t + shift[b]) % T]."""
  t = x.shape[1]
  idx = (jnp.arange(t, dtype=jnp.int32)[None] + shift[:, None]) % t   # [B,T]
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def sdpa_attention(q, k, v, key_valid, *, implementation="cudnn"):
  """Causal attention of a padded batch via jax.nn.dot_product_attention.

  q [B,K,Q,T,H] pre-scaled; k, v [B,K,T,H]; key_valid [B,T] bool, one contiguous
  run of valid tokens per row -> [B,K,Q,T,H]. Rows are rolled so the run starts at
  slot 0, attended with sequence lengths, and rolled back. implementation="xla"
  runs the same arithmetic on any device (it materialises the scores).
  """
  b, kh, g, t, h = q.shape
  start, length = _row_runs(key_valid)
  length = jnp.maximum(length, 1)                                     # all-pad rows
  qt = q.reshape(b, kh * g, t, h).transpose(0, 2, 1, 3)               # [B,T,N,H]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)           # [B,T,K,H]
  out = jax.nn.dot_product_attention(
      _roll_rows(qt, start), _roll_rows(kt, start), _roll_rows(vt, start), scale=1.0,
      is_causal=True, query_seq_lengths=length, key_value_seq_lengths=length,
      implementation=implementation)                                  # [B,T,N,H]
  out = _roll_rows(out, (t - start) % t)
  return out.transpose(0, 2, 1, 3).reshape(b, kh, g, t, h)


def _splash_kernel(g: int, t: int, interpret: bool):
  """Single-device splash MHA kernel over Q heads of a causal T x T mask.

  Built afresh on every trace, never cached: the kernel holds its block-mask arrays,
  and one built while tracing (a scanned decoder traces its body more than once) would
  carry that trace's tracers into the next one (UnexpectedTracerError). Building costs
  only trace time.
  """
  block = next(bl for bl in (SPLASH_BLOCK, 256, 128) if t % bl == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block,
                            block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(g)])
  return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, key_valid, interpret):
  """Unsharded splash: q [b,k,Q,T,H]; k, v [b,k,T,H]; key_valid [b,T]."""
  g, t = q.shape[2], q.shape[3]
  kernel = _splash_kernel(g, t, interpret)
  seg = key_valid.astype(jnp.int32)                                   # [b,T]

  def one(q1, k1, v1, s1):          # q1 [Q,T,H]; k1, v1 [T,H] -> one kv head, Q queries
    ids = splash.SegmentIds(q=s1, kv=s1)
    kk = jnp.broadcast_to(k1, (g,) + k1.shape)
    vv = jnp.broadcast_to(v1, (g,) + v1.shape)
    return kernel(q1, kk, vv, ids)

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))                   # over kv heads
  return jax.vmap(per_head)(q, k, v, seg)                             # over batch


def splash_attention(q, k, v, key_valid, *, mesh=None, rules=None, interpret=False):
  """Causal splash attention of a padded batch (TPU; interpret=True runs anywhere, slowly).

  q [B,K,Q,T,H] pre-scaled; k, v [B,K,T,H]; key_valid [B,T] bool -> [B,K,Q,T,H].
  Pads get segment 0 and tokens segment 1, so a token attends earlier tokens only,
  and every row has at least itself. With a mesh, runs per shard in shard_map,
  batch and kv heads laid out by `rules` (act_batch, act_kv_heads).
  """
  if splash is None:  # pragma: no cover
    raise ConfigError("attention='splash' needs jax.experimental.pallas (TPU kernels)")
  t = q.shape[3]
  if t % 128:
    raise ConfigError(f"attention='splash' needs a sequence length that is a multiple "
                      f"of 128; got {t}: pick such buckets")
  local = functools.partial(_splash_local, interpret=interpret)
  if mesh is None:
    return local(q, k, v, key_valid)
  names = ("act_batch", "act_kv_heads")
  spec_q = shd.logical_to_spec(names + (None,) * 3, rules, q.shape, mesh)
  spec_kv = shd.logical_to_spec(names + (None,) * 2, rules, k.shape, mesh)
  spec_m = shd.logical_to_spec(("act_batch", None), rules, key_valid.shape, mesh)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, spec_m),
                     out_specs=spec_q, check_vma=False)
  return fn(q, k, v, key_valid)

