"""Safe-SFT: the stage's data, its setup, the body of a step, and `train`.

    summary = sft.train(config, workdir)      # runs or resumes the stage

Reading order: rows are loaded, curated and tokenized (`load_sft_examples`),
ordered by a per-epoch permutation and collated into TokenBatches
(`Batcher`); `Run` builds the mesh, the policy (policy.load_policy) and the
sharded train state (restored when the workdir holds a checkpoint), and jits
steps.sft_train_step; `train` hands it to train_loop.run_loop. Restarting the
same command continues the same loss trajectory: batches come from a
permutation seeded by (seed, epoch) and the step's RNG is fold_in(seed key, step).

Shape letters (package legend): A micro-batches per optimizer step, B rows
per micro-batch (global), T padded length.
"""
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from safecrs_jax import config as config_lib
from safecrs_jax import models, saferec
from safecrs_jax.data import assets, tokens
from safecrs_jax.infra import chips, flops, provenance, run_lock, storage
from safecrs_jax.infra import sharding as shd
from safecrs_jax.models import lora as lora_lib
from safecrs_jax.rl import steps
from safecrs_jax.saferec.relational import training as rel_training
from safecrs_jax.train import checkpoint, loop, optim, policy
from safecrs_jax.train import state as ts

# -- data ---------------------------------------------------------------------

_REASONING = re.compile(r"<reasoning>.*?</reasoning>\s*", re.DOTALL)


def prepare_rows(rows, config, oracle=None, *, curate=None):
  """The Safe-SFT curation hook on loaded rows.

  sft.curate: the teacher's list minus every item the oracle marks unsafe for
  the row's constraints (saferec.curate_sft_rows; rows left with no safe
  ground truth are dropped), with the <reasoning> block when sft.reasoning;
  sft.backfill fills the lists back to the teacher's length (off: reference).
  Without curation (targets already curated), sft.reasoning=False strips any
  <reasoning> block. Returns (rows, report); report["dropped"] lists the dropped
  rows (index in the split, the user's request, its constraints). curate=None
  reads sft.curate.
  """
  reasoning = bool(config.sft.reasoning)
  if config.sft.curate if curate is None else curate:
    if oracle is None:
      raise ValueError("sft.curate needs the safety oracle")
    loaded = rows
    rows, report = saferec.curate_sft_rows(rows, oracle, reasoning=reasoning,
                                           backfill=bool(config.sft.backfill))
    report = dict(report, dropped=[_dropped_row(i, loaded[i])
                                   for i in report.pop("dropped_indices")])
    return rows, report
  if not reasoning:
    rows = [dict(r, completion=_REASONING.sub("", r["completion"])) for r in rows]
  return rows, {"rows_in": len(rows), "rows_out": len(rows)}


def _dropped_row(index, row):
  text = row["prompt"][-1]["content"] if row.get("prompt") else ""
  return {"index": int(index), "request": text[-160:],
          "constraints": sorted(k for k, v in (row.get("constraints") or {}).items() if v)}


def curation_lines(report, split, limit=5):
  """Console lines: how many rows curation dropped from `split`, and the first few."""
  dropped = report.get("dropped", [])
  lines = [f"sft curation: {split}: {report.get('rows_in')} rows -> {report.get('rows_out')} "
           f"({len(dropped)} dropped: no safe ground truth left)"]
  lines += [f"  dropped row {d['index']} ({', '.join(d['constraints']) or 'no constraint'}): "
            f"...{d['request'][-70:]!r}" for d in dropped[:limit]]
  return lines


def load_sft_rows(config, data_dir, split, oracle=None):
  """Loaded and curated rows of `split`: (rows, curation report)."""
  rows = saferec.load_split(data_dir, split, stage="sft",
                            strict=config.data.strict)
  if config.sft.curate and oracle is None:
    oracle = saferec.load_oracle(data_dir, risk_threshold=config.data.risk_threshold)
  rows, report = prepare_rows(rows, config, oracle)
  if not rows:
    raise saferec.SafeRecDataError(
        f"no SFT rows left in {data_dir} split {split!r}: {report['rows_in']} rows read, "
        f"{report['rows_dropped_no_safe_gt']} without a safe ground-truth item, "
        f"{report['rows_empty_target']} with an empty target")
  return rows, report


def encode_rows(config, tokenizer, rows):
  return tokens.encode_sft(tokenizer, rows, int(config.tokenizer.max_length),
                           truncation=str(config.tokenizer.truncation))


def load_sft_examples(config, tokenizer, data_dir, split, oracle=None):
  """Loaded, curated and tokenized rows of `split`: (SFTExamples, curation report)."""
  rows, report = load_sft_rows(config, data_dir, split, oracle)
  return encode_rows(config, tokenizer, rows), report


def _collate(examples, indices, length, sharding, global_shape, axis):
  """TokenBatch of global arrays; this process collates only the rows it holds."""
  lo, hi = shd.local_rows(sharding, global_shape, axis)
  local = indices[:, lo:hi] if axis == 1 else indices[lo:hi]
  if axis == 1:
    parts = [tokens.collate_sft(examples, row, length) for row in local]
    arrays = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
  else:
    arrays = tokens.collate_sft(examples, list(local), length)
  return steps.TokenBatch(**{k: shd.to_global(v, sharding, global_shape)
                             for k, v in arrays.items()})


class Batcher:
  """Global TokenBatches [A, B, T] for step s: epoch s // steps_per_epoch, drop-last.

  Every process knows every row's length (so all agree on the bucket T) and
  collates only the rows its devices hold. `mix` (a relational_training.Mix
  whose rows are `examples`): its order per epoch instead of the permutation,
  with a suite unit never split across micro-batches.
  """

  def __init__(self, examples, *, accum, micro, seed, buckets, sharding, mix=None):
    self.examples, self.accum, self.micro = examples, int(accum), int(micro)
    self.seed, self.buckets, self.sharding = int(seed), tuple(buckets), sharding
    self.mix = mix
    self.global_batch = self.accum * self.micro
    self.steps_per_epoch = (mix.length if mix else len(examples)) // self.global_batch
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(examples)} training rows < one global batch of "
                       f"{self.global_batch} (grad_accum {accum} x micro {micro}); "
                       "lower sft.batch_size or sft.grad_accum")
    self._lengths = examples.lengths
    self._perm_cache = {}

  def position(self, step):
    """(epoch, index within the epoch) of global step `step`."""
    return divmod(int(step), self.steps_per_epoch)

  def indices(self, step):
    """[A, B] row indices of step `step`."""
    epoch, index = self.position(step)
    if epoch not in self._perm_cache:
      self._perm_cache = {epoch: (
          self.mix.order(self.seed, epoch, self.micro) if self.mix else
          loop.epoch_permutation(self.seed, epoch, len(self.examples)))}
    perm = self._perm_cache[epoch]
    rows = perm[index * self.global_batch:(index + 1) * self.global_batch]
    return rows.reshape(self.accum, self.micro)

  def batch(self, step):
    """(TokenBatch of global arrays [A,B,T], real tokens in the global batch)."""
    idx = self.indices(step)
    length = tokens.bucket_length(int(self._lengths[idx].max()), self.buckets)
    shape = (self.accum, self.micro, length)
    return (_collate(self.examples, idx, length, self.sharding, shape, 1),
            int(self._lengths[idx].sum()))


def eval_batches(examples, *, micro, buckets, sharding, max_batches=-1):
  """Validation TokenBatches [B,T] in order; the last one padded with empty rows."""
  n = len(examples)
  count = -(-n // micro)
  if max_batches is not None and max_batches >= 0:
    count = min(count, max_batches)
  for b in range(count):
    idx = list(range(b * micro, min((b + 1) * micro, n)))
    length = tokens.bucket_length(int(examples.lengths[idx].max()), buckets)
    full = np.asarray(idx + [-1] * (micro - len(idx)))
    yield _collate(examples, full, length, sharding, (micro, length), 0)


# -- setup --------------------------------------------------------------------

def fingerprint(model_cfg, config, global_batch, *, data, tokenizer, init, mix=None):
  """What must not change between a checkpoint and the run resuming from it.

  The model, the data's and tokenizer's content, the starting weights, every
  result-changing setting (train_loop.stage_fingerprint), the global batch and,
  when on, the relational mix's settings (unchanged fingerprint when off).
  """
  lora_cfg = config.sft.lora
  return loop.stage_fingerprint(
      config, "sft", model_cfg, data=data, tokenizer=tokenizer, init=init,
      lora=({"rank": int(lora_cfg.rank), "alpha": float(lora_cfg.alpha),
             "targets": list(lora_cfg.targets)} if int(lora_cfg.rank) else {}),
      global_batch=int(global_batch), seed=int(config.seed),
      **({"relational_mix": mix.settings} if mix else {}))


class Run:
  """Everything `train` builds before looping; tests and benchmarks use the pieces."""

  def __init__(self, config, workdir):
    config = config_lib.resolve(config)      # a ConfigDict: checked and typed here
    self.config, self.workdir = config, storage.resolve(workdir)
    self.lora_on = lora_lib.check_config(config.sft.lora)
    self.mesh, self.rules = shd.mesh_from_config(config)
    self.data_dir = assets.resolve_data_dir(config)
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
    self._build_state()
    loop.write_run_files(self.workdir, config, self.model_cfg, self.tokenizer)
    self._jit_steps()

  def _load_data(self):
    config = self.config
    oracle = None
    mixing = float(config.data.relational_mix) > 0
    if config.sft.curate or mixing:
      oracle = saferec.load_oracle(self.data_dir, risk_threshold=config.data.risk_threshold)
    self.curation = {}
    train_rows, self.curation["train"] = load_sft_rows(config, self.data_dir, "train", oracle)
    # Suite rows from the training rows, always curated for their own constraints (a
    # neutral twin must not keep a list filtered for its source's). With sft.curate the
    # source is the teacher's whole list (curate_row reads teacher_completion); without
    # it, the released completion, already filtered for the source row's constraints.
    self.mix = rel_training.from_config(
        train_rows, oracle, config.data,
        prepare=lambda rows: prepare_rows(rows, config, oracle, curate=True))
    if self.mix:
      train_rows = self.mix.rows
      self.curation["relational_mix"] = self.mix.manifest
      if jax.process_index() == 0:
        rel_training.write_manifest(self.mix, self.workdir)
    self.train_examples = encode_rows(config, self.tokenizer, train_rows)
    self.val_examples, self.curation["validation"] = load_sft_examples(
        config, self.tokenizer, self.data_dir, "validation", oracle)
    self.micro = int(config.sft.batch_size) * shd.data_parallel_size(self.mesh)
    self.train_sharding = shd.batch_sharding(self.mesh, 3, batch_dim=1)
    self.eval_sharding = shd.batch_sharding(self.mesh, 2)
    self.batcher = Batcher(self.train_examples, accum=int(config.sft.grad_accum),
                           micro=self.micro, seed=config.seed,
                           buckets=config.tokenizer.buckets, sharding=self.train_sharding,
                           mix=self.mix)

  def _write_curation(self):
    """<workdir>/curation.json: what curation dropped from each split (process 0)."""
    if jax.process_index() == 0:
      storage.makedirs(self.workdir)
      with storage.open(os.path.join(self.workdir, "curation.json"), "w", encoding="utf-8") as f:
        json.dump(self.curation, f, indent=1, ensure_ascii=False)

  def _build_state(self):
    """Abstract state -> shardings -> restore the latest checkpoint or initialise."""
    config = self.config
    rank, targets = int(config.sft.lora.rank), tuple(config.sft.lora.targets)
    abstract_params = models.abstract_params(self.model_cfg)

    def make_abstract():
      lora_p = (lora_lib.init(abstract_params, rank, targets, jax.random.key(0))
                if self.lora_on else None)
      params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params)
      return ts.create(params, self.tx, lora_p)
    abstract = jax.eval_shape(make_abstract)
    self.state_shardings = ts.shardings(abstract, models.param_logical_axes(self.model_cfg),
                                        self.mesh, self.rules)
    self.abstract_state = ts.with_shardings(abstract, self.state_shardings)
    self.fingerprint = fingerprint(
        self.model_cfg, config, self.batcher.global_batch,
        data=provenance.data_fingerprint(self.data_dir),
        tokenizer=provenance.tokenizer_hash(self.tokenizer),
        init=policy.source_identity(config, ""), mix=self.mix)
    self.ckpt = loop.open_checkpointer(config, self.workdir)
    self.root_key = jax.random.key(int(config.seed))
    self.state, self.data_state = loop.restore_or_init(
        self.ckpt, self.abstract_state, self.fingerprint,
        functools.partial(self._init_state, rank, targets),
        overwrite=bool(config.checkpoint.overwrite))
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

  def _jit_steps(self):
    kw = dict(model_cfg=self.model_cfg, lora_scale=self.lora_scale, mesh=self.mesh,
              rules=self.rules, logits_chunk=int(self.config.model.logits_chunk))
    repl = shd.replicated(self.mesh)
    dropout = float(self.config.sft.lora.dropout) if self.lora_on else 0.0
    self.train_step = jax.jit(
        functools.partial(steps.sft_train_step, tx=self.tx, schedule=self.schedule,
                          lora_dropout=dropout, **kw),
        in_shardings=(self.state_shardings, self.train_sharding, repl),
        out_shardings=(self.state_shardings, repl), donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(steps.sft_eval_step, **kw),
                             in_shardings=(self.state_shardings, self.eval_sharding),
                             out_shardings=repl)

  def _check_position(self):
    step = int(jax.device_get(self.state.step))
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

  def evaluate(self, state=None):
    """Token-mean validation loss (sft.eval_batches micro-batches)."""
    state = self.state if state is None else state
    sums, counts = [], []
    for batch in eval_batches(self.val_examples, micro=self.micro,
                              buckets=self.config.tokenizer.buckets,
                              sharding=self.eval_sharding,
                              max_batches=int(self.config.sft.eval_batches)):
      s, c = self.eval_step(state, batch)
      sums.append(s)
      counts.append(c)
    s, c = jax.device_get((sum(sums), sum(counts)))
    return float(s) / max(float(c), 1.0)

  # -- the stage protocol of train_loop.run_loop ---------------------------------
  def step(self, state, step):
    """Dispatches one optimizer step; out = (step number, device metrics, real tokens)."""
    batch, ntok = self.batcher.batch(step)
    state, metrics = self.train_step(state, batch, self.root_key)
    return state, (step + 1, metrics, ntok)

  def log(self, step, outs):
    """Fetches the pending metrics (the host sync) into one record."""
    fetched = jax.device_get([m for _, m, _ in outs])
    dt = time.perf_counter() - self.t0
    last = fetched[-1]
    record = {"train/loss": float(np.mean([m["loss"] for m in fetched])),
              "train/grad_norm": float(last["grad_norm"]), "train/lr": float(last["lr"]),
              "train/tokens_per_s": sum(n for *_, n in outs) / dt,
              "train/step_time_s": dt / len(fetched)}
    rows = self.batcher.global_batch
    per_row = sum(n for *_, n in outs) / (rows * len(outs))        # real tokens per row
    util = chips.mfu(len(outs) * flops.train(self.model_cfg, rows, per_row, per_row), dt)
    if util is not None:
      record["perf/mfu"] = util
    self.summary["train_loss"].extend((s, float(m["loss"])) for (s, _, _), m in
                                      zip(outs, fetched))
    self.t0 = time.perf_counter()
    return record, {"loss": record["train/loss"], "lr": record["train/lr"]}


def _validator(run, books):
  """validate(step, state): validation loss written, printed and kept in the summary."""
  def validate(step, state):
    val = run.evaluate(state)
    books.writer.write(step, {"val/loss": val})
    run.summary["val_loss"].append((step, val))
    books.progress.write(f"step {step}: val loss {val:.4f}")
    run.t0 = time.perf_counter()  # keep evaluation out of tokens/s
  return validate


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
    return _train(config, workdir, stop_at, step_hook)


def _train(config, workdir, stop_at, step_hook):
  run = Run(config, workdir)
  start = int(jax.device_get(run.state.step))
  run.summary = summary = {
      "workdir": run.workdir, "start_step": start, "total_steps": run.total_steps,
      "train_loss": [], "val_loss": [], "preempted": False,
      "truncation": {"train": run.train_examples.report(),
                     "validation": run.val_examples.report()},
      "curation": run.curation}
  eval_every = int(config.sft.eval_every)
  with loop.Books(run.workdir, config.log, run.total_steps, start, "sft",
                  run_config=config) as books:
    if start == 0:
      books.progress.write(
          f"sft: {len(run.train_examples)} train rows, {run.total_steps} steps, global batch "
          f"{run.batcher.global_batch}, truncation {summary['truncation']}")
    else:
      books.progress.write(f"sft: resuming from step {start} in {run.ckpt.directory}")
    validate = _validator(run, books)
    run.t0 = time.perf_counter()
    if start == 0 and eval_every > 0:
      validate(0, run.state)
    hooks = []
    if eval_every > 0:
      hooks.append(lambda step, state: loop.due(step, eval_every, run.total_steps)
                   and validate(step, state))
    if step_hook is not None:
      hooks.append(step_hook)
    state, step, preempted = loop.run_loop(run, run.state, start, books,
                                           log_every=config.log.every, hooks=hooks,
                                           stop_at=stop_at)
  run.state = state
  summary.update(final_step=step, preempted=preempted, run=run)
  return summary
