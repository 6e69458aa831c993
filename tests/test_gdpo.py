"""Safe-GDPO advantages and policy loss against hand / numpy computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safecrs_jax.rl import advantages, policy_loss, rank_items, steps

E = advantages.ADV_EPS
# Jitted once per shape: far fewer compilations than op-by-op eager dispatch.
_adv = jax.jit(advantages.compute_advantages, static_argnums=(1, 3))
_diag = jax.jit(advantages.advantage_diagnostics, static_argnums=1)


def advs(rewards, group_size, weights=None, mode="gdpo"):
  return np.asarray(_adv(np.asarray(rewards, np.float32), group_size, weights, mode))


def step_loss(logp, old_logp, ref_logp, advantages, mask, cfg):
  """The loss of one micro-batch holding a whole step, and its token-mean metrics."""
  loss, sums = policy_loss.micro_batch_loss(
      logp, old_logp, ref_logp, advantages, mask, cfg,
      total_tokens=jnp.sum(mask).astype(jnp.float32), total_seqs=logp.shape[0], num_micro=1)
  tok = jnp.maximum(sums["tokens"], 1.0)
  return loss, {k: sums[k] / tok for k in policy_loss.CLIP_TERMS}


def diag(rewards, group_size, weights=None):
  return jax.device_get(_diag(np.asarray(rewards, np.float32), group_size, weights))


def _np_group_norm(x, g):
  x = np.asarray(x, np.float64).reshape(-1, g)
  m = x.mean(1, keepdims=True)
  s = x.std(1, ddof=1, keepdims=True)
  return ((x - m) / (s + E)).reshape(-1)


def test_gdpo_hand_computed():
  # One group of 4, one reward [1, 0, 0, 0]: mean .25, unbiased std .5.
  r = np.array([[1.0], [0.0], [0.0], [0.0]])
  adv = advs(r, 4, mode="grpo")
  np.testing.assert_allclose(adv, np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + E), rtol=1e-6)
  # gdpo adds the batch-level step: (a - mean) / (std + eps) over all rows.
  a1 = np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + E)
  want = (a1 - a1.mean()) / (a1.std(ddof=1) + E)
  np.testing.assert_allclose(advs(r, 4), want, rtol=1e-5)


def test_gdpo_two_rewards_weights_and_batch_norm():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(12, 2)).round(1)
  w = np.array([1.0, 0.5])
  pre = _np_group_norm(r[:, 0], 3) * w[0] + _np_group_norm(r[:, 1], 3) * w[1]
  want = (pre - pre.mean()) / (pre.std(ddof=1) + E)
  got = advs(r, 3, w, "gdpo")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  want_grpo = _np_group_norm(r @ w, 3)
  np.testing.assert_allclose(advs(r, 3, w, "grpo"), want_grpo, rtol=1e-5, atol=1e-6)


def test_grpo_collapses_where_gdpo_separates():
  # Rows 0 = (1, 0) and 1 = (0, 1) have the same sum, so GRPO gives them one
  # advantage; per-reward normalisation sees reward 2 is common in this group.
  r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
  grpo = advs(r, 4, mode="grpo")
  gd = advs(r, 4, mode="gdpo")
  assert grpo[0] == pytest.approx(grpo[1])
  assert abs(gd[0] - gd[1]) > 0.2
  # Hand values before the batch step: r1 -> ±.5/.57735, r2 -> [-.75, .25, .25, .25]/.5
  s1, s2 = np.sqrt(1 / 3) + E, 0.5 + E
  pre = np.array([0.5 / s1 - 0.75 / s2, -0.5 / s1 + 0.25 / s2, 0.5 / s1 + 0.25 / s2, -0.5 / s1 + 0.25 / s2])
  np.testing.assert_allclose(gd, (pre - pre.mean()) / (pre.std(ddof=1) + E), rtol=1e-5)
  d = diag(r, 4)
  assert float(d["collapse_grpo"]) == 1.0 and float(d["collapse_gdpo"]) == 0.0


def test_registry_entry_says_which_rewards_a_mode_takes():
  seq, ranked = np.zeros((4, 2), np.float32), np.zeros((4, 2, 3), np.float32)
  assert {m for m, e in advantages.ADVANTAGES.items() if e.per_rank} == {"rank",
                                                                          "rank_no_batch_norm"}
  for mode, entry in advantages.ADVANTAGES.items():
    takes, other = (ranked, seq) if entry.per_rank else (seq, ranked)
    assert advs(takes, 2, mode=mode).shape == ((4, 3) if entry.per_rank else (4,))
    with pytest.raises(ValueError, match="rewards must be"):
      advs(other, 2, mode=mode)


def test_zero_variance_groups():
  # Group 0 constant in both rewards -> 0; group 1 varies in reward 0 only.
  r = np.array([[1.0, -1.0], [1.0, -1.0], [0.0, 0.0], [1.0, 0.0]])
  adv = advs(r, 2, mode="grpo")
  np.testing.assert_allclose(adv[:2], 0.0, atol=1e-7)
  assert adv[3] > 0 > adv[2]
  d = diag(r, 2)
  np.testing.assert_allclose(d["zero_var_groups"], [0.5, 1.0])
  np.testing.assert_allclose(d["reward_mean"], [0.75, -0.5])
  np.testing.assert_allclose(d["reward_std"], [np.std([1, 1, 0, 1], ddof=1), np.std([-1, -1, 0, 0], ddof=1)], rtol=1e-6)


def test_nan_rewards_are_missing():
  nan = np.nan
  r = np.array([[1.0, nan], [0.0, -1.0], [nan, nan], [0.0, 0.0],   # group 0
                [nan, nan], [nan, nan], [nan, nan], [nan, nan]])   # group 1: all missing
  for mode in ("gdpo", "grpo"):
    adv = advs(r, 4, mode=mode)
    assert np.all(np.isfinite(adv)), mode
    np.testing.assert_array_equal(adv[[2, 4, 5, 6, 7]], 0.0)
  # gdpo by hand: reward 0 over rows {0,1,3}: [1,0,0]; reward 1 over {1,3}: [-1,0].
  a0 = _np_group_norm([1.0, 0.0, 0.0], 3)
  a1 = _np_group_norm([-1.0, 0.0], 2)
  pre = np.array([a0[0], a0[1] + a1[0], a0[2] + a1[1]])
  want = (pre - pre.mean()) / (pre.std(ddof=1) + E)
  np.testing.assert_allclose(advs(r, 4)[[0, 1, 3]], want, rtol=1e-5)
  # grpo: row 0's missing reward 1 is imputed with the group mean -0.5.
  s = np.array([1.0 - 0.5, -1.0, 0.0])
  np.testing.assert_allclose(advs(r, 4, mode="grpo")[[0, 1, 3]],
                             _np_group_norm(s, 3), rtol=1e-5)
  d = diag(r, 4)
  np.testing.assert_allclose(d["reward_missing"], [5 / 8, 6 / 8])


def test_rank_mode_without_batch_norm():
  # (the reference "rank" adds a batch step: tests/test_fidelity.py)
  # 2 groups x 2 rollouts, 1 reward, 3 ranks; normalised per group and rank.
  r = np.array([[[1.0, 0.0, 0.5]], [[0.0, 0.0, 1.5]], [[2.0, 1.0, 1.0]], [[0.0, 3.0, np.nan]]])
  adv = advs(r, 2, mode="rank_no_batch_norm")
  assert adv.shape == (4, 3)
  for g in range(2):
    for k in range(3):
      col = r[2 * g:2 * g + 2, 0, k]
      if np.isnan(col).any():
        np.testing.assert_allclose(adv[2 * g:2 * g + 2, k], 0.0)
      else:
        np.testing.assert_allclose(adv[2 * g:2 * g + 2, k], _np_group_norm(col, 2), rtol=1e-5)
  w = np.array([1.0, 2.0])
  r2 = np.concatenate([r, 0.5 * r], 1)  # [4, 2, 3]
  want = adv + 2 * advs(0.5 * r, 2, mode="rank_no_batch_norm")
  np.testing.assert_allclose(advs(r2, 2, w, "rank_no_batch_norm"), want, rtol=1e-5)
  assert "collapse_rank" in diag(r2, 2, w)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="multiple of group_size"):
    advantages.compute_advantages(np.zeros((5, 2)), 2)
  with pytest.raises(ValueError, match="one per reward"):
    advantages.compute_advantages(np.zeros((4, 2)), 2, weights=[1.0])
  with pytest.raises(ValueError, match="rank"):
    advantages.compute_advantages(np.zeros((4, 2)), 2, mode="rank")


# ----------------------------------------------------------------------------- loss

def _np_loss(logp, old, ref, adv, mask, beta, el, eh, level, agg):
  mask = mask.astype(np.float64)
  lr = logp - old
  if level == "sequence":
    lr = np.repeat((lr * mask).sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1), logp.shape[1], 1)
  ratio = np.exp(lr)
  a = adv[:, None] if adv.ndim == 1 else adv
  per = -np.minimum(ratio * a, np.clip(ratio, 1 - el, 1 + eh) * a)
  kl = np.exp(ref - logp) - (ref - logp) - 1
  per = (per + beta * kl) * mask
  if agg == "dapo" or agg == "bnpo":
    return per.sum() / mask.sum()
  if agg == "grpo":
    return np.mean(per.sum(1) / np.maximum(mask.sum(1), 1))
  return per.sum() / (logp.shape[0] * logp.shape[1])


def _fixed_batch(seed=0, n=4, t=6):
  rng = np.random.default_rng(seed)
  old = -rng.uniform(0.1, 3.0, size=(n, t))
  logp = old + rng.normal(scale=0.3, size=(n, t))
  ref = old + rng.normal(scale=0.3, size=(n, t))
  adv = rng.normal(size=(n,))
  lens = rng.integers(1, t + 1, size=(n,))
  mask = (np.arange(t)[None] < lens[:, None]).astype(np.float32)
  return logp, old, ref, adv, mask


@pytest.mark.parametrize("level", policy_loss.IS_LEVELS)
@pytest.mark.parametrize("agg", policy_loss.LOSS_AGGS)
def test_loss_matches_numpy(level, agg):
  logp, old, ref, adv, mask = _fixed_batch()
  cfg = policy_loss.LossConfig(beta=0.04, eps_low=0.1, eps_high=0.25, importance_sampling=level, loss_agg=agg)
  got = step_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask)), cfg)[0]
  want = _np_loss(logp, old, ref, adv, mask, 0.04, 0.1, 0.25, level, agg)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_micro_batch_shares_sum_to_step_loss():
  logp, old, ref, _, mask = _fixed_batch(1, n=6, t=5)
  adv = np.random.default_rng(2).normal(size=(6, 5))  # per-token (rank mode)
  args = [jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask)]
  for agg in policy_loss.LOSS_AGGS:
    cfg = policy_loss.LossConfig(loss_agg=agg, importance_sampling="token")
    shares = [policy_loss.micro_batch_loss(*(a[i:i + 2] for a in args), cfg, total_tokens=mask.sum(),
                                    total_seqs=6, num_micro=3)[0] for i in (0, 2, 4)]
    if agg == "bnpo":
      want = np.mean([_np_loss(logp[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                               1e-3, .2, .2, "token", "bnpo") for i in (0, 2, 4)])
    else:
      want = _np_loss(logp, old, ref, adv, mask, 1e-3, .2, .2, "token", agg)
    np.testing.assert_allclose(float(sum(shares)), want, rtol=1e-5, err_msg=agg)


def test_zero_advantage_zero_gradient():
  logp, old, _, _, mask = _fixed_batch(3)
  cfg = policy_loss.LossConfig(beta=0.0)
  g = jax.grad(lambda lp: step_loss(lp, jnp.asarray(old, jnp.float32), None,
                                          jnp.zeros(4), jnp.asarray(mask), cfg)[0])(jnp.asarray(logp, jnp.float32))
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_clip_fractions():
  # Token-level ratios e^{±0.5} (1.65 / 0.61) and 1.0, advantages of both signs.
  lr = np.array([[0.5, -0.5, 0.0, 0.5], [0.5, -0.5, 0.0, 0.0]])
  adv = np.array([1.0, -1.0])
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
  old = np.full_like(lr, -1.0)
  cfg = policy_loss.LossConfig(beta=0.0, importance_sampling="token")
  _, m = step_loss(jnp.asarray(old + lr, jnp.float32), jnp.asarray(old, jnp.float32), None,
                          jnp.asarray(adv, jnp.float32), jnp.asarray(mask), cfg)
  # high: ratio > 1.2 with A > 0 -> row 0 tokens 0 and 3; low: ratio < .8 with A < 0 -> row 1 token 1.
  assert float(m["clip_high"]) == pytest.approx(2 / 7)
  assert float(m["clip_low"]) == pytest.approx(1 / 7)
  assert float(m["kl"]) == 0.0
  # sequence level: row 0 mean log-ratio .125 (ratio 1.13, unclipped), row 1 0.0.
  _, m = step_loss(jnp.asarray(old + lr, jnp.float32), jnp.asarray(old, jnp.float32), None,
                          jnp.asarray(adv, jnp.float32), jnp.asarray(mask), policy_loss.LossConfig(beta=0.0))
  assert float(m["clip_high"]) == 0.0 and float(m["clip_low"]) == 0.0


# ----------------------------------------------------------------------------- rank-mode token map

def test_item_index_and_token_advantages():
  nl, stop = 10, 2
  # "A\nB\nC<stop>" -> items 0 (A + \n), 1 (B + \n), 2 (C); the stop token none.
  toks = np.array([[5, nl, 6, nl, 7, stop, 0], [5, 6, nl, 7, nl, 8, 9]])
  mask = np.array([[1, 1, 1, 1, 1, 1, 0], [1] * 7])
  got = rank_items.item_index(toks, mask, [nl], [stop], rec_num=2)
  np.testing.assert_array_equal(got, [[0, 0, 1, 1, -1, -1, -1], [0, 0, 0, 1, 1, -1, -1]])
  adv = np.array([[1.0, -2.0], [3.0, 4.0]])
  np.testing.assert_array_equal(rank_items.token_advantages(adv, got),
                                [[1, 1, -2, -2, 0, 0, 0], [3, 3, 3, 4, 4, 0, 0]])
  # Parse-aware: tags and reasoning lines are not items.
  words = {20: "<reasoning>", 21: "skip Alien", 22: "</reasoning>", 23: "<solution>",
           24: "Heat (1995)", 25: "Up (2009)", 26: "</solution>", nl: "\n", stop: ""}

  def decode(ids):
    return "".join(words[i] for i in ids)

  toks = np.array([[20, 21, 22, nl, 23, nl, 24, nl, 25, nl, 26, stop]])
  got = rank_items.item_index(toks, np.ones_like(toks), [nl], [stop], rec_num=20, decode=decode)
  np.testing.assert_array_equal(got, [[-1, -1, -1, -1, -1, -1, 0, 0, 1, 1, -1, -1]])


# ----------------------------------------------------------------------------- the step

def _step_inputs(m=2, n=8, p=4, t=5):
  from safecrs_jax import config as config_lib
  from safecrs_jax import models
  from safecrs_jax.train import optim
  from safecrs_jax.train import state as ts
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
  batch = {"prompt_ids": pi, "prompt_mask": pm, "completion_ids": ci, "completion_mask": cm,
           "old_logp": np.asarray(old) + rng.normal(scale=0.05, size=(m, n, t)).astype(np.float32) * cm,
           "advantages": rng.normal(size=(m, n)).astype(np.float32)}
  return cfg, params, tx, sched, ts.create(params, tx), steps.RolloutBatch(**batch)


def test_sharded_step_equals_single_device():
  import functools

  from jax.sharding import NamedSharding, PartitionSpec

  from safecrs_jax import models
  from safecrs_jax.infra import sharding as shd
  from safecrs_jax.train import state as ts
  cfg, params, tx, sched, state, batch = _step_inputs()
  lcfg = policy_loss.LossConfig(beta=0.1)
  step = functools.partial(steps.gdpo_train_step, model_cfg=cfg, loss_cfg=lcfg, tx=tx, schedule=sched,
                           temperature=0.8)
  ref = jax.tree.map(lambda x: x * 1.01, params)
  s1, m1 = jax.jit(step)(state, ref, batch)
  assert 0.5 < float(m1["ratio"]) < 1.5 and float(m1["kl"]) > 0
  assert set(m1) == set(policy_loss.LOSS_METRICS) | {"lr", "tokens"}   # the names the stage logs

  mesh = shd.make_mesh((("data", 2), ("fsdp", 4), ("tensor", 1)), devices=jax.devices())
  st_sh = ts.shardings(jax.eval_shape(lambda: state), models.param_logical_axes(cfg), mesh)
  p_sh = st_sh.params
  b_sh = jax.tree.map(lambda v: NamedSharding(
      mesh, PartitionSpec(None, shd.BATCH_AXES, *([None] * (np.ndim(v) - 2)))), batch)
  repl = NamedSharding(mesh, PartitionSpec())
  sharded = jax.jit(functools.partial(step, mesh=mesh), in_shardings=(st_sh, p_sh, b_sh),
                    out_shardings=(st_sh, repl))
  s8, m8 = sharded(jax.device_put(state, st_sh), jax.device_put(ref, p_sh), jax.device_put(batch, b_sh))
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # Adam divides by sqrt(v): tiny gradients amplify float noise; the update itself is ~1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), s8.params, s1.params)
  assert int(s8.step) == 1
