"""Rollouts: jitted prefill + per-token decode with the model's KV cache.

Shape legend:
  B  prompts; G samples per prompt; N = B * G rollouts (G consecutive rows per prompt)
  P  prompt length (left-padded); T  max new tokens; V  vocab

One compiled program per (model config, sampling config, B, P): the prompts are
prefilled into a KV cache, then `lax.while_loop`s emit one token per iteration
for every row and stop early once every row has emitted a stop token (or after
T tokens). The loop runs in `segments` parts whose caches hold only the slots
reached so far (P + the segment's last token), grown between parts: a decode
step's attention reads cost grows with the slots it attends.

Log-probs and temperature. The policy being optimised is the *tempered* model,
pi(y) = softmax(logits / temperature), and that is what `logprobs` holds for
every emitted token (float32) — the same quantity the learner computes
(rl.steps.completion_logprobs), so on-policy importance ratios start at 1. top-k / top-p only
truncate what the sampler may draw: `sampled_logprobs` holds the log-prob under
the truncated, renormalised distribution actually drawn from (equal to
`logprobs` when both are off, the paper default). Greedy decoding
(temperature == 0 or greedy=True) reports log_softmax(logits) (temperature 1).
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from safecrs_jax import models
from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import decode
from safecrs_jax.models.attention import platform_of


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample (hashable; a static jit argument)."""
  max_new_tokens: int             # T
  num_samples: int = 1            # G rollouts per prompt
  temperature: float = 1.0        # 0 = greedy
  top_p: float = 1.0              # nucleus mass kept (1.0 = off)
  top_k: int = 0                  # most likely tokens kept (0 = off)
  greedy: bool = False            # argmax decoding (also when temperature == 0)
  stop_ids: tuple = ()            # a row stops after emitting any of these (EOS, end-of-turn)
  pad_id: int = 0                 # written after a row stopped
  segments: int = 4               # decode loop segments, each attending only the slots used
                                  # so far (1 = every step reads all P + T cache slots)

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    if self.max_new_tokens < 1 or self.num_samples < 1 or self.segments < 1:
      raise ValueError("SamplingConfig: max_new_tokens, num_samples and segments must be >= 1, "
                       f"got {self}")
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"SamplingConfig: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self}")

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0.0

  @property
  def logit_scale(self) -> float:
    """1 / the temperature the log-probs are taken at."""
    return 1.0 if self.is_greedy else 1.0 / self.temperature


class Rollout(NamedTuple):
  tokens: jax.Array            # [N, T] int32 completion ids; pad_id after the stop
  mask: jax.Array              # [N, T] int32 1 up to and including the stop token
  logprobs: jax.Array          # [N, T] float32 log pi(token) of the tempered policy; 0 off-mask
  sampled_logprobs: jax.Array  # [N, T] float32 under the truncated (top-k/top-p) distribution
  lengths: jax.Array           # [N] int32 completion tokens (incl. the stop token)


def filter_logits(logits, top_k=0, top_p=1.0):
  """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits [N, V] float32.

  top-p keeps the smallest set of most likely tokens whose mass reaches top_p
  (the most likely token always stays); ties at the cut-off are kept.
  """
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_ = jnp.sort(logits, axis=-1)[:, ::-1]                      # descending
    probs = jax.nn.softmax(sorted_, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                       # mass strictly above
    keep = before < top_p
    cut = jnp.min(jnp.where(keep, sorted_, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cut, -jnp.inf, logits)
  return logits


def _gather(x, ids):
  return jnp.take_along_axis(x, ids[:, None], axis=-1)[:, 0]


def _token_logprob(logits, tok):
  """log softmax(logits)[tok] without the [N, V] log-softmax: logit - logsumexp. [N]."""
  return _gather(logits, tok) - jax.nn.logsumexp(logits, axis=-1)


def argmax(x):
  """jnp.argmax(x, -1) (the first index of the maximum; int32) as two plain reductions.

  XLA:CPU runs argmax as a variadic (value, index) reduce that does not vectorise; a max,
  then the least index equal to it, are two reductions that do. Rows whose maximum is
  NaN get index V - 1.
  """
  v = x.shape[-1]
  peak = jnp.max(x, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(x == peak, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)


def categorical(key, logits):
  """jax.random.categorical(key, logits, axis=-1), the same draws: argmax(gumbel + logits)."""
  return argmax(jax.random.gumbel(key, logits.shape, logits.dtype) + logits)


def _sample_step(logits, key, cfg: SamplingConfig):
  """logits [N, V] float32 -> (token [N], logprob [N], sampled_logprob [N]).

  Greedy is an argmax; no sort / filter runs unless top-k or top-p is on.
  """
  if cfg.is_greedy:
    tok = argmax(logits)
    lp = _token_logprob(logits, tok)
    return tok, lp, lp
  scaled = logits * cfg.logit_scale
  truncated = bool(cfg.top_k) or cfg.top_p < 1.0
  filtered = filter_logits(scaled, cfg.top_k, cfg.top_p) if truncated else scaled
  tok = categorical(key, filtered)
  lp = _token_logprob(scaled, tok)
  return tok, lp, (_token_logprob(filtered, tok) if truncated else lp)


def _constrain_batch(x, mesh):
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, shd.batch_sharding(mesh, x.ndim))


def prefill_impl(mesh) -> str:
  """"decode" (models/decode.prefill: decode-layout weights and cache, the last layer on
  the last position only; faster on CPU) or "decoder" (the decoder's scanned
  forward_cached: one layer's temporaries live at a time, less memory for long prompts
  on TPU / GPU)."""
  return "decode" if platform_of(mesh) == "cpu" else "decoder"


def _prefill(model_cfg, params, weights, prompt_ids, prompt_mask, cfg, mesh, rules):
  """The B unique prompts through the model once -> (last logits [N, V] f32, decode cache).

  The prompt cache (B rows, P slots) is repeated G times along the batch and padded to
  P + the first segment's slots; the prompt rows stay sharded when B divides the batch
  axes (else replicated).
  """
  g = cfg.num_samples
  ids = shd.constrain(prompt_ids.astype(jnp.int32), ("act_batch", "act_length"), mesh, rules)
  mask = shd.constrain(prompt_mask.astype(jnp.int32), ("act_batch", "act_length"), mesh, rules)
  b, p = ids.shape
  if prefill_impl(mesh) == "decode":
    logits, cache = _prefill_prompts(model_cfg, weights, ids, mask, mesh=mesh, rules=rules)
  else:
    cache = models.init_cache(model_cfg, b, p, mesh=mesh, rules=rules)
    logits, cache = models.forward_cached(model_cfg, params, ids, mask, cache, mesh=mesh,
                                          rules=rules, last_only=True)
    logits, cache = logits[:, -1], decode.from_decoder_cache(model_cfg, cache)
  last = jnp.repeat(logits.astype(jnp.float32), g, axis=0)                    # [N, V]
  pos = jnp.repeat(jnp.sum(mask, axis=1, dtype=jnp.int32), g, axis=0)          # [N]
  cache = decode.from_prefill(cache, p + segment_ends(cfg)[0], g, mesh, rules)
  return _constrain_batch(last, mesh), _constrain_batch(pos, mesh), cache


# A named program (jaxpr / HLO: "prefill"), run once per rollout batch on the unique prompts.
_prefill_prompts = jax.jit(decode.prefill, static_argnums=0, static_argnames=("mesh", "rules"))


def segment_ends(cfg: SamplingConfig) -> tuple:
  """Token counts at which the decode segments end: cfg.segments near-equal parts of T."""
  t, n = cfg.max_new_tokens, min(cfg.segments, cfg.max_new_tokens)
  return tuple(sorted({-(-t * (i + 1) // n) for i in range(n)}))


def _decode(model_cfg, weights, rng, cfg, mesh, rules, pos, state):
  """Runs the decode loop in segments; segment j's cache holds P + ends[j] slots.

  Attention cost per step grows with the cache slots it reads, so the early
  steps do not pay for slots no token has reached yet; between segments the
  cache is padded once (decode.grow). Masked slots add exact zeros, so the
  result equals one loop over all P + T slots up to float summation order.
  """
  stop = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)

  def body(state):
    t, cache, last, out, done, lps, slps = state
    tok, lp, slp = _sample_step(last, jax.random.fold_in(rng, t), cfg)
    live = ~done
    tok = jnp.where(live, tok, cfg.pad_id)
    out = out.at[:, t].set(tok)
    lps = lps.at[:, t].set(jnp.where(live, lp, 0.0))
    slps = slps.at[:, t].set(jnp.where(live, slp, 0.0))
    done = done | jnp.isin(tok, stop)
    logits, cache = decode.step(model_cfg, weights, tok, pos + t, cache, mesh, rules)
    return t + 1, cache, _constrain_batch(logits.astype(jnp.float32), mesh), out, done, lps, slps

  ends = segment_ends(cfg)
  p = state[1]["mask"].shape[1] - ends[0]
  for j, end in enumerate(ends):
    if j:
      state = (state[0], decode.grow(state[1], p + end, mesh, rules)) + state[2:]
    cond = lambda s, end=end: (s[0] < end) & ~jnp.all(s[4])             # noqa: E731
    state = jax.lax.while_loop(cond, body, state)
  return state


@functools.partial(jax.jit, static_argnames=("model_cfg", "cfg", "mesh", "rules", "placement"))
def _generate(model_cfg, params, prompt_ids, prompt_mask, rng, cfg, mesh, rules, placement):
  # Weights: cast to the compute dtype, placed and laid out for decoding once; the
  # prefill and every decode step use them.
  params = decode.place(model_cfg, params, mesh, rules, placement)
  tensor = 1 if mesh is None else mesh.shape.get("tensor", 1)
  weights = decode.layout(model_cfg, params, fuse=model_cfg.fuse_projections and tensor == 1)
  last, pos, cache = _prefill(model_cfg, params, weights, prompt_ids, prompt_mask, cfg, mesh,
                              rules)
  n, t_max = last.shape[0], cfg.max_new_tokens
  stop = jnp.asarray(cfg.stop_ids or (-1,), jnp.int32)
  zeros_f = _constrain_batch(jnp.zeros((n, t_max), jnp.float32), mesh)
  state = (jnp.int32(0), cache, last,
           _constrain_batch(jnp.full((n, t_max), cfg.pad_id, jnp.int32), mesh),
           _constrain_batch(jnp.zeros((n,), bool), mesh), zeros_f, zeros_f)
  _, _, _, out, _, lps, slps = _decode(model_cfg, weights, rng, cfg, mesh, rules, pos, state)
  # mask: positions up to and including the first stop token (all T if none).
  is_stop = jnp.isin(out, stop)
  after_stop = jnp.cumsum(is_stop, axis=1) - is_stop                     # stops strictly before
  mask = (after_stop == 0).astype(jnp.int32)
  return Rollout(out, mask, lps * mask, slps * mask, mask.sum(1).astype(jnp.int32))


def generate(model_cfg, params, prompt_ids, prompt_mask, rng, cfg: SamplingConfig, mesh=None,
             rules=None, placement="auto", host_parallel=True):
  """Samples cfg.num_samples completions for each left-padded prompt.

  Args:
    model_cfg: models.ModelConfig (static).
    params: model params (placed / sharded as the caller wants).
    prompt_ids, prompt_mask: [B, P] int, left-padded (mask 0 on padding).
    rng: PRNG key; the same key gives the same rollouts (token t uses
      fold_in(rng, t); threefry is partitionable, so the mesh does not matter).
    cfg: SamplingConfig (static).
    mesh: when given, rollouts are kept sharded over its (data, fsdp) axes;
      N = B * G must then divide by their size. rules: logical-axis rules
      (tuple; None = sharding.DEFAULT_RULES) for the model's activations.
    placement: where the decode weights live (models/decode.py): "replicated",
      "tensor" (split over the tensor axis only) or "auto" (replicated when they
      fit in a quarter of a device's memory). Either way the decode loop holds no
      weight all-gather; the params are cast to model_cfg.dtype once.
    host_parallel: on CPU, run over one device per core when that is more devices
      than `mesh` has (host_mesh); the outputs come back to `mesh` (or to params'
      device). False keeps `mesh`.
  Returns:
    Rollout with [N, T] arrays, rows i*G .. i*G+G-1 from prompt i. Each unique
    prompt is prefilled once; its KV cache is shared by its G rows.
  """
  if prompt_ids.shape != prompt_mask.shape or prompt_ids.ndim != 2:
    raise ValueError(f"generate: prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} "
                     "must both be [B, P]")
  rules = None if rules is None else tuple(map(tuple, rules))
  split = host_mesh(mesh, prompt_ids.shape[0]) if host_parallel else None
  if split is not None and any(isinstance(x, jax.core.Tracer) for x in
                               jax.tree.leaves((params, prompt_ids, prompt_mask, rng))):
    split = None                                   # traced by a caller's jit: keep its mesh
  if split is not None:
    back = _output_sharding(mesh, params)
    rep, rows = shd.replicated(split), shd.batch_sharding(split, 2)
    params, rng = jax.device_put(params, rep), jax.device_put(rng, rep)
    prompt_ids, prompt_mask = jax.device_put(prompt_ids, rows), jax.device_put(prompt_mask, rows)
  run_mesh = mesh if split is None else split
  if placement == "auto":
    placement = decode.choose_placement(model_cfg, run_mesh)
  out = _generate(model_cfg, params, prompt_ids, prompt_mask, rng, cfg, run_mesh, rules,
                  placement)
  return out if split is None else jax.tree.map(lambda x: jax.device_put(x, back(x.ndim)), out)


def host_mesh(mesh, num_prompts: int):
  """The mesh a CPU rollout runs on instead of `mesh` (None: keep `mesh`).

  On one CPU device a decode step's small matmuls and reductions use a second core
  poorly, so a single-process CPU rollout splits its prompts over one CPU device per
  core (sharding.expose_cpu_cores, which the launch scripts call): a data mesh of the
  largest d <= min(CPU devices, cores) dividing num_prompts, used when d exceeds
  `mesh`'s device count. The tokens are the same as on one device; log-probs can
  differ in float rounding (each device's matmuls see fewer rows).
  """
  if jax.process_count() > 1 or platform_of(mesh) != "cpu":
    return None
  devices = jax.local_devices(backend="cpu")
  limit = min(len(devices), shd.cpu_cores())
  d = max(k for k in range(1, limit + 1) if num_prompts % k == 0)
  if d <= (1 if mesh is None else mesh.devices.size):
    return None
  return shd.make_mesh((("data", d), ("fsdp", 1), ("tensor", 1)), devices=devices[:d])


def _output_sharding(mesh, params):
  """ndim -> where generate's outputs go back to: the caller's mesh, else params' device."""
  if mesh is not None:
    return lambda ndim: shd.batch_sharding(mesh, ndim)
  leaf = next((x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)), None)
  on_one = leaf is not None and len(leaf.devices()) == 1
  single = jax.sharding.SingleDeviceSharding(
      next(iter(leaf.devices())) if on_one else jax.devices()[0])
  return lambda ndim: single
