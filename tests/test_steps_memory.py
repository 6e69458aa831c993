"""steps.py memory wiring: chunked head, LoRA dropout, reference log-probs once per batch.

Each knob must leave the values of the step unchanged (or, for dropout, change
only what dropout can change).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safecrs_jax import config as config_lib
from safecrs_jax import models
from safecrs_jax.models import lora
from safecrs_jax.rl import policy_loss, steps
from safecrs_jax.train import optim
from safecrs_jax.train import state as ts

CFG = models.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                         scan_layers=False)


def _sft_batch(a, m, t, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, CFG.vocab_size, (a, m, t)).astype(np.int32)
  lens = rng.integers(t // 3, t + 1, (a, m))
  prompt = rng.integers(1, t // 3, (a, m))
  pos = np.arange(t)
  attn = (pos < lens[..., None]).astype(np.int32)
  loss = (attn * (pos >= prompt[..., None])).astype(np.int32)
  return steps.TokenBatch(input_ids=ids, attention_mask=attn, loss_mask=loss)


def _sft_step(cfg=CFG, rank=0, **kw):
  tx = optax.sgd(1.0)            # the update is the gradient itself
  sched = optax.constant_schedule(1.0)
  params = models.init_params(cfg, jax.random.key(0))
  lora_p = lora.init(params, rank, ("q_proj", "v_proj"), jax.random.key(1)) if rank else None
  state = ts.create(params, tx, lora_p)
  step = jax.jit(functools.partial(steps.sft_train_step, model_cfg=cfg, tx=tx, schedule=sched,
                                   lora_scale=2.0 if rank else None, **kw))
  return state, step


@pytest.mark.parametrize("tied,chunk", [(False, 5), (True, 7), (False, 64)])
def test_chunked_sft_step_equals_full_logits(tied, chunk):
  cfg = models.ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": tied})
  batch = _sft_batch(2, 3, 17)
  state, full = _sft_step(cfg)
  _, chunked = _sft_step(cfg, logits_chunk=chunk)
  s0, m0 = full(state, batch, jax.random.key(2))
  s1, m1 = chunked(state, batch, jax.random.key(2))
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-5)
  assert m1["loss_tokens"] == m0["loss_tokens"] == batch.loss_mask[:, :, 1:].sum()
  # SGD(1): new params = params - grad, so equal params mean equal gradients.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), s1.params, s0.params)
  ev0 = steps.sft_eval_step(s0, jax.tree.map(lambda x: x[0], batch), model_cfg=cfg)
  ev1 = steps.sft_eval_step(s0, jax.tree.map(lambda x: x[0], batch), model_cfg=cfg,
                            logits_chunk=chunk)
  np.testing.assert_allclose(ev1, ev0, rtol=1e-6)


def test_lora_dropout_changes_only_what_dropout_can():
  batch = _sft_batch(2, 2, 12, seed=3)
  state, plain = _sft_step(rank=4)
  _, drop = _sft_step(rank=4, lora_dropout=0.5)
  s0, m0 = plain(state, batch, jax.random.key(5))
  s1, m1 = drop(state, batch, jax.random.key(5))
  s2, _ = drop(state, batch, jax.random.key(5))
  s3, _ = drop(state, batch, jax.random.key(6))
  # lora_b starts at 0: the adapter adds nothing, with or without dropout on its input,
  # so the loss and the gradient of lora_a (which flows through lora_b) are unchanged ...
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
  a0 = s0.lora["layers"]["self_attn"]["q_proj"]
  a1 = s1.lora["layers"]["self_attn"]["q_proj"]
  np.testing.assert_allclose(a1["lora_a"], a0["lora_a"], atol=1e-7)
  # ... while lora_b's gradient (dropout(x) A)^T dy sees the dropped inputs.
  assert np.abs(np.asarray(a1["lora_b"]) - np.asarray(a0["lora_b"])).max() > 1e-4
  jax.tree.map(np.testing.assert_array_equal, s2.lora, s1.lora)          # same key, same masks
  diff = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), s3.lora, s1.lora)
  assert max(jax.tree.leaves(diff)) > 1e-4                                 # another step key
  jax.tree.map(np.testing.assert_array_equal, s1.params, state.params)    # frozen base


def test_lora_dropout_grads_are_the_mean_of_masked_grads_hand_checked():
  """One micro-batch: the step equals a hand-built SGD step on batch_nll with its dropout key."""
  batch = _sft_batch(1, 2, 10, seed=4)
  state, drop = _sft_step(rank=2, lora_dropout=0.3)
  state = state.replace(lora=jax.tree.map(lambda x: jnp.full_like(x, 0.05), state.lora))
  s1, m1 = drop(state, batch, jax.random.key(9))
  key = jax.random.split(jax.random.fold_in(jax.random.key(9), 0), 1)[0]
  mb = jax.tree.map(lambda x: x[0], batch)

  def loss(lp):
    s, n = steps.batch_nll(state.params, lp, mb, model_cfg=CFG, lora_scale=2.0,
                           lora_dropout=0.3, dropout_rng=key)
    return s / n
  value, grads = jax.value_and_grad(loss)(state.lora)
  np.testing.assert_allclose(m1["loss"], value, rtol=1e-6)
  expect = jax.tree.map(lambda p, g: p - g, state.lora, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.lora, expect)


# -- Safe-GDPO ------------------------------------------------------------------

def full_forward_logprobs(model_cfg, params, prompt_ids, prompt_mask, completion_ids,
                          completion_mask, temperature):
  """Reference for steps.completion_logprobs: log pi(completion token) of the tempered model
  from the full [n, P+T, V] logits of one forward. [n, T] float32, 0 off the mask."""
  ids = jnp.concatenate([prompt_ids, completion_ids], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.int32)
  p, t = prompt_ids.shape[1], completion_ids.shape[1]
  logits = models.forward(model_cfg, params, ids, mask)[:, p - 1:p + t - 1]       # [n, T, V]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  out = jnp.take_along_axis(logp, completion_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return out * completion_mask.astype(jnp.float32)


def _gdpo_inputs(m=2, n=4, p=5, t=6):
  cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, scan_layers=False)
  params = models.init_params(cfg, jax.random.key(0))
  ocfg = config_lib.Optim(lr=1e-2, schedule="constant", warmup_ratio=0.0, b1=0.9, b2=0.99,
                          eps=1e-8, weight_decay=0.0, grad_clip=1.0)
  tx, sched = optim.make_optimizer(ocfg, 10)
  rng = np.random.default_rng(0)
  pm = np.ones((m, n, p), np.int32)
  pm[:, ::3, :2] = 0
  pi = rng.integers(1, 64, size=(m, n, p)).astype(np.int32) * pm
  ci = rng.integers(1, 64, size=(m, n, t)).astype(np.int32)
  cm = (np.arange(t) < rng.integers(1, t + 1, size=(m, n, 1))).astype(np.int32)
  old = jax.vmap(lambda a, b, c, d: steps.completion_logprobs(cfg, params, a, b, c, d, 0.8))(
      pi, pm, ci, cm)
  batch = steps.RolloutBatch(
      prompt_ids=pi, prompt_mask=pm, completion_ids=ci, completion_mask=cm,
      old_logp=np.asarray(old) + rng.normal(scale=0.05, size=(m, n, t)).astype(np.float32) * cm,
      advantages=rng.normal(size=(m, n)).astype(np.float32))
  return cfg, params, tx, sched, batch


@pytest.mark.parametrize("chunk", [0, 4])
def test_completion_logprobs_equal_full_forward(chunk):
  cfg, params, _, _, b = _gdpo_inputs()
  want = full_forward_logprobs(cfg, params, b.prompt_ids[0], b.prompt_mask[0],
                               b.completion_ids[0], b.completion_mask[0], 0.8)
  got = steps.completion_logprobs(cfg, params, b.prompt_ids[0], b.prompt_mask[0],
                                  b.completion_ids[0], b.completion_mask[0], 0.8,
                                  logits_chunk=chunk)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.all(np.asarray(got)[b.completion_mask[0] == 0] == 0)


@pytest.mark.parametrize("chunk", [0, 4])
def test_precomputed_reference_logprobs_equal_the_old_path(chunk):
  cfg, params, tx, sched, batch = _gdpo_inputs()
  ref = jax.tree.map(lambda x: x * 1.01, params)
  lcfg = policy_loss.LossConfig(beta=0.1)
  step = jax.jit(functools.partial(steps.gdpo_train_step, model_cfg=cfg, loss_cfg=lcfg, tx=tx,
                                   schedule=sched, temperature=0.8, logits_chunk=chunk))
  state = ts.create(params, tx)
  s_old, m_old = step(state, ref, batch)
  ref_logp = jax.jit(functools.partial(steps.reference_logprobs, model_cfg=cfg, temperature=0.8,
                                       logits_chunk=chunk))(ref, batch)
  assert ref_logp.shape == batch.completion_ids.shape
  want = jax.vmap(lambda a, b, c, d: full_forward_logprobs(cfg, ref, a, b, c, d, 0.8))(
      batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
  np.testing.assert_allclose(ref_logp, want, atol=1e-5)
  s_new, m_new = step(state, None, batch.replace(ref_logp=ref_logp))
  assert float(m_old["kl"]) > 0
  for k in m_old:
    np.testing.assert_allclose(m_new[k], m_old[k], rtol=1e-5, atol=1e-7, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s_new.params,
               s_old.params)
  with pytest.raises(ValueError, match="ref_logp"):
    step(state, None, batch)
