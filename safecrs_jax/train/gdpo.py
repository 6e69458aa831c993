"""Safe-GDPO: the stage's setup, the body of one loop step, and `train`.

    summary = gdpo.train(config, workdir)     # runs or resumes the stage

One loop step, top to bottom (`Run.step`), each line naming the module doing it:
  prompts   the step's prompt rows (epoch permutation, drop-last)   Run.prompt_indices
  tokens    chat template, left padding, buckets                    tokens.encode_prompts
  rollouts  G samples per prompt, KV-cache decode, log-probs        rollout.generate
  text      completions decoded on the host                         Run.score
  rewards   registered reward functions by name                     saferec.reward_table
  advantages per-reward group normalisation (gdpo / grpo / rank)    advantages.compute_advantages
  (rank)    token -> list item map                                  rank_items.item_index
  update    mu clipped-objective updates with KL to the reference  steps.gdpo_train_step
and `train` hands the Run to train_loop.run_loop (logging, checkpoints,
preemption). Resuming replays the same trajectory: prompt order from (seed,
epoch) permutations, rollout keys fold_in(seed key, loop step, chunk).

Shape letters (package legend): a loop step rolls out step_prompts prompts,
G samples each (a group = G consecutive rows), and the learner takes them as
A = grad_accum micro-batches of B = micro_rows rows (`batch_geometry`):
rollout arrays are [A, B, ...]; R rewards; I ranked items (rec_num); P prompt
tokens; T completion tokens.
"""
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from safecrs_jax import config as config_lib
from safecrs_jax import models, saferec
from safecrs_jax.data import assets, tokens
from safecrs_jax.infra import chips, flops, provenance, run_lock, storage
from safecrs_jax.infra import sharding as shd
from safecrs_jax.rl import advantages, policy_loss, rank_items, rollout, steps
from safecrs_jax.saferec.relational import training as rel_training
from safecrs_jax.train import checkpoint, loop, optim, policy
from safecrs_jax.train import state as ts


def loss_config(gcfg):
  """policy_loss.LossConfig from the gdpo config section."""
  return policy_loss.LossConfig(beta=float(gcfg.beta), eps_low=float(gcfg.eps_low),
                                eps_high=float(gcfg.eps_high),
                                importance_sampling=str(gcfg.importance_sampling),
                                loss_agg=str(gcfg.loss_agg))


def reward_settings(gcfg):
  """saferec.RewardSettings from the gdpo config section."""
  return saferec.RewardSettings(
      rec_num=int(gcfg.rec_num), lambda_safe=float(gcfg.lambda_safe),
      penalty_safe=float(gcfg.penalty_safe), target_count=int(gcfg.target_count),
      lambda_count=float(gcfg.lambda_count), relevance=str(gcfg.relevance),
      rank_reward=str(gcfg.rank_reward), year_order=str(gcfg.year_order),
      discount_safety=bool(gcfg.rank_discount_safety))


def check_config(g):
  """Validates the gdpo section; returns True when advantages are per rank."""
  if g.advantage_mode not in advantages.ADVANTAGES:
    raise ValueError(f"gdpo.advantage_mode must be one of {advantages.ADVANTAGE_MODES}, "
                     f"got {g.advantage_mode!r}")
  if len(g.rewards) != len(g.reward_weights):
    raise ValueError(f"gdpo.rewards {tuple(g.rewards)} and gdpo.reward_weights "
                     f"{tuple(g.reward_weights)} must have the same length")
  per_rank = advantages.ADVANTAGES[g.advantage_mode][1] == 3
  table = saferec.RANK_REWARDS if per_rank else saferec.SEQUENCE_REWARDS
  if not set(g.rewards) <= set(table):
    kind = "per-rank forms" if per_rank else "sequence forms"
    raise ValueError(f"gdpo.advantage_mode={g.advantage_mode!r} has {kind} of "
                     f"{sorted(table)} only, got rewards {tuple(g.rewards)}")
  if int(g.mu) < 1:
    raise ValueError(f"gdpo.mu must be >= 1, got {int(g.mu)}")
  return per_rank


BATCH_UNITS = ("completions", "prompts")


def batch_geometry(g, dp):
  """How a loop step's rollouts are generated and cut into learner micro-batches.

  g: the gdpo config section; dp: data-parallel devices. gdpo.batch_size counts
  completions per device per micro-batch (batch_unit "completions", TRL's
  per_device_train_batch_size, the reference: 4 x 8 accumulation with G = 8 is
  4 prompts per device per optimizer step) or prompts (batch_unit "prompts":
  batch_size x G completions). Returns group, accum (A), micro_rows (global
  rows per micro-batch), step_prompts, and the rollout chunks: as many calls as
  possible up to A, each with a whole number of prompts per device (rollout
  memory scales with a call's rows; gdpo.rollout_chunks > 0 forces a count).
  """
  group, accum, unit = int(g.group_size), int(g.grad_accum), str(g.batch_unit)
  if unit not in BATCH_UNITS:
    raise ValueError(f"gdpo.batch_unit must be one of {BATCH_UNITS}, got {unit!r}")
  micro_rows = int(g.batch_size) * dp * (group if unit == "prompts" else 1)
  if (micro_rows * accum) % group:
    raise ValueError(f"gdpo: {micro_rows * accum} completions per step (batch_size "
                     f"{int(g.batch_size)} x {dp} devices x grad_accum {accum}) are not whole "
                     f"groups of group_size={group}")
  step_prompts = micro_rows * accum // group
  chunks = int(g.rollout_chunks)
  if chunks <= 0:
    chunks = max(c for c in range(1, accum + 1)
                 if step_prompts % c == 0 and (step_prompts // c) % dp == 0) \
        if step_prompts % dp == 0 else 1
  if step_prompts % chunks or (step_prompts // chunks) % dp:
    raise ValueError(f"gdpo: {step_prompts} prompts per step do not split into {chunks} rollout "
                     f"chunks of a multiple of {dp} devices; change gdpo.rollout_chunks, "
                     "batch_size or grad_accum")
  return {"group": group, "accum": accum, "micro_rows": micro_rows,
          "step_prompts": step_prompts, "chunks": chunks, "chunk_prompts": step_prompts // chunks}


def rollout_svr(violations, lengths):
  """[B] per-rollout violation ratio: violating items / items (0 for an empty list)."""
  v = np.asarray(violations).sum(1)
  n = np.asarray(lengths)
  return np.where(n > 0, v / np.maximum(n, 1), 0.0)


def rollout_stats(parsed, rows, oracle, rec_num):
  """Host metrics of a rollout batch: SVR, hit rate, list length, unknown and unparsed shares."""
  o_rows = oracle.rows(parsed, rec_num)                                     # [B, I]
  viol = oracle.trait_violations(o_rows, oracle.masks([r["constraints"] for r in rows])).any(-1)
  n_items = np.array([min(len(p), rec_num) for p in parsed])
  present = np.arange(rec_num)[None] < n_items[:, None]
  unknown = ((o_rows == oracle.unknown_row) & present).sum() / max(present.sum(), 1)
  hit = saferec.relevance_reward(parsed, rows, rec_num)
  return {"rollout/svr": float(rollout_svr(viol, n_items).mean()),
          "rollout/hit": float(hit.mean()),
          "rollout/num_items": float(n_items.mean()),
          "rollout/unknown": float(unknown),
          "rollout/unparsed": float((n_items == 0).mean())}


class Run:
  """Everything `train` builds before looping (tests and benchmarks use the pieces)."""

  def __init__(self, config, workdir):
    config = config_lib.resolve(config)      # a ConfigDict: checked and typed here
    self.config, self.workdir = config, storage.resolve(workdir)
    self.summary = {"history": []}   # train() replaces it with the full summary
    self.notify = print               # train() routes notices through the progress bar
    g = self.gcfg = config.gdpo
    self.per_rank = check_config(g)
    self.loss_cfg, self.mu = loss_config(g), int(g.mu)
    self.rewards = reward_settings(g)
    self.mesh, self.rules = shd.mesh_from_config(config)
    self.data_dir = assets.resolve_data_dir(config)
    self.rows = saferec.load_split(self.data_dir, "train", stage="grpo",
                                   strict=config.data.strict)
    self.oracle = saferec.load_oracle(self.data_dir, float(config.data.risk_threshold))
    self.mix = rel_training.from_config(self.rows, self.oracle, config.data)   # None when off
    self.rows = self.mix.rows if self.mix else self.rows
    if not g.init_checkpoint and jax.process_index() == 0:
      print("gdpo: WARNING: gdpo.init_checkpoint is empty: training from "
            + (f"the base model {config.model.hf_dir}" if config.model.hf_dir else
               f"a RANDOM init of preset {config.model.preset!r}")
            + ", not from a Safe-SFT checkpoint", flush=True)
    pol = policy.load_policy(config, g.init_checkpoint, self.mesh, self.rules,
                             data_dir=self.data_dir)
    self.init_identity = policy.source_identity(config, g.init_checkpoint)
    self.model_cfg, self.tokenizer = pol.model_cfg, pol.tokenizer
    self._batch_geometry()
    self.sampling = rollout.SamplingConfig(
        max_new_tokens=int(g.max_completion_length), num_samples=self.group,
        temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k),
        stop_ids=tokens.stop_token_ids(self.tokenizer), pad_id=tokens.pad_id(self.tokenizer))
    self.temperature = float(g.temperature) if float(g.temperature) > 0 else 1.0
    self.weights = np.asarray(g.reward_weights, np.float32)
    self.newline_ids = rank_items.newline_token_ids(self.tokenizer) if self.per_rank else None
    self.tx, self.schedule = optim.make_optimizer(config.optim, self.num_steps * self.mu)
    self._build_state(pol.params)
    loop.write_run_files(self.workdir, config, self.model_cfg, self.tokenizer)
    if self.mix and jax.process_index() == 0:
      rel_training.write_manifest(self.mix, self.workdir)
    self._jit_steps()

  def _batch_geometry(self):
    geo = batch_geometry(self.gcfg, shd.data_parallel_size(self.mesh))
    self.group, self.accum = geo["group"], geo["accum"]
    self.micro_rows, self.step_prompts = geo["micro_rows"], geo["step_prompts"]
    self.chunks, self.chunk_prompts = geo["chunks"], geo["chunk_prompts"]
    self.steps_per_epoch = (self.mix.length if self.mix else len(self.rows)) // self.step_prompts
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(self.rows)} GDPO prompts < one step of {self.step_prompts} "
                       "(gdpo.batch_size x devices x grad_accum, see gdpo.batch_unit); lower "
                       "gdpo.batch_size / grad_accum")
    self.num_steps = self.total_steps = int(self.gcfg.num_steps)

  def _build_state(self, params):
    """Restores the latest checkpoint, or starts from `params`; keeps the reference."""
    abstract = jax.eval_shape(lambda p: ts.create(p, self.tx),
                              models.abstract_params(self.model_cfg))
    self.state_shardings = ts.shardings(abstract, models.param_logical_axes(self.model_cfg),
                                        self.mesh, self.rules)
    self.abstract_state = ts.with_shardings(abstract, self.state_shardings)
    self.fingerprint = loop.stage_fingerprint(
        self.config, "gdpo", self.model_cfg, data=provenance.data_fingerprint(self.data_dir),
        tokenizer=provenance.tokenizer_hash(self.tokenizer), init=self.init_identity,
        step_prompts=self.step_prompts, group_size=self.group, mu=self.mu,
        seed=int(self.config.seed), **({"relational_mix": self.mix.settings} if self.mix else {}))
    self.ckpt = loop.open_checkpointer(self.config, self.workdir)
    self.root_key = jax.random.key(int(self.config.seed))
    copy = jax.jit(lambda p: ts.create(jax.tree.map(jnp.copy, p), self.tx),
                   out_shardings=self.state_shardings)
    self.state, data = loop.restore_or_init(
        self.ckpt, self.abstract_state, self.fingerprint, lambda: copy(params),
        overwrite=bool(self.config.checkpoint.overwrite))
    self.start_step = 0 if data is None else int(data["step"])
    if int(jax.device_get(self.state.step)) != self.start_step * self.mu:
      raise checkpoint.CheckpointError(
          f"checkpoint in {self.ckpt.directory}: optimizer step {int(self.state.step)} != "
          f"loop step {self.start_step} x mu {self.mu}")
    self.ref_params = params if self.loss_cfg.beta > 0 else None

  def _jit_steps(self):
    self.prompt_sharding = shd.batch_sharding(self.mesh, 2)
    sh3 = shd.batch_sharding(self.mesh, 3, batch_dim=1)
    adv_sh = shd.batch_sharding(self.mesh, 3 if self.per_rank else 2, batch_dim=1)
    beta = self.ref_params is not None
    self.batch_shardings = steps.RolloutBatch(sh3, sh3, sh3, sh3, sh3, adv_sh,
                                              sh3 if beta else None)
    p_sh = models.param_shardings(self.model_cfg, self.mesh, self.rules)
    kw = dict(model_cfg=self.model_cfg, temperature=self.temperature, mesh=self.mesh,
              rules=self.rules, logits_chunk=int(self.config.model.logits_chunk))
    self.train_step = jax.jit(
        functools.partial(steps.gdpo_train_step, loss_cfg=self.loss_cfg, tx=self.tx,
                          schedule=self.schedule, **kw),
        in_shardings=(self.state_shardings, None, self.batch_shardings),
        out_shardings=(self.state_shardings, shd.replicated(self.mesh)), donate_argnums=0)
    # the frozen reference's log-probs: once per rollout batch, not once per update
    self.reference_logprobs = jax.jit(
        functools.partial(steps.reference_logprobs, **kw),
        in_shardings=(p_sh, self.batch_shardings.replace(ref_logp=None)), out_shardings=sh3)
    self.advantages = jax.jit(functools.partial(
        advantages.compute_advantages, group_size=self.group, mode=str(self.gcfg.advantage_mode)))
    self.diagnostics = jax.jit(functools.partial(advantages.advantage_diagnostics,
                                                 group_size=self.group))

  # -- pieces of one loop step -------------------------------------------------
  def prompt_indices(self, step):
    """[chunks, chunk_prompts] row indices of loop step `step` (epoch permutation, drop-last)."""
    epoch, index = divmod(int(step), self.steps_per_epoch)
    perm = (self.mix.order(self.config.seed, epoch, self.chunk_prompts) if self.mix else
            loop.epoch_permutation(self.config.seed, epoch, len(self.rows)))
    return perm[index * self.step_prompts:(index + 1) * self.step_prompts].reshape(
        self.chunks, self.chunk_prompts)

  def generate(self, params, idx, step):
    """Rollouts of the prompts idx [chunks, c]: dict of [A, micro_rows, ...] numpy arrays.

    The step's prompts·G rollouts (a group = G consecutive rows) are cut into
    the A learner micro-batches of micro_rows rows; a group may span two.
    """
    g = self.gcfg
    flat = [self.rows[i]["prompt"] for i in idx.reshape(-1)]
    pb = tokens.encode_prompts(self.tokenizer, flat, max_prompt_length=int(g.max_prompt_length),
                               buckets=tuple(g.prompt_buckets))
    if pb.num_truncated:
      self.notify(f"gdpo: step {step}: {pb.num_truncated} of {len(flat)} prompts were longer "
                  f"than gdpo.max_prompt_length={int(g.max_prompt_length)} and cut from the left")
    p_ids = pb.input_ids.reshape(self.chunks, self.chunk_prompts, -1)
    p_mask = pb.attention_mask.reshape(self.chunks, self.chunk_prompts, -1)
    outs = []
    for c in range(self.chunks):
      key = jax.random.fold_in(jax.random.fold_in(self.root_key, step), c)
      outs.append(jax.tree.map(shd.to_host, rollout.generate(
          self.model_cfg, params, shd.to_global(p_ids[c], self.prompt_sharding),
          shd.to_global(p_mask[c], self.prompt_sharding), key, self.sampling,
          mesh=self.mesh, rules=self.rules)))
    shape = lambda x: x.reshape((self.accum, self.micro_rows) + x.shape[1:])   # noqa: E731
    rows = lambda f: shape(np.concatenate([getattr(o, f) for o in outs]))     # noqa: E731
    return {"prompt_ids": shape(np.repeat(pb.input_ids, self.group, axis=0)),
            "prompt_mask": shape(np.repeat(pb.attention_mask, self.group, axis=0)),
            "completion_ids": rows("tokens"), "completion_mask": rows("mask"),
            "old_logp": rows("logprobs"), "truncated_prompts": pb.num_truncated}

  def score(self, batch, idx):
    """Rewards of a rollout batch: (rewards [B, R] or [B, R, I], texts, rollout metrics)."""
    ids = batch["completion_ids"].reshape(-1, batch["completion_ids"].shape[-1])
    mask = batch["completion_mask"].reshape(ids.shape)
    texts = self.tokenizer.batch_decode([row[m > 0].tolist() for row, m in zip(ids, mask)],
                                        skip_special_tokens=True)
    rows = [self.rows[i] for i in np.repeat(idx.reshape(-1), self.group)]
    parsed = saferec.parse_all(texts)
    rewards = saferec.reward_table(tuple(self.gcfg.rewards), parsed, rows, self.oracle,
                                   self.rewards, per_rank=self.per_rank)
    return rewards, texts, rollout_stats(parsed, rows, self.oracle, self.rewards.rec_num)

  def token_advantages(self, rewards, batch):
    """([A, B] or per-token [A, B, T] advantages, raw advantages, diagnostics)."""
    a, n, t = batch["completion_ids"].shape
    adv = np.asarray(self.advantages(rewards, weights=self.weights))
    diag = jax.device_get(self.diagnostics(rewards, weights=self.weights))
    if not self.per_rank:
      return adv.reshape(a, n).astype(np.float32), adv, diag
    items = rank_items.item_index(
        batch["completion_ids"].reshape(a * n, t), batch["completion_mask"].reshape(a * n, t),
        self.newline_ids, self.sampling.stop_ids, self.rewards.rec_num,
        decode=lambda x: self.tokenizer.decode(x, skip_special_tokens=True))
    return rank_items.token_advantages(adv, items).reshape(a, n, t), adv, diag

  def learner_batch(self, batch, adv):
    """steps.RolloutBatch of global arrays in the learner's shardings."""
    arrays = {k: np.asarray(batch[k]) for k in
              ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logp")}
    arrays["advantages"] = adv
    lb = jax.tree.map(shd.to_global, steps.RolloutBatch(**arrays),
                      self.batch_shardings.replace(ref_logp=None))
    if self.ref_params is not None:
      lb = lb.replace(ref_logp=self.reference_logprobs(self.ref_params, lb))
    return lb

  def data_position(self, step):
    epoch, index = divmod(int(step), self.steps_per_epoch)
    return {"step": int(step), "epoch": epoch, "index": index,
            "rng_seed": int(self.config.seed), "fingerprint": self.fingerprint}

  # -- the stage protocol of train_loop.run_loop ---------------------------------
  def step(self, state, step, timed=None):
    """One loop step: (state', (host metrics of the rollouts, learner metrics (device))).

    The learner is waited for only on timed steps (by default the logged ones),
    so that the next step's host work overlaps it elsewhere.
    """
    if timed is None:
      timed = loop.due(step + 1, max(int(self.config.log.every), 1), self.num_steps)
    if timed:
      jax.block_until_ready(state)
    t0 = time.perf_counter()
    idx = self.prompt_indices(step)
    batch = self.generate(state.params, idx, step)
    t1 = time.perf_counter()
    rewards, _, info = self.score(batch, idx)
    t2 = time.perf_counter()
    adv, raw_adv, diag = self.token_advantages(rewards, batch)
    lb = self.learner_batch(batch, adv)
    learner = []
    for _ in range(self.mu):
      state, m = self.train_step(state, None, lb)
      learner.append(m)
    host = dict(info, **self._batch_metrics(batch, raw_adv, diag))
    if timed:
      jax.block_until_ready(state.step)
      host.update(self._timings(batch, t0, t1, t2, time.perf_counter()))
    self.summary["history"].append(dict(host, step=step + 1))
    return state, (host, learner)

  def _batch_metrics(self, batch, raw_adv, diag):
    lengths = batch["completion_mask"].sum(-1)
    last = np.take_along_axis(batch["completion_ids"], np.maximum(lengths - 1, 0)[..., None],
                              -1)[..., 0]
    out = {"adv/mean": float(raw_adv.mean()), "adv/std": float(raw_adv.std()),
           "adv/abs_mean": float(np.abs(raw_adv).mean()),
           "adv/zero_share": float((np.abs(raw_adv) < 1e-6).mean()),
           "rollout/length": float(lengths.mean()),
           "rollout/stopped": float(np.mean(np.isin(last, self.sampling.stop_ids)
                                            & (lengths > 0))),
           "rollout/truncated_prompts": float(batch["truncated_prompts"])}
    for i, name in enumerate(self.gcfg.rewards):
      out[f"reward/{name}"] = float(diag["reward_mean"][i])
      out[f"reward/{name}_std"] = float(diag["reward_std"][i])
      out[f"adv/zero_var_{name}"] = float(diag["zero_var_groups"][i])
    out.update({f"adv/{k}": float(v) for k, v in diag.items() if k.startswith("collapse_")})
    return out

  def _step_flops(self, batch):
    """Analytic FLOPs of a loop step: rollouts, the reference forward, mu learner updates."""
    a, b, p = batch["prompt_ids"].shape
    t = batch["completion_ids"].shape[-1]
    rows = a * b
    total = flops.generate(self.model_cfg, rows, p, t)
    if self.ref_params is not None:
      total += flops.forward(self.model_cfg, rows, p + t, t)
    return total + self.mu * flops.train(self.model_cfg, rows, p + t, t)

  def _timings(self, batch, t0, t1, t2, t3):
    gen_tokens = float(batch["completion_mask"].sum())
    util = chips.mfu(self._step_flops(batch), t3 - t0)
    return ({} if util is None else {"perf/mfu": util}) | {"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/learner_s": t3 - t2,
            "time/step_s": t3 - t0,
            "perf/rollout_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
            "perf/learner_tokens_per_s": self.mu * float(
                batch["prompt_mask"].sum() + gen_tokens) / max(t3 - t2, 1e-9)}

  def log(self, step, outs):
    """Window means of the host metrics plus the fetched learner metrics (the host sync)."""
    hosts = [h for h, _ in outs]
    keys = dict.fromkeys(k for h in hosts for k in h)
    record = {k: float(np.mean([h[k] for h in hosts if k in h])) for k in keys}
    fetched = jax.device_get([m for _, ms in outs for m in ms])
    record.update({f"train/{k}": float(np.mean([float(m[k]) for m in fetched]))
                   for k in ("loss", "kl", "clip_low", "clip_high", "ratio", "grad_norm")})
    record["train/lr"] = float(fetched[-1]["lr"])
    self.summary["history"][-1].update(
        {k: v for k, v in record.items() if k.startswith("train/")})
    return record, {"svr": record["rollout/svr"], "hit": record["rollout/hit"],
                    "kl": record["train/kl"]}


def train(config, workdir):
  """Runs (or resumes) Safe-GDPO in `workdir`; returns a summary dict.

  Summary: start_step, final_step, history (one dict of host metrics per loop
  step run in this call: rollout SVR / hit rate, rewards, advantage
  diagnostics, timings on logged steps, and train/* for logged steps),
  preempted, run. Holds <workdir>/.lock while running.
  """
  config = config_lib.resolve(config)
  with run_lock.hold(workdir):
    return _train(config, workdir)


def _train(config, workdir):
  run = Run(config, workdir)
  run.summary = summary = {"workdir": run.workdir, "start_step": run.start_step,
                           "history": [], "preempted": False}
  with loop.Books(run.workdir, config.log, run.num_steps, run.start_step, "gdpo",
                  run_config=config) as books:
    run.notify = books.progress.write
    books.progress.write(
        f"gdpo: {len(run.rows)} prompts, {run.num_steps} steps of {run.step_prompts} prompts "
        f"x G={run.group}, mu={run.mu}, advantages={config.gdpo.advantage_mode}"
        + (f"; resuming at step {run.start_step}" if run.start_step else ""))
    state, step, preempted = loop.run_loop(run, run.state, run.start_step, books,
                                           log_every=config.log.every)
  run.state = state
  summary.update(final_step=step, preempted=preempted, run=run)
  return summary
