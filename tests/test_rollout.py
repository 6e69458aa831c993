"""Sampler: KV-cache decoding against full-forward decoding, seeds, stops, top-k / top-p."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safecrs_jax import models
from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import decode
from safecrs_jax.rl import rollout, steps

CFG = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, initializer_range=0.3,
                         scan_layers=False)
T = 6


@pytest.fixture(scope="module")
def setup():
  params = models.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, CFG.vocab_size, size=(3, 5)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :2] = 0      # left padding of different lengths
  mask[2, :4] = 0
  ids = ids * mask
  return params, jnp.asarray(ids), jnp.asarray(mask)


def _full_forward_greedy(params, ids, mask, steps):
  """Argmax decoding by re-running the whole forward each step (fixed buffer)."""
  b, p = ids.shape
  buf = np.concatenate([np.asarray(ids), np.zeros((b, steps), np.int32)], 1)
  m = np.concatenate([np.asarray(mask), np.zeros((b, steps), np.int32)], 1)
  out, lps = [], []
  for t in range(steps):
    logits = np.asarray(models.forward(CFG, params, jnp.asarray(buf), jnp.asarray(m)), np.float32)
    last = logits[:, p + t - 1]
    tok = last.argmax(-1)
    lps.append(jax.nn.log_softmax(last)[np.arange(b), tok])
    buf[:, p + t], m[:, p + t] = tok, 1
    out.append(tok)
  return np.stack(out, 1), np.stack(lps, 1)


def test_greedy_cache_equals_full_forward_and_stop(setup):
  params, ids, mask = setup
  want, want_lp = _full_forward_greedy(params, ids, mask, T)
  # A stop id that one row emits first at step t >= 1 and no other row ever emits:
  # that row stops (mask through the stop, pad after), the others run on unchanged.
  cand = [(r, t) for r in range(3) for t in range(1, T - 1)
          if want[r, t] not in want[r, :t] and want[r, t] not in np.delete(want, r, 0)]
  assert cand, "random model: no usable stop id"
  row, t = cand[0]
  stop = int(want[row, t])
  cfg = rollout.SamplingConfig(max_new_tokens=T, greedy=True, stop_ids=(stop,), pad_id=0)
  got = rollout.generate(CFG, params, ids, mask, jax.random.key(1), cfg)
  keep = np.ones((3, T), bool)
  keep[row, t + 1:] = False
  np.testing.assert_array_equal(got.mask, keep.astype(np.int32))
  np.testing.assert_array_equal(got.tokens, np.where(keep, want, 0))
  np.testing.assert_allclose(got.logprobs, np.where(keep, want_lp, 0.0), atol=1e-4)
  np.testing.assert_array_equal(got.lengths, keep.sum(1))


def test_sampling_seeded_and_logprobs_match_learner(setup):
  params, ids, mask = setup
  cfg = rollout.SamplingConfig(max_new_tokens=T, num_samples=4, temperature=0.7)
  a = rollout.generate(CFG, params, ids, mask, jax.random.key(3), cfg)
  b = rollout.generate(CFG, params, ids, mask, jax.random.key(3), cfg)
  c = rollout.generate(CFG, params, ids, mask, jax.random.key(4), cfg)
  assert a.tokens.shape == (12, T)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  np.testing.assert_array_equal(a.logprobs, a.sampled_logprobs)
  # The learner's full-forward log-probs (logits / temperature) equal the sampler's.
  lp = steps.completion_logprobs(CFG, params, jnp.repeat(ids, 4, 0), jnp.repeat(mask, 4, 0),
                                 a.tokens, a.mask, temperature=0.7)
  np.testing.assert_allclose(lp, a.logprobs, atol=1e-4)


def test_top_k_top_p_respected(setup):
  params, ids, mask = setup
  cfg = rollout.SamplingConfig(max_new_tokens=T, num_samples=8, temperature=2.0, top_k=3)
  r = rollout.generate(CFG, params, ids, mask, jax.random.key(5), cfg)
  n = r.tokens.shape[0]
  pi = jnp.repeat(ids, 8, 0)
  pm = jnp.repeat(mask, 8, 0)
  logits = models.forward(CFG, params, jnp.concatenate([pi, r.tokens], 1),
                          jnp.concatenate([pm, r.mask], 1))[:, 4:4 + T]     # [n, T, V]
  tok_logit = np.take_along_axis(np.asarray(logits), np.asarray(r.tokens)[..., None], -1)[..., 0]
  rank = (np.asarray(logits) > tok_logit[..., None] + 1e-5).sum(-1)
  assert rank.max() < 3 and n == 24
  # sampled_logprobs are of the renormalised top-3 distribution.
  top3 = jax.lax.top_k(logits.astype(jnp.float32) / 2.0, 3)[0]
  want = tok_logit / 2.0 - jax.nn.logsumexp(top3, -1)
  np.testing.assert_allclose(r.sampled_logprobs, want, atol=1e-4)
  # top-p on constructed logits: probs .5 .3 .15 .05 -> p=.75 keeps two, p=.9 three.
  lg = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))

  def kept(p):
    return np.isfinite(np.asarray(rollout.filter_logits(lg, top_p=p)))[0]

  np.testing.assert_array_equal(kept(0.75), [False, True, False, True])
  np.testing.assert_array_equal(kept(0.9), [True, True, False, True])
  np.testing.assert_array_equal(kept(0.1), [False, True, False, False])
  draws = jax.random.categorical(jax.random.key(0), rollout.filter_logits(lg, top_p=0.75), shape=(2000, 1))
  assert set(np.unique(np.asarray(draws))) == {1, 3}


def test_segmented_decode_equals_full_cache_decode(setup):
  """Segments attending only the slots used so far == one loop over all P + T slots:
  same greedy and sampled tokens (fixed key, with stops), same log-probs; each segment's
  while loop carries a cache of P + its last token's slots."""
  params, ids, mask = setup
  t = 7
  assert rollout.segment_ends(rollout.SamplingConfig(max_new_tokens=t, segments=3)) == (3, 5, 7)
  assert rollout.segment_ends(rollout.SamplingConfig(max_new_tokens=2, segments=4)) == (1, 2)
  for kw in (dict(greedy=True), dict(num_samples=4, temperature=1.0, stop_ids=(7, 9))):
    full = rollout.SamplingConfig(max_new_tokens=t, segments=1, **kw)
    seg = dataclasses.replace(full, segments=3)
    want = rollout.generate(CFG, params, ids, mask, jax.random.key(6), full)
    got = rollout.generate(CFG, params, ids, mask, jax.random.key(6), seg)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    np.testing.assert_allclose(got.sampled_logprobs, want.sampled_logprobs, atol=1e-5)
  text = jax.jit(rollout.generate, static_argnums=(0, 5)).lower(
      CFG, params, ids, mask, jax.random.key(6), seg).compile().as_text()
  n, kh, hd, p = 12, CFG.num_kv_heads, CFG.head_dim, ids.shape[1]
  for end in (3, 5, 7):
    assert f"f32[{n},{kh},{p + end},{hd}]" in text, end


def test_sharded_rollout_equals_single_device(setup):
  params, ids, mask = setup
  mesh = shd.make_mesh((("data", 2), ("fsdp", 4), ("tensor", 1)), devices=jax.devices())
  cfg = rollout.SamplingConfig(max_new_tokens=T, num_samples=8, temperature=1.0, stop_ids=(7, 9))
  ref = rollout.generate(CFG, params, ids, mask, jax.random.key(2), cfg)
  sparams = jax.device_put(params, models.param_shardings(CFG, mesh))
  got = rollout.generate(CFG, sparams, ids, mask, jax.random.key(2), cfg, mesh=mesh)
  assert got.tokens.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_array_equal(got.mask, ref.mask)
  # tensor-sharded reductions sum in another order: tokens equal, log-probs to float32 noise
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=5e-5)


def test_cpu_rollout_splits_prompts_over_one_device_per_core(setup, monkeypatch):
  """On CPU, generate runs over a data mesh of one device per core (host_mesh) when that
  is more devices than the caller's mesh: same tokens as one device, log-probs to float32
  noise, outputs back where the caller's arrays live."""
  params, ids, mask = setup
  monkeypatch.setattr(shd, "cpu_cores", lambda: 4)
  ids4, mask4 = jnp.concatenate([ids, ids[:1]]), jnp.concatenate([mask, mask[:1]])
  assert rollout.host_mesh(None, 4).shape == {"data": 4, "fsdp": 1, "tensor": 1}
  assert rollout.host_mesh(None, 6).shape["data"] == 3       # the largest divisor <= 4
  assert rollout.host_mesh(None, 5) is None                  # only 1 divides 5
  assert rollout.host_mesh(shd.make_mesh((("fsdp", -1),)), 4) is None   # already 8 devices
  one = shd.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)), devices=jax.devices()[5:6])
  assert rollout.host_mesh(one, 4).devices.size == 4
  for cfg in (rollout.SamplingConfig(max_new_tokens=T, greedy=True),
              rollout.SamplingConfig(max_new_tokens=T, num_samples=3, temperature=1.0,
                                     stop_ids=(7, 9))):
    ref = rollout.generate(CFG, params, ids4, mask4, jax.random.key(3), cfg, host_parallel=False)
    assert ref.tokens.sharding.device_set == {jax.devices()[0]}
    got = rollout.generate(CFG, params, ids4, mask4, jax.random.key(3), cfg)
    assert got.tokens.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.mask, ref.mask)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=5e-5)
    # a one-device mesh on device 5: the rollout runs on 4 devices, the outputs come back
    on5 = jax.device_put(params, shd.replicated(one))
    got5 = rollout.generate(CFG, on5, ids4, mask4, jax.random.key(3), cfg, mesh=one)
    assert got5.tokens.sharding.device_set == {jax.devices()[5]}
    np.testing.assert_array_equal(got5.tokens, ref.tokens)


def test_expose_cpu_cores_sets_the_device_count_once(monkeypatch):
  monkeypatch.setattr(shd, "cpu_cores", lambda: 6)
  env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  assert shd.expose_cpu_cores(env) == 6
  assert env["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                              "--xla_force_host_platform_device_count=6")
  assert shd.expose_cpu_cores(env) == 0 and env["XLA_FLAGS"].count("device_count") == 1
  env = {"JAX_PLATFORMS": "tpu"}                   # the CPU backend is not used: left alone
  assert shd.expose_cpu_cores(env) == 0 and "XLA_FLAGS" not in env
  monkeypatch.setattr(shd, "cpu_cores", lambda: 1)
  env = {"JAX_PLATFORMS": "cpu"}
  assert shd.expose_cpu_cores(env) == 0 and "XLA_FLAGS" not in env
  monkeypatch.setattr(shd, "cpu_cores", lambda: 64)
  assert shd.expose_cpu_cores(env) == shd.MAX_CPU_DEVICES


def test_one_prefill_per_unique_prompt(setup):
  """G samples share their prompt's prefill; results equal prefilling G copies."""
  params, ids, mask = setup
  cfg = rollout.SamplingConfig(max_new_tokens=T, num_samples=4, temperature=1.0)
  got = rollout.generate(CFG, params, ids, mask, jax.random.key(7), cfg)
  flat = rollout.SamplingConfig(max_new_tokens=T, num_samples=1, temperature=1.0)
  ref = rollout.generate(CFG, params, jnp.repeat(ids, 4, 0), jnp.repeat(mask, 4, 0),
                         jax.random.key(7), flat)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  # tensor-sharded reductions sum in another order: tokens equal, log-probs to float32 noise
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=5e-5)
  # The program runs the prefill once, on the 3 unique prompts.
  jaxpr = jax.make_jaxpr(lambda p, i, m: rollout.generate(CFG, p, i, m, jax.random.key(7), cfg))(
      params, ids, mask)
  calls = []

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.params.get("name") == "prefill":
        calls.append([v.aval.shape for v in eqn.invars            # ids and mask
                      if v.aval.dtype == jnp.int32 and v.aval.ndim == 2])
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  assert calls == [[(3, 5), (3, 5)]]


@pytest.mark.parametrize("variant", [
    dict(),                                                            # llama, fused
    dict(fuse_projections=False, tie_word_embeddings=True),
    dict(model_type="qwen2", attention_bias=True),
    dict(model_type="qwen3", qk_norm=True, num_layers=1),              # the last layer only
    dict(scan_layers=True, attention_out_bias=True, num_layers=3),
])
def test_prefill_equals_the_decoders_cached_forward(setup, variant):
  """decode.prefill (decode weights, keys stored [B,K,H,P], the last layer on the last
  position only) gives the decoder's last logits and the same keys / values per layer."""
  _, ids, mask = setup
  cfg = dataclasses.replace(CFG, **variant)
  params = models.init_params(cfg, jax.random.key(3))
  want, cache = models.forward_cached(cfg, params, ids, mask, models.init_cache(cfg, 3, 5),
                                      last_only=True)
  weights = decode.layout(cfg, decode.place(cfg, params), fuse=cfg.fuse_projections)
  got, got_cache = jax.jit(decode.prefill, static_argnums=0)(cfg, weights, ids, mask)
  np.testing.assert_allclose(got, want[:, 0], rtol=1e-5, atol=1e-5)
  valid = np.asarray(mask, bool)
  np.testing.assert_array_equal(got_cache["mask"], valid)
  assert int(got_cache["index"]) == 5
  for layer in range(cfg.num_layers):
    keys = np.asarray(got_cache["k"][layer]).transpose(0, 3, 1, 2)      # -> [B,P,K,H]
    values = np.asarray(got_cache["v"][layer]).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(keys[valid], np.asarray(cache["k"][layer])[valid],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values[valid], np.asarray(cache["v"][layer])[valid],
                               rtol=1e-5, atol=1e-5)


def test_decoder_prefill_path_equals_the_decode_prefill(setup, monkeypatch):
  """TPU / GPU prefill with the decoder's scanned forward_cached; CPU with decode.prefill:
  the same rollouts (forced here on CPU; the planner tests compile the other one for TPU)."""
  params, ids, mask = setup
  cfg = rollout.SamplingConfig(max_new_tokens=T, num_samples=2, temperature=1.0, pad_id=3)
  assert rollout.prefill_impl(None) == "decode"
  want = rollout.generate(CFG, params, ids, mask, jax.random.key(5), cfg)
  monkeypatch.setattr(rollout, "prefill_impl", lambda mesh: "decoder")
  cfg = dataclasses.replace(cfg, pad_id=4)                         # a new trace
  got = rollout.generate(CFG, params, ids, mask, jax.random.key(5), cfg)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)


def test_argmax_and_categorical_equal_jax_including_ties_and_filtered_logits():
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 3, size=(64, 50)).astype(np.float32)          # many ties
  x[:5, 10:] = -np.inf                                               # top-k / top-p cut-offs
  x[5] = -np.inf
  x = jnp.asarray(x)
  np.testing.assert_array_equal(jax.jit(rollout.argmax)(x), jnp.argmax(x, -1))
  for seed in range(3):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(jax.jit(rollout.categorical)(key, x * 0.3),
                                  jax.random.categorical(key, x * 0.3, axis=-1))


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*?\{\n(.*?)\n\}", re.S | re.M)
_ALL_GATHER = re.compile(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(")


def loop_all_gathers(compiled_text: str) -> list:
  """All-gathers inside while-loop bodies of a compiled program's HLO text.

  compiled_text: jax.jit(f).lower(...).compile().as_text(). Every computation a
  while body reaches (fusions, calls, nested loops) is searched. Returns
  [(dtype, shape tuple)] of each all-gather's result, e.g. [("f32", (256, 512))].
  """
  comps = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(compiled_text)}
  todo = re.findall(r"body=%([\w.\-]+)", compiled_text)
  seen, found = set(), []
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    todo += re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", comps[name])
    for dtype, dims in _ALL_GATHER.findall(comps[name]):
      found.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return found


def test_loop_all_gathers_parses_while_bodies():
  hlo = """HloModule m

%fused (p: f32[4,8]) -> f32[8,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %ag.2 = f32[8,8]{1,0} all-gather(%p), dimensions={0}
}

%body (s: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %s = (s32[], f32[4,8]) parameter(0)
  %f = f32[8,8]{1,0} fusion(%x), kind=kLoop, calls=%fused
  %ag.1 = s32[16,1]{1,0} all-gather(%y), dimensions={0}
  ROOT %t = (s32[], f32[4,8]) tuple(%a, %b)
}

ENTRY %main (a: f32[4,8]) -> f32[16,8] {
  %ag.0 = f32[16,8]{1,0} all-gather(%a), dimensions={0}
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body
}
"""
  assert sorted(loop_all_gathers(hlo)) == [("f32", (8, 8)), ("s32", (16, 1))]


def _param_shapes(cfg):
  """Shapes of every parameter, stacked [L, ...] and per layer."""
  shapes = set()
  for x in jax.tree.leaves(models.abstract_params(cfg)):
    shapes |= {tuple(x.shape), tuple(x.shape[1:])}
  return shapes


@pytest.mark.parametrize("mesh_shape,placement", [((1, 8, 1), "auto"), ((1, 2, 4), "tensor")])
def test_decode_loop_has_no_weight_all_gather(setup, mesh_shape, placement):
  """FSDP-sharded params: the compiled decode loop never gathers a weight, and the
  rollouts equal the single-device ones, with the stacked (scan_layers) params."""
  params, ids, mask = setup
  cfg_model = dataclasses.replace(CFG, scan_layers=True)
  mesh = shd.make_mesh(tuple(zip(("data", "fsdp", "tensor"), mesh_shape)), devices=jax.devices())
  sparams = jax.device_put(params, models.param_shardings(cfg_model, mesh))
  cfg = rollout.SamplingConfig(max_new_tokens=T, num_samples=8, temperature=1.0)
  fn = jax.jit(lambda p, i, m, k: rollout.generate(cfg_model, p, i, m, k, cfg, mesh=mesh,
                                                   placement=placement))
  text = fn.lower(sparams, ids, mask, jax.random.key(2)).compile().as_text()
  gathers = loop_all_gathers(text)
  weights = _param_shapes(cfg_model)
  assert not [g for g in gathers if g[0] == "f32" and g[1] in weights], gathers
  got = fn(sparams, ids, mask, jax.random.key(2))
  ref = rollout.generate(cfg_model, params, ids, mask, jax.random.key(2), cfg)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  # tensor-sharded reductions sum in another order: tokens equal, log-probs to float32 noise
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=5e-5)
