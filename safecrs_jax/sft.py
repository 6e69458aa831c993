"""Safe-SFT: masked next-token loss, the jitted accumulating step, and the loop.

Shape legend: A micro-batches accumulated per optimizer step, M rows per
micro-batch (global), T padded length, V vocab.

Loss normalisation (documented choice): the loss of one optimizer step is the
mean next-token NLL over *every* loss token of the whole accumulated batch,

    loss = Σ_{a,m,t} nll[a,m,t] · w[a,m,t]  /  Σ_{a,m,t} w[a,m,t],

so micro-batches are weighted by their token counts and A micro-batches of k
rows give exactly the same loss and gradient as one batch of A·k rows. Each
micro-batch contributes the gradient of its *sum* of NLL; the accumulated sum
is divided once by the total token count at the end of the scan.

`train(config, workdir)` is the whole stage: resolve data and tokenizer, build
or restore the sharded state, then loop with logging, validation, checkpoints
and SIGTERM handling. Restarting the same command continues the same loss
trajectory: batches come from a per-epoch permutation seeded by (seed, epoch)
and the step's RNG is fold_in(seed key, step).
"""
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from safecrs_jax import assets, checkpoint, metrics_log, models, optim, tokens
from safecrs_jax import lora as lora_lib
from safecrs_jax import sharding as shd
from safecrs_jax import train_state as ts

# --------------------------------------------------------------------------
# Loss and steps (pure functions).


def shifted_nll(logits, input_ids, loss_mask):
  """Masked next-token NLL, float32.

  logits [B,T,V] (any dtype), input_ids [B,T], loss_mask [B,T] (token t is a
  target) -> (sum of NLL over target tokens [], number of target tokens []).
  """
  logits = logits[:, :-1].astype(jnp.float32)                     # [B,T-1,V]
  targets = input_ids[:, 1:]                                        # [B,T-1]
  weights = loss_mask[:, 1:].astype(jnp.float32)                    # [B,T-1]
  lse = jax.nn.logsumexp(logits, axis=-1)                           # [B,T-1]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = lse - picked
  return jnp.sum(nll * weights), jnp.sum(weights)


def _model_params(state_params, lora_params, lora_scale):
  if lora_params is None:
    return state_params
  return lora_lib.merge(state_params, lora_params, lora_scale)


def batch_nll(params, lora_params, batch, *, model_cfg, lora_scale=None, mesh=None,
              rules=None):
  """(sum NLL, loss tokens) of one micro-batch {input_ids, attention_mask, loss_mask} [M,T]."""
  p = _model_params(params, lora_params, lora_scale)
  logits = models.forward(model_cfg, p, batch["input_ids"], batch["attention_mask"],
                          mesh=mesh, rules=rules)                  # [M,T,V]
  return shifted_nll(logits, batch["input_ids"], batch["loss_mask"])


def train_step(state, batch, rng, *, model_cfg, tx, schedule, lora_scale=None,
               mesh=None, rules=None):
  """One optimizer step over an accumulated batch.

  state: TrainState; batch: {input_ids, attention_mask, loss_mask} [A,M,T];
  rng: root key (the step is folded in here; unused by the deterministic model
  but kept so stochastic regularisers get a per-step key).
  Returns (state', metrics {loss, grad_norm, lr, loss_tokens}).
  """
  step_rng = jax.random.fold_in(rng, state.step)  # noqa: F841 (no stochastic layers yet)
  use_lora = state.lora is not None
  total = jnp.maximum(jnp.sum(batch["loss_mask"][:, :, 1:]).astype(jnp.float32), 1.0)

  def micro_sum(trainable, mb):
    params, lora_p = (state.params, trainable) if use_lora else (trainable, None)
    s, _ = batch_nll(params, lora_p, mb, model_cfg=model_cfg, lora_scale=lora_scale,
                     mesh=mesh, rules=rules)
    return s

  grad_fn = jax.value_and_grad(micro_sum)
  trainable = state.trainable

  def body(carry, mb):
    g_acc, s_acc = carry
    s, g = grad_fn(trainable, mb)
    g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
    return (g_acc, s_acc + s), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
  (grads, nll_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), batch)
  grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, trainable)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  if use_lora:
    new_state = state.replace(step=state.step + 1, lora=new_trainable, opt_state=opt_state)
  else:
    new_state = state.replace(step=state.step + 1, params=new_trainable, opt_state=opt_state)
  metrics = {"loss": nll_sum / total, "grad_norm": grad_norm,
             "lr": schedule(state.step), "loss_tokens": total}
  return new_state, metrics


def eval_step(state, batch, *, model_cfg, lora_scale=None, mesh=None, rules=None):
  """(sum NLL, loss tokens) of one validation batch [M,T] under `state`'s weights."""
  return batch_nll(state.params, state.lora, batch, model_cfg=model_cfg,
                   lora_scale=lora_scale, mesh=mesh, rules=rules)


# --------------------------------------------------------------------------
# Data: deterministic order, per-process assembly of the global batch.


def epoch_permutation(seed, epoch, n):
  """The order of the n training rows in `epoch` (same on every process/restart)."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def local_rows(sharding, global_shape, axis):
  """[lo, hi) of `axis` held by this process's devices (must be contiguous)."""
  idx = sharding.addressable_devices_indices_map(global_shape)
  spans = set()
  for sl in idx.values():
    s = sl[axis]
    spans.add((s.start or 0, global_shape[axis] if s.stop is None else s.stop))
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  covered = sum(b - a for a, b in spans)
  if covered != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous rows {sorted(spans)}")
  return lo, hi


def assemble(local, sharding, global_shape):
  """Global jax array from this process's rows (single process: a device_put)."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


class Batcher:
  """Global batches [A, M, T] for step s: epoch s // steps_per_epoch, drop-last.

  Every process knows every row's length (so all agree on the bucket T) and
  collates only the rows its devices hold.
  """

  def __init__(self, examples, *, accum, micro, seed, buckets, sharding):
    self.examples, self.accum, self.micro = examples, int(accum), int(micro)
    self.seed, self.buckets, self.sharding = int(seed), tuple(buckets), sharding
    self.global_batch = self.accum * self.micro
    self.steps_per_epoch = len(examples) // self.global_batch
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
    """[A, M] row indices of step `step`."""
    epoch, index = self.position(step)
    if epoch not in self._perm_cache:
      self._perm_cache = {epoch: epoch_permutation(self.seed, epoch, len(self.examples))}
    perm = self._perm_cache[epoch]
    rows = perm[index * self.global_batch:(index + 1) * self.global_batch]
    return rows.reshape(self.accum, self.micro)

  def batch(self, step):
    """(global batch dict of jax arrays [A,M,T], real tokens in the global batch)."""
    idx = self.indices(step)
    length = tokens.bucket_length(int(self._lengths[idx].max()), self.buckets)
    shape = (self.accum, self.micro, length)
    lo, hi = local_rows(self.sharding, shape, 1)
    parts = [tokens.collate_sft(self.examples, idx[a, lo:hi], length)
             for a in range(self.accum)]
    out = {k: assemble(np.stack([p[k] for p in parts]), self.sharding, shape)
           for k in parts[0]}
    return out, int(self._lengths[idx].sum())


def eval_batches(examples, *, micro, buckets, sharding, max_batches=-1):
  """Validation batches [M,T] in order; the last one padded with empty rows."""
  n = len(examples)
  count = -(-n // micro)
  if max_batches is not None and max_batches >= 0:
    count = min(count, max_batches)
  lengths = examples.lengths
  for b in range(count):
    idx = list(range(b * micro, min((b + 1) * micro, n)))
    length = tokens.bucket_length(int(lengths[idx].max()), buckets)
    shape = (micro, length)
    lo, hi = local_rows(sharding, shape, 0)
    full = idx + [-1] * (micro - len(idx))
    local = tokens.collate_sft(examples, full[lo:hi], length)
    yield {k: assemble(v, sharding, shape) for k, v in local.items()}


# --------------------------------------------------------------------------
# Setup helpers (reused by GDPO and evaluation).


def _tupleize(x):
  if isinstance(x, (list, tuple)):
    return tuple(_tupleize(v) for v in x)
  return x


def auto_mesh(mesh):
  """The same mesh with every axis in Auto mode (GSPMD propagation).

  jax.make_mesh now defaults to Explicit axes, under which un-annotated ops
  such as the embedding gather refuse to pick an output sharding; the step
  relies on explicit in/out shardings plus propagation instead.
  """
  types = getattr(mesh, "axis_types", None)
  auto = jax.sharding.AxisType.Auto
  if types is None or all(t == auto for t in types):
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(auto,) * len(mesh.axis_names))


def make_mesh(config, devices=None):
  """(mesh, rules) from the config's mesh section (Auto axes, see auto_mesh)."""
  n = int(config.mesh.get("num_devices", -1))
  if devices is None and n > 0:
    if jax.process_count() > 1:
      raise ValueError("mesh.num_devices only applies to single-process runs")
    if n > jax.device_count():
      raise ValueError(f"mesh.num_devices={n} > {jax.device_count()} devices")
    devices = jax.devices()[:n]
  mesh = auto_mesh(shd.make_mesh(_tupleize(config.mesh.shape), devices=devices))
  return mesh, _tupleize(config.mesh.rules)


def data_parallel_size(mesh):
  return int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES if a in mesh.shape]))


def model_config(config, tokenizer=None):
  """ModelConfig from model.hf_dir or model.preset, with the config's numerics.

  A preset model takes its vocabulary size and special ids from the tokenizer
  (rounded up to a multiple of 64); an HF model must cover the tokenizer.
  """
  over = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
              remat=bool(config.model.remat))
  if config.model.get("scan_layers", None) is not None:
    over["scan_layers"] = bool(config.model.scan_layers)
  extra = dict(_tupleize(config.model.get("overrides", ()) or ()))
  if config.model.hf_dir:
    if extra:
      raise ValueError(f"model.overrides {extra} only apply to a preset, not model.hf_dir")
    cfg = models.ModelConfig.from_hf(config.model.hf_dir, **over)
  else:
    if config.model.preset not in models.PRESETS:
      raise ValueError(f"model.preset {config.model.preset!r} unknown; "
                       f"known: {sorted(models.PRESETS)} (or set model.hf_dir)")
    if tokenizer is not None:
      over["vocab_size"] = -(-len(tokenizer) // 64) * 64
      over["eos_token_id"] = tokens.end_of_turn_id(tokenizer)
      over["pad_token_id"] = tokens.pad_id(tokenizer)
      over["bos_token_id"] = tokenizer.bos_token_id
    over.update(extra)
    cfg = models.ModelConfig.from_hf(models.PRESETS[config.model.preset], **over)
  if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
    raise ValueError(f"tokenizer has {len(tokenizer)} tokens > model vocab_size "
                     f"{cfg.vocab_size}")
  return cfg


def fingerprint(model_cfg, config, global_batch):
  """What must not change between a checkpoint and the run resuming from it."""
  hf = model_cfg.to_hf_dict()
  keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
          "tie_word_embeddings")
  lora_cfg = config.sft.lora
  return {"model": {k: hf.get(k) for k in keep},
          "param_dtype": model_cfg.param_dtype,
          "lora": ({"rank": int(lora_cfg.rank), "alpha": float(lora_cfg.alpha),
                    "targets": list(lora_cfg.targets)} if int(lora_cfg.rank) else {}),
          "global_batch": int(global_batch), "seed": int(config.seed)}


def write_run_files(workdir, config, model_cfg, tokenizer):
  """model_config.json, tokenizer/ and config.json next to the checkpoints (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, checkpoint.MODEL_CONFIG), "w") as f:
    json.dump(model_cfg.to_hf_dict(), f, indent=2)
  tok_dir = os.path.join(workdir, checkpoint.TOKENIZER)
  if not os.path.isdir(tok_dir):
    tokenizer.save_pretrained(tok_dir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


_REASONING = re.compile(r"<reasoning>.*?</reasoning>\s*", re.DOTALL)


def prepare_rows(rows, config, oracle=None):
  """The Safe-SFT curation hook on loaded rows.

  sft.curate: the teacher's list minus every item the oracle marks unsafe for
  the row's constraints (saferec.curate_sft_rows; rows left with no safe
  ground truth are dropped), with the <reasoning> block when sft.reasoning.
  Without curation (targets already curated), sft.reasoning=False strips any
  <reasoning> block. Returns (rows, report).
  """
  from safecrs_jax import saferec
  reasoning = bool(config.sft.get("reasoning", True))
  if config.sft.get("curate", True):
    if oracle is None:
      raise ValueError("sft.curate needs the safety oracle")
    rows, report = saferec.curate_sft_rows(rows, oracle, reasoning=reasoning)
    report = {k: v for k, v in report.items() if k != "dropped_indices"}
    return rows, report
  if not reasoning:
    rows = [dict(r, completion=_REASONING.sub("", r["completion"])) for r in rows]
  return rows, {"rows_in": len(rows), "rows_out": len(rows)}


def load_sft_examples(config, tokenizer, data_dir, split, oracle=None):
  """Loaded, curated and tokenized rows of `split`: (SFTExamples, curation report)."""
  from safecrs_jax import saferec
  rows = saferec.load_split(data_dir, split, stage="sft",
                            strict=config.data.get("strict", True))
  if config.sft.get("curate", True) and oracle is None:
    oracle = saferec.load_oracle(data_dir, risk_threshold=config.data.risk_threshold)
  rows, report = prepare_rows(rows, config, oracle)
  if not rows:
    raise ValueError(f"no SFT rows left in {data_dir} split {split!r} ({report})")
  return tokens.encode_sft(tokenizer, rows, int(config.tokenizer.max_length)), report


# --------------------------------------------------------------------------
# The loop.


class Run:
  """Everything `train` builds before looping; tests and GDPO use the pieces."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, os.path.abspath(workdir)
    lora_on = lora_lib.check_config(config.sft.lora)
    self.mesh, self.rules = make_mesh(config)
    self.data_dir = assets.resolve_data_dir(config)
    self.tokenizer = tokens.load_tokenizer(assets.resolve_tokenizer_path(config, self.data_dir))
    self.model_cfg = model_config(config, self.tokenizer)
    tokens._check_buckets(config.tokenizer.buckets, int(config.tokenizer.max_length),
                          "tokenizer")

    oracle = None
    if config.sft.get("curate", True):
      from safecrs_jax import saferec
      oracle = saferec.load_oracle(self.data_dir, risk_threshold=config.data.risk_threshold)
    self.train_examples, self.curation = load_sft_examples(
        config, self.tokenizer, self.data_dir, "train", oracle)
    self.val_examples, _ = load_sft_examples(
        config, self.tokenizer, self.data_dir, "validation", oracle)
    self.micro = int(config.sft.batch_size) * data_parallel_size(self.mesh)
    accum = int(config.sft.grad_accum)
    self.train_sharding = NamedSharding(self.mesh, PartitionSpec(None, shd.BATCH_AXES, None))
    self.eval_sharding = NamedSharding(self.mesh, PartitionSpec(shd.BATCH_AXES, None))
    self.batcher = Batcher(self.train_examples, accum=accum, micro=self.micro,
                           seed=config.seed, buckets=config.tokenizer.buckets,
                           sharding=self.train_sharding)
    n = int(config.sft.num_steps)
    self.total_steps = n if n > 0 else int(config.sft.epochs) * self.batcher.steps_per_epoch
    self.tx, self.schedule = optim.make_optimizer(config.optim, self.total_steps)
    self.lora_scale = (lora_lib.scale(config.sft.lora.alpha, config.sft.lora.rank)
                       if lora_on else None)

    # Abstract state -> shardings -> restore or initialise.
    rank, targets = int(config.sft.lora.rank), tuple(config.sft.lora.targets)
    abstract_params = models.abstract_params(self.model_cfg)

    def make_abstract():
      lora_p = (lora_lib.init(abstract_params, rank, targets, jax.random.key(0))
                if lora_on else None)
      params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_params)
      return ts.create(params, self.tx, lora_p)
    abstract = jax.eval_shape(make_abstract)
    self.state_shardings = ts.shardings(abstract, models.param_logical_axes(self.model_cfg),
                                        self.mesh, self.rules)
    self.abstract_state = ts.with_shardings(abstract, self.state_shardings)
    self.fingerprint = fingerprint(self.model_cfg, config, self.batcher.global_batch)
    ck = config.checkpoint
    self.ckpt = checkpoint.Checkpointer(
        os.path.join(self.workdir, checkpoint.CHECKPOINTS), save_every=ck.save_every,
        keep=ck.keep, async_save=ck.async_save)
    self.root_key = jax.random.key(int(config.seed))
    restored = self.ckpt.restore_latest(self.abstract_state, self.fingerprint)
    if restored is not None:
      self.state, self.data_state = restored
      self._check_position()
    else:
      self.state, self.data_state = self._init_state(rank, targets), None
    write_run_files(self.workdir, config, self.model_cfg, self.tokenizer)

    kw = dict(model_cfg=self.model_cfg, lora_scale=self.lora_scale, mesh=self.mesh,
              rules=self.rules)
    repl = NamedSharding(self.mesh, PartitionSpec())
    self.train_step = jax.jit(
        functools.partial(train_step, tx=self.tx, schedule=self.schedule, **kw),
        in_shardings=(self.state_shardings, self.train_sharding, repl),
        out_shardings=(self.state_shardings, repl), donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(eval_step, **kw),
                             in_shardings=(self.state_shardings, self.eval_sharding),
                             out_shardings=repl)

  def _init_state(self, rank, targets):
    cfg, mesh, rules = self.model_cfg, self.mesh, self.rules
    init_key, lora_key = jax.random.split(jax.random.fold_in(self.root_key, 1))
    if self.config.model.hf_dir:
      _, params = models.load_hf(self.config.model.hf_dir, mesh=mesh, rules=rules,
                                 dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 remat=cfg.remat, scan_layers=cfg.scan_layers)
    else:
      params = models.init_params(cfg, init_key, mesh=mesh, rules=rules)

    def make(params):
      lora_p = lora_lib.init(params, rank, targets, lora_key) if rank else None
      return ts.create(params, self.tx, lora_p)
    return jax.jit(make, out_shardings=self.state_shardings)(params)

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


def train(config, workdir, *, stop_at=None, step_hook=None):
  """Runs (or resumes) Safe-SFT in `workdir`; returns a summary dict.

  stop_at: leave after this global step with a checkpoint (time-sliced jobs;
  the schedule still spans the full run). step_hook(step, state): called
  after every step (tests, custom monitoring); keep it cheap.
  Summary: final_step, train_loss [(step, loss)] at each logging point (the
  loss of that step), val_loss [(step, loss)], preempted, truncation and
  curation reports, and `run` (the Run, holding the final state).
  """
  run = Run(config, workdir)
  log_cfg = config.log
  writer = metrics_log.MetricWriter(run.workdir, tensorboard=bool(log_cfg.tensorboard))
  start = int(jax.device_get(run.state.step))
  progress = metrics_log.Progress(run.total_steps, initial=start,
                                  enabled=bool(log_cfg.progress))
  watch = checkpoint.PreemptionWatch()
  summary = {"workdir": run.workdir, "start_step": start, "total_steps": run.total_steps,
             "train_loss": [], "val_loss": [], "preempted": False,
             "truncation": {"train": run.train_examples.report(),
                            "validation": run.val_examples.report()},
             "curation": run.curation}
  if start == 0:
    progress.write(f"sft: {len(run.train_examples)} train rows, {run.total_steps} steps, "
                   f"global batch {run.batcher.global_batch}, truncation "
                   f"{summary['truncation']}")
  else:
    progress.write(f"sft: resuming from step {start} in {run.ckpt.directory}")
  every, eval_every = max(int(log_cfg.every), 1), int(config.sft.eval_every)
  pending, tok_count, t0 = [], 0, time.perf_counter()

  def flush(step):
    """Fetches the pending step metrics (the only host sync) and writes them."""
    nonlocal pending, tok_count, t0
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    dt = time.perf_counter() - t0
    last = fetched[-1]
    record = {"train/loss": float(np.mean([m["loss"] for m in fetched])),
              "train/grad_norm": float(last["grad_norm"]), "train/lr": float(last["lr"]),
              "train/tokens_per_s": tok_count / dt, "train/step_time_s": dt / len(fetched)}
    writer.write(step, record)
    summary["train_loss"].extend((s, float(m["loss"])) for (s, _), m in zip(pending, fetched))
    progress.update(len(fetched), loss=record["train/loss"], lr=record["train/lr"])
    pending, tok_count, t0 = [], 0, time.perf_counter()

  def validate(step, state):
    nonlocal t0
    val = run.evaluate(state)
    writer.write(step, {"val/loss": val})
    summary["val_loss"].append((step, val))
    progress.write(f"step {step}: val loss {val:.4f}")
    t0 = time.perf_counter()  # keep evaluation out of tokens/s

  def save(step, state):
    run.ckpt.save(step, state, run.data_position(step), force=True)

  state, step = run.state, start
  try:
    if start == 0 and eval_every > 0:
      validate(0, state)
    while step < run.total_steps:
      batch, ntok = run.batcher.batch(step)
      state, metrics = run.train_step(state, batch, run.root_key)   # async dispatch
      step += 1
      pending.append((step, metrics))
      tok_count += ntok
      if step % every == 0 or step == run.total_steps:
        flush(step)
      if eval_every > 0 and (step % eval_every == 0 or step == run.total_steps):
        validate(step, state)
      if step_hook is not None:
        step_hook(step, state)
      if run.ckpt.should_save(step) or step == run.total_steps:
        save(step, state)
      if watch.reached(step) and step < run.total_steps:
        flush(step)
        save(step, state)
        summary["preempted"] = True
        progress.write(f"sft: SIGTERM at step {step}; checkpoint written, exiting")
        break
      if stop_at is not None and step >= stop_at:
        flush(step)
        save(step, state)
        break
  finally:
    run.ckpt.close()
    writer.close()
    progress.close()
    watch.close()
  run.state = state
  summary["final_step"] = step
  summary["run"] = run
  return summary
