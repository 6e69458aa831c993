"""Safe-SFT: the stage's setup, its step, and `train`.

    summary = sft.train(config, workdir)      # runs or resumes the stage

Reading order: rows are loaded, curated and tokenized and a Batcher collates
them into TokenBatches (sft_data); `Run` (a stage.Stage) builds the policy
(policy.load_policy) and the sharded train state (restored when the workdir
holds a checkpoint); its step calls the jitted steps.sft_train_step built
beside it, and `run()` loops (train_loop.run_loop). Restarting the same
command continues the same loss trajectory: batches come from a permutation
seeded by (seed, epoch) and the step's RNG is fold_in(seed key, step).

Shape letters (package legend): A micro-batches per optimizer step, B rows
per micro-batch (global), T padded length.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from safecrs_jax import config as config_lib
from safecrs_jax import models, saferec
from safecrs_jax.data import assets, tokens
from safecrs_jax.infra import flops, run_lock, storage
from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import lora as lora_lib
from safecrs_jax.rl import steps
from safecrs_jax.saferec.relational import training as rel_training
from safecrs_jax.train import checkpoint, loop, optim, policy, sft_data, stage
from safecrs_jax.train import state as ts


class Run(stage.Stage):
  """Safe-SFT's setup and step; `run()` loops (tests and benchmarks use the pieces)."""
  name = "sft"

  def __init__(self, config, workdir):
    config = config_lib.resolve(config)      # a ConfigDict: checked and typed here
    self.lora_on = lora_lib.check_config(config.sft.lora)
    super().__init__(config, workdir)
    self.tokenizer = tokens.load_tokenizer(assets.resolve_tokenizer_path(config, self.data_dir))
    self.model_cfg = policy.model_config(config, self.tokenizer)
    tokens.check_buckets(config.tokenizer.buckets, int(config.tokenizer.max_length),
                          "tokenizer")
    self._load_data()
    self._write_curation()
    n = int(config.sft.num_steps)
    self.total_steps = n if n > 0 else int(config.sft.epochs) * self.batcher.steps_per_epoch
    self.tx, self.schedule = optim.make_optimizer(config.optim, self.total_steps)
    self.lora_scale = (lora_lib.scale(config.sft.lora.alpha, config.sft.lora.rank)
                       if self.lora_on else None)
    self._restore()
    loop.write_run_files(self.workdir, config, self.model_cfg, self.tokenizer)
    self.timer = stage.StepTimer()
    self.summary = {
        "workdir": self.workdir, "start_step": self.start_step, "total_steps": self.total_steps,
        "train_loss": [], "val_loss": [], "preempted": False,
        "truncation": {"train": self.train_examples.report(),
                       "validation": self.val_examples.report()},
        "curation": self.curation}

  def _load_data(self):
    config = self.config
    oracle = None
    mixing = float(config.data.relational_mix) > 0
    if config.sft.curate or mixing:
      oracle = saferec.load_oracle(self.data_dir, risk_threshold=config.data.risk_threshold)
    self.curation = {}
    train_rows, self.curation["train"] = sft_data.load_sft_rows(config, self.data_dir, "train",
                                                                oracle)
    # Suite rows from the training rows, always curated for their own constraints (a
    # neutral twin must not keep a list filtered for its source's). With sft.curate the
    # source is the teacher's whole list (curate_row reads teacher_completion); without
    # it, the released completion, already filtered for the source row's constraints.
    self.mix = rel_training.from_config(
        train_rows, oracle, config.data,
        prepare=lambda rows: sft_data.prepare_rows(rows, config, oracle, curate=True))
    if self.mix:
      train_rows = self.mix.rows
      self.curation["relational_mix"] = self.mix.manifest
      if jax.process_index() == 0:
        rel_training.write_manifest(self.mix, self.workdir)
    self.train_examples = sft_data.encode_rows(config, self.tokenizer, train_rows)
    self.val_examples, self.curation["validation"] = sft_data.load_sft_examples(
        config, self.tokenizer, self.data_dir, "validation", oracle)
    self.micro = int(config.sft.batch_size) * shd.data_parallel_size(self.mesh)
    self.train_sharding = shd.batch_sharding(self.mesh, 3, batch_dim=1)
    self.eval_sharding = shd.batch_sharding(self.mesh, 2)
    self.batcher = sft_data.Batcher(self.train_examples, accum=int(config.sft.grad_accum),
                                    micro=self.micro, seed=config.seed,
                                    buckets=config.tokenizer.buckets,
                                    sharding=self.train_sharding, mix=self.mix)

  def _write_curation(self):
    """<workdir>/curation.json: what curation dropped from each split (process 0)."""
    if jax.process_index() == 0:
      storage.makedirs(self.workdir)
      with storage.open(os.path.join(self.workdir, "curation.json"), "w", encoding="utf-8") as f:
        json.dump(self.curation, f, indent=1, ensure_ascii=False)

  def _restore(self):
    """Abstract state -> shardings -> restore the latest checkpoint or initialise.

    The fingerprint adds to the stage's (stage.Stage.stage_fingerprint) the LoRA
    settings (when on) and the global batch.
    """
    config = self.config
    rank, targets = int(config.sft.lora.rank), tuple(config.sft.lora.targets)
    abstract_params = models.abstract_params(self.model_cfg)

    def make_abstract():
      lora_p = (lora_lib.init(abstract_params, rank, targets, jax.random.key(0))
                if self.lora_on else None)
      params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params)
      return ts.create(params, self.tx, lora_p)
    lora_cfg = config.sft.lora
    fingerprint = self.stage_fingerprint(
        policy.source_identity(config, ""),
        lora=({"rank": int(lora_cfg.rank), "alpha": float(lora_cfg.alpha),
               "targets": list(lora_cfg.targets)} if int(lora_cfg.rank) else {}),
        global_batch=int(self.batcher.global_batch), seed=int(config.seed))
    self.data_state = self.restore(jax.eval_shape(make_abstract), fingerprint,
                                   functools.partial(self._init_state, rank, targets))
    self.start_step = int(jax.device_get(self.state.step))
    if self.data_state is not None:
      self._check_position()

  def _init_state(self, rank, targets):
    init_key, lora_key = jax.random.split(jax.random.fold_in(self.root_key, 1))
    params = policy.load_policy(self.config, "", self.mesh, self.rules, data_dir=self.data_dir,
                                init_key=init_key).params

    def make(params):
      lora_p = lora_lib.init(params, rank, targets, lora_key) if rank else None
      return ts.create(params, self.tx, lora_p)
    return jax.jit(make, out_shardings=self.state_shardings)(params)

  def _check_position(self):
    step = self.start_step
    epoch, index = self.batcher.position(step)
    saved = (self.data_state.get("epoch"), self.data_state.get("index"))
    if saved != (epoch, index):
      raise checkpoint.CheckpointError(
          f"checkpoint {self.ckpt.directory}/{step}: data position {saved} does not match "
          f"step {step} with {self.batcher.steps_per_epoch} steps/epoch ({epoch}, {index})")

  def data_position(self, step):
    epoch, index = self.batcher.position(step)
    return {"epoch": epoch, "index": index, "step": int(step),
            "rng_seed": int(self.config.seed), "fingerprint": self.fingerprint}

  def start(self, books):
    """The banner; validation at step 0 of a fresh run; the validation hook."""
    if self.start_step == 0:
      self.notify(f"sft: {len(self.train_examples)} train rows, {self.total_steps} steps, "
                  f"global batch {self.batcher.global_batch}, "
                  f"truncation {self.summary['truncation']}")
    else:
      self.notify(f"sft: resuming from step {self.start_step} in {self.ckpt.directory}")
    self.timer.restart()
    every = int(self.config.sft.eval_every)
    if every <= 0:
      return []
    if self.start_step == 0:
      self.validate(0, self.state, books.writer)
    return [lambda step, state: loop.due(step, every, self.total_steps)
            and self.validate(step, state, books.writer)]

  # -- the jitted steps, each beside its caller ------------------------------------
  def _step_kw(self):
    return dict(model_cfg=self.model_cfg, lora_scale=self.lora_scale, mesh=self.mesh,
                rules=self.rules, logits_chunk=int(self.config.model.logits_chunk))

  @functools.cached_property
  def eval_fn(self):
    """Jitted steps.sft_eval_step: (state, TokenBatch [B, T]) -> (NLL sum, loss tokens)."""
    return jax.jit(functools.partial(steps.sft_eval_step, **self._step_kw()),
                   in_shardings=(self.state_shardings, self.eval_sharding),
                   out_shardings=shd.replicated(self.mesh))

  def evaluate(self, state=None):
    """Token-mean validation loss (sft.eval_batches micro-batches)."""
    state = self.state if state is None else state
    sums, counts = [], []
    for batch in sft_data.eval_batches(self.val_examples, micro=self.micro,
                                       buckets=self.config.tokenizer.buckets,
                                       sharding=self.eval_sharding,
                                       max_batches=int(self.config.sft.eval_batches)):
      s, c = self.eval_fn(state, batch)
      sums.append(s)
      counts.append(c)
    s, c = jax.device_get((sum(sums), sum(counts)))
    return float(s) / max(float(c), 1.0)

  def validate(self, step, state, writer):
    """Validation loss at `step`: written, printed, kept in the summary; not timed."""
    val = self.evaluate(state)
    writer.write(step, {"val/loss": val})
    self.summary["val_loss"].append((step, val))
    self.notify(f"step {step}: val loss {val:.4f}")
    self.timer.restart()  # keep evaluation out of tokens/s

  @functools.cached_property
  def train_fn(self):
    """Jitted steps.sft_train_step: (state, TokenBatch [A, B, T], root key) -> (state', metrics)."""
    repl = shd.replicated(self.mesh)
    dropout = float(self.config.sft.lora.dropout) if self.lora_on else 0.0
    return jax.jit(
        functools.partial(steps.sft_train_step, tx=self.tx, schedule=self.schedule,
                          lora_dropout=dropout, **self._step_kw()),
        in_shardings=(self.state_shardings, self.train_sharding, repl),
        out_shardings=(self.state_shardings, repl), donate_argnums=0)

  def step(self, state, step):
    """Dispatches one optimizer step; out = (step number, device metrics, real tokens)."""
    batch, ntok = self.batcher.batch(step)
    state, metrics = self.train_fn(state, batch, self.root_key)
    return state, (step + 1, metrics, ntok)

  def log(self, step, outs):
    """Fetches the pending metrics (the host sync) into one record."""
    fetched = jax.device_get([m for _, m, _ in outs])
    dt = self.timer.lap()
    last, ntok = fetched[-1], sum(n for *_, n in outs)
    record = {"train/loss": float(np.mean([m["loss"] for m in fetched])),
              "train/grad_norm": float(last["grad_norm"]), "train/lr": float(last["lr"]),
              "train/tokens_per_s": ntok / dt, "train/step_time_s": dt / len(fetched)}
    rows = self.batcher.global_batch
    per_row = ntok / (rows * len(outs))                             # real tokens per row
    record.update(self.timer.mfu(
        len(outs) * flops.train(self.model_cfg, rows, per_row, per_row), dt))
    self.summary["train_loss"].extend((s, float(m["loss"])) for (s, _, _), m in
                                      zip(outs, fetched, strict=True))
    return record, {"loss": record["train/loss"], "lr": record["train/lr"]}


def train(config, workdir, *, stop_at=None, step_hook=None):
  """Runs (or resumes) Safe-SFT in `workdir`, holding its lock; returns a summary dict.

  stop_at: leave after this global step with a checkpoint (time-sliced jobs;
  the schedule still spans the full run). step_hook(step, state): called
  after every step (tests, custom monitoring); keep it cheap.
  Summary: final_step, train_loss [(step, loss)] at each logging point (the
  loss of that step), val_loss [(step, loss)], preempted, truncation and
  curation reports ({split: report}, also in <workdir>/curation.json), and
  `run` (the Run, holding the final state).
  """
  config = config_lib.resolve(config)
  with run_lock.hold(workdir):
    run = Run(config, workdir)
    return run.run(hooks=() if step_hook is None else (step_hook,), stop_at=stop_at)
