"""Safe-GDPO: the stage's loop step and `train`.

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
Jitted functions are built beside the method calling them; settings, prompts and
the starting policy come from gdpo_setup, host metrics from gdpo_metrics, restore
and the loop from stage.Stage. Resuming replays the same trajectory: prompt order
from (seed, epoch) permutations, rollout keys fold_in(seed key, loop step, chunk).

Shape letters (package legend): a loop step rolls out step_prompts prompts,
G samples each (a group = G consecutive rows), and the learner takes them as
A = grad_accum micro-batches of B = micro_rows rows (`gdpo_setup.batch_geometry`):
rollout arrays are [A, B, ...]; R rewards; I ranked items (rec_num); P prompt
tokens; T completion tokens.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from safecrs_jax import config as config_lib
from safecrs_jax import models, saferec
from safecrs_jax.data import tokens
from safecrs_jax.infra import run_lock
from safecrs_jax.infra import sharding as shd
from safecrs_jax.rl import advantages, rank_items, rollout, steps
from safecrs_jax.saferec.relational import training as rel_training
from safecrs_jax.train import checkpoint, gdpo_metrics, gdpo_setup, loop, optim, policy, stage
from safecrs_jax.train import state as ts


class Run(stage.Stage):
  """Safe-GDPO's setup and loop step; `run()` loops (tests and benchmarks use the pieces)."""
  name = "gdpo"

  def __init__(self, config, workdir):
    config = config_lib.resolve(config)      # a ConfigDict: checked and typed here
    g = self.gcfg = config.gdpo
    self.per_rank = gdpo_setup.check_config(g)
    self.loss_cfg, self.mu = gdpo_setup.loss_config(g), int(g.mu)
    self.rewards = gdpo_setup.reward_settings(g)
    super().__init__(config, workdir)
    self.rows, self.oracle, self.mix = gdpo_setup.load_prompts(config, self.data_dir)
    pol = gdpo_setup.load_init_policy(config, self.mesh, self.rules, self.data_dir)
    self.init_identity = policy.source_identity(config, g.init_checkpoint)
    self.model_cfg, self.tokenizer = pol.model_cfg, pol.tokenizer
    geo = gdpo_setup.batch_geometry(g, shd.data_parallel_size(self.mesh))
    self.group, self.accum, self.micro_rows = geo["group"], geo["accum"], geo["micro_rows"]
    self.step_prompts, self.chunks = geo["step_prompts"], geo["chunks"]
    self.chunk_prompts = geo["chunk_prompts"]
    self.steps_per_epoch = gdpo_setup.steps_per_epoch(self.mix.length if self.mix else
                                                      len(self.rows), self.step_prompts)
    self.total_steps = int(g.num_steps)
    self.sampling = gdpo_setup.sampling_config(g, self.tokenizer)
    self.temperature = float(g.temperature) if float(g.temperature) > 0 else 1.0
    self.weights = np.asarray(g.reward_weights, np.float32)
    self.newline_ids = rank_items.newline_token_ids(self.tokenizer) if self.per_rank else None
    self.tx, self.schedule = optim.make_optimizer(config.optim, self.total_steps * self.mu)
    self._restore(pol.params)
    loop.write_run_files(self.workdir, config, self.model_cfg, self.tokenizer)
    if self.mix and jax.process_index() == 0:
      rel_training.write_manifest(self.mix, self.workdir)
    self.summary = {"workdir": self.workdir, "start_step": self.start_step, "history": [],
                    "preempted": False}

  def _restore(self, params):
    """Restores the latest checkpoint, or starts from `params`; keeps the reference."""
    abstract = jax.eval_shape(lambda p: ts.create(p, self.tx),
                              models.abstract_params(self.model_cfg))
    fingerprint = self.stage_fingerprint(
        self.init_identity, step_prompts=self.step_prompts, group_size=self.group, mu=self.mu,
        seed=int(self.config.seed))

    def init():       # a copy: the reference keeps `params`
      return jax.jit(lambda p: ts.create(jax.tree.map(jnp.copy, p), self.tx),
                     out_shardings=self.state_shardings)(params)
    data = self.restore(abstract, fingerprint, init)
    self.start_step = 0 if data is None else int(data["step"])
    if int(jax.device_get(self.state.step)) != self.start_step * self.mu:
      raise checkpoint.CheckpointError(
          f"checkpoint in {self.ckpt.directory}: optimizer step {int(self.state.step)} != "
          f"loop step {self.start_step} x mu {self.mu}")
    self.ref_params = params if self.loss_cfg.beta > 0 else None

  def data_position(self, step):
    epoch, index = divmod(int(step), self.steps_per_epoch)
    return {"step": int(step), "epoch": epoch, "index": index,
            "rng_seed": int(self.config.seed), "fingerprint": self.fingerprint}

  def start(self, books):
    self.notify(f"gdpo: {len(self.rows)} prompts, {self.total_steps} steps of "
                f"{self.step_prompts} prompts x G={self.group}, mu={self.mu}, "
                f"advantages={self.gcfg.advantage_mode}"
                + (f"; resuming at step {self.start_step}" if self.start_step else ""))
    return []

  # -- one loop step, in the order `step` runs it ---------------------------------
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
    sharding, outs = shd.batch_sharding(self.mesh, 2), []
    for c in range(self.chunks):
      key = jax.random.fold_in(jax.random.fold_in(self.root_key, step), c)
      outs.append(jax.tree.map(shd.to_host, rollout.generate(
          self.model_cfg, params, shd.to_global(p_ids[c], sharding),
          shd.to_global(p_mask[c], sharding), key, self.sampling,
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
    texts = self.tokenizer.batch_decode(
        [row[m > 0].tolist() for row, m in zip(ids, mask, strict=True)], skip_special_tokens=True)
    rows = [self.rows[i] for i in np.repeat(idx.reshape(-1), self.group)]
    parsed = saferec.parse_all(texts)
    rewards = saferec.reward_table(tuple(self.gcfg.rewards), parsed, rows, self.oracle,
                                   self.rewards, per_rank=self.per_rank)
    return rewards, texts, gdpo_metrics.rollout_stats(parsed, rows, self.oracle,
                                                      self.rewards.rec_num)

  @functools.cached_property
  def advantage_fns(self):
    """Jitted (advantages, diagnostics) of (rewards, weights=)."""
    mode = str(self.gcfg.advantage_mode)
    return (jax.jit(functools.partial(advantages.compute_advantages, group_size=self.group,
                                      mode=mode)),
            jax.jit(functools.partial(advantages.advantage_diagnostics, group_size=self.group)))

  def token_advantages(self, rewards, batch):
    """([A, B] or per-token [A, B, T] advantages, raw advantages, diagnostics)."""
    a, n, t = batch["completion_ids"].shape
    advantages_fn, diagnostics_fn = self.advantage_fns
    adv = np.asarray(advantages_fn(rewards, weights=self.weights))
    diag = jax.device_get(diagnostics_fn(rewards, weights=self.weights))
    if not self.per_rank:
      return adv.reshape(a, n).astype(np.float32), adv, diag
    items = rank_items.item_index(
        batch["completion_ids"].reshape(a * n, t), batch["completion_mask"].reshape(a * n, t),
        self.newline_ids, self.sampling.stop_ids, self.rewards.rec_num,
        decode=lambda x: self.tokenizer.decode(x, skip_special_tokens=True))
    return rank_items.token_advantages(adv, items).reshape(a, n, t), adv, diag

  @functools.cached_property
  def learner_fns(self):
    """(RolloutBatch shardings, jitted reference log-probs, jitted update)."""
    sh3 = shd.batch_sharding(self.mesh, 3, batch_dim=1)
    adv_sh = shd.batch_sharding(self.mesh, 3 if self.per_rank else 2, batch_dim=1)
    sh = steps.RolloutBatch(sh3, sh3, sh3, sh3, sh3, adv_sh,
                            sh3 if self.ref_params is not None else None)
    kw = dict(model_cfg=self.model_cfg, temperature=self.temperature, mesh=self.mesh,
              rules=self.rules, logits_chunk=int(self.config.model.logits_chunk))
    # the frozen reference's log-probs: once per rollout batch, not once per update
    p_sh = models.param_shardings(self.model_cfg, self.mesh, self.rules)
    reference = jax.jit(functools.partial(steps.reference_logprobs, **kw),
                        in_shardings=(p_sh, sh.replace(ref_logp=None)), out_shardings=sh3)
    update = jax.jit(
        functools.partial(steps.gdpo_train_step, loss_cfg=self.loss_cfg, tx=self.tx,
                          schedule=self.schedule, **kw),
        in_shardings=(self.state_shardings, None, sh),
        out_shardings=(self.state_shardings, shd.replicated(self.mesh)), donate_argnums=0)
    return sh, reference, update

  def learner_batch(self, batch, adv):
    """steps.RolloutBatch of global arrays in the learner's shardings."""
    shardings, reference, _ = self.learner_fns
    arrays = {k: np.asarray(batch[k]) for k in
              ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logp")}
    arrays["advantages"] = adv
    lb = jax.tree.map(shd.to_global, steps.RolloutBatch(**arrays),
                      shardings.replace(ref_logp=None))
    if self.ref_params is not None:
      lb = lb.replace(ref_logp=reference(self.ref_params, lb))
    return lb

  def step(self, state, step, timed=None):
    """One loop step: (state', (host metrics of the rollouts, learner metrics (device))).

    The learner is waited for only on timed steps (by default the logged ones),
    so that the next step's host work overlaps it elsewhere.
    """
    if timed is None:
      timed = loop.due(step + 1, max(int(self.config.log.every), 1), self.total_steps)
    if timed:
      jax.block_until_ready(state)
    timer = stage.StepTimer()
    idx = self.prompt_indices(step)                                     # [chunks, c]
    batch = self.generate(state.params, idx, step)                      # [A, B, ...] numpy
    rollout_s = timer.lap()
    rewards, _, info = self.score(batch, idx)                           # [B, R] or [B, R, I]
    reward_s = timer.lap()
    adv, raw_adv, diag = self.token_advantages(rewards, batch)          # [A, B] or [A, B, T]
    lb = self.learner_batch(batch, adv)
    _, _, update = self.learner_fns
    learner = []
    for _ in range(self.mu):
      state, m = update(state, None, lb)
      learner.append(m)
    host = dict(info, **gdpo_metrics.batch_metrics(batch, raw_adv, diag, self.gcfg.rewards,
                                                   self.sampling.stop_ids))
    if timed:
      jax.block_until_ready(state.step)
      phases = (rollout_s, reward_s, timer.lap())
      host.update(gdpo_metrics.timings(self.model_cfg, batch, self.mu,
                                       self.ref_params is not None, phases, timer.total()))
    self.summary["history"].append(dict(host, step=step + 1))
    return state, (host, learner)

  def log(self, step, outs):
    """The logging window's record (gdpo_metrics.window_record: the host sync)."""
    record = gdpo_metrics.window_record(outs)
    self.summary["history"][-1].update(
        {k: v for k, v in record.items() if k.startswith("train/")})
    return record, {"svr": record["rollout/svr"], "hit": record["rollout/hit"],
                    "kl": record["train/kl"]}


def train(config, workdir):
  """Runs (or resumes) Safe-GDPO in `workdir`; returns a summary dict.

  Summary: workdir, start_step, final_step, history (one dict of host metrics
  per loop step run in this call: rollout SVR / hit rate, rewards, advantage
  diagnostics, timings on logged steps, and train/* for logged steps),
  preempted, run (the Run, holding the final state). Holds <workdir>/.lock
  while running.
  """
  config = config_lib.resolve(config)
  with run_lock.hold(workdir):
    return Run(config, workdir).run()
