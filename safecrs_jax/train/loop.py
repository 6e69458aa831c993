"""The books both training stages keep: run directory, restore-or-init, cadence, the loop.

    fp = stage_fingerprint(config, "sft", model_cfg, data=..., tokenizer=..., init=...)
    ckpt = open_checkpointer(config, workdir)
    state, data = restore_or_init(ckpt, abstract_state, fp, init_fn, overwrite=...)
    write_run_files(workdir, config, model_cfg, tokenizer)
    with Books(workdir, config.log, total, start, "sft") as books:
      state, step, preempted = run_loop(stage, state, start, books, log_every=...)

A stage (sft.Run, gdpo.Run) provides `total_steps`, `ckpt`,
`step(state, step) -> (state, out)` (dispatches work; no host sync),
`log(step, outs) -> (record, progress_fields)` (the one host sync, at logging
steps) and `data_position(step)` (the JSON saved beside each checkpoint). The
loop saves every `checkpoint.save_every` steps and at the last step, and on
SIGTERM (or a multi-host preemption notice) writes a final checkpoint and stops.

Provenance: a checkpoint is resumed only when its stage fingerprint (model,
data content, tokenizer, init checkpoint, every result-changing setting)
equals the current one; otherwise `checkpoint.IncompatibleCheckpoint` — or,
with checkpoint.overwrite, the old run's checkpoints and metrics are
discarded and the stage starts over. After a resume, metrics.jsonl rows past
the restored step are dropped and TensorBoard purges those steps.
"""
import json
import os
import signal
import tempfile
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from safecrs_jax.data import tokens
from safecrs_jax.infra import metrics_log, provenance, storage
from safecrs_jax.train import checkpoint


def due(step, every, total):
  """True at every `every`-th step and at the last one (never when every <= 0)."""
  return every > 0 and (step % every == 0 or step == total)


def epoch_permutation(seed, epoch, n):
  """The order of the n training rows in `epoch` (same on every process and restart)."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


# -- the run directory --------------------------------------------------------

_FINGERPRINT_MODEL_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def model_fingerprint(model_cfg):
  """The model facts a checkpoint must agree on to be resumed (architecture, dtype)."""
  hf = model_cfg.to_hf_dict()
  return {"model": {k: hf.get(k) for k in _FINGERPRINT_MODEL_KEYS},
          "param_dtype": model_cfg.param_dtype}


# Settings that do not change a stage's result: where things go, how often
# they are logged / saved / validated, how the devices are laid out.
_NOT_RESULT = {"stage", "log", "checkpoint", "mesh", "eval"}
# data.relational_*: in the fingerprint as relational_mix (the suite's settings) when on
_NOT_RESULT_FIELDS = {"data": ("dir", "cache_dir", "relational_mix", "relational_seed",
                               "relational_parts", "relational_controls"),
                      "tokenizer": ("path",),
                      "model": ("remat", "attention", "hf_dir"),
                      "sft": ("eval_every", "eval_batches"), "gdpo": ("init_checkpoint",)}
# Settings added after checkpoints were written: left out while at their
# off value, so those checkpoints still resume (and a run that turns one on
# refuses to resume them).
_OMITTED_WHEN = {"sft": {"backfill": False}}


def result_settings(config):
  """The config minus what cannot change the result (paths are replaced by content hashes)."""
  out = {}
  for key, value in json.loads(config.to_json()).items():
    if key in _NOT_RESULT:
      continue
    if isinstance(value, dict):
      off = _OMITTED_WHEN.get(key, {})
      value = {k: v for k, v in value.items() if k not in _NOT_RESULT_FIELDS.get(key, ())
               and not (k in off and v == off[k])}
    out[key] = value
  return out


def stage_fingerprint(config, stage, model_cfg, *, data, tokenizer, init, **extra):
  """What must match for a checkpoint of `stage` to be resumed.

  data: provenance.data_fingerprint of the data dir; tokenizer:
  provenance.tokenizer_hash; init: identity of the starting weights
  (policy.source_identity: path + step + checksum-manifest hash, HF dir hash,
  or the random preset); the result-changing settings of every section.
  """
  sections = result_settings(config)
  other = "gdpo" if stage == "sft" else "sft"
  sections.pop(other, None)        # the other stage's section cannot change this one
  return dict(model_fingerprint(model_cfg), stage=stage, data=data, tokenizer=tokenizer,
              init=init, settings=sections, **extra)


def write_run_files(workdir, config, model_cfg, tokenizer):
  """model_config.json, tokenizer/ and config.json next to the checkpoints (process 0).

  tokenizer/ is rewritten when it differs from `tokenizer` (a run started over).
  """
  if jax.process_index() != 0:
    return
  storage.makedirs(workdir)
  with storage.open(os.path.join(workdir, checkpoint.MODEL_CONFIG), "w") as f:
    json.dump(model_cfg.to_hf_dict(), f, indent=2)
  tok_dir = os.path.join(workdir, checkpoint.TOKENIZER)
  if not storage.isdir(tok_dir) or _saved_tokenizer_hash(tok_dir) != provenance.tokenizer_hash(
      tokenizer):
    tmp = tok_dir + ".tmp"
    storage.rmtree(tmp, ignore_errors=True)
    with storage.local_dir_for(tmp) as local:   # HF writes local files only
      tokenizer.save_pretrained(local)
    storage.replace_dir(tmp, tok_dir)
  with storage.open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))


def _saved_tokenizer_hash(tok_dir):
  try:
    return provenance.tokenizer_hash(tokens.load_tokenizer(tok_dir))
  except Exception:  # noqa: BLE001 - an unreadable tokenizer/ is rewritten
    return None


def open_checkpointer(config, workdir):
  """The run's Checkpointer under <workdir>/checkpoints, from config.checkpoint."""
  ck = config.checkpoint
  return checkpoint.Checkpointer(
      os.path.join(workdir, checkpoint.CHECKPOINTS), save_every=ck.save_every,
      keep=ck.keep, async_save=ck.async_save, verify=ck.verify,
      save_every_minutes=ck.save_every_minutes, accept_unverified=ck.accept_unverified)


def restore_or_init(ckpt, abstract_state, fingerprint, init_fn, *, overwrite=False):
  """(state, saved data position) of the latest checkpoint, else (init_fn(), None).

  A checkpoint written from other inputs raises IncompatibleCheckpoint, unless
  `overwrite`: then every checkpoint of the old run is deleted (with a notice).
  """
  try:
    restored = ckpt.restore_latest(abstract_state, fingerprint)
  except checkpoint.IncompatibleCheckpoint as e:
    if not overwrite:
      raise
    if jax.process_index() == 0:
      print(f"overwrite: discarding the checkpoints of {ckpt.directory}: {e}", flush=True)
    ckpt.discard_all()
    restored = None
  if restored is not None:
    return restored
  return init_fn(), None


# -- preemption ---------------------------------------------------------------

class PreemptionWatch:
  """Tells the loop when to write a final checkpoint and stop.

  Single process: a SIGTERM handler sets a flag (installed only from the main
  thread; the previous handler is restored by `close`). Several processes: all
  hosts must agree on the step, so jax's preemption sync point is used.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._flag.set()

  def reached(self, step):
    if self._multi:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service not enabled
        return False
    return self._flag.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# -- the loop -----------------------------------------------------------------

def device_memory():
  """{"mem/bytes_in_use", "mem/peak_bytes_in_use"} of this process's first device ({} on CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats:
    return {}
  return {f"mem/{k}": float(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use")
          if k in stats}


class Profile:
  """A jax.profiler trace over loop steps [start, stop) into <workdir>/profile (off if stop <= start)."""

  def __init__(self, workdir, steps):
    self.start, self.stop_at = (int(s) for s in steps)
    self.logdir = os.path.join(workdir, "profile")
    # a remote workdir: trace into a local dir, copied up when the trace stops
    self._local = tempfile.mkdtemp(prefix="safecrs-profile-") if storage.is_remote(
        workdir) and self.stop_at > self.start else None
    self.active = False

  def before(self, step):
    if self.stop_at > self.start and step == self.start and not self.active:
      jax.profiler.start_trace(self._local or self.logdir)
      self.active = True

  def after(self, step, state):
    if self.active and step >= self.stop_at:
      jax.block_until_ready(state)
      self.stop()

  def stop(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      if self._local:
        storage.copy_tree(self._local, self.logdir)


class Books:
  """Metric writers, progress bar and preemption watch of one training call."""

  def __init__(self, workdir, log_cfg, total, initial, desc, run_config=None):
    # Rows past the restored step came from the interrupted run: dropped.
    self.writer = metrics_log.MetricWriter(
        workdir, tensorboard=bool(log_cfg.tensorboard), resume_step=int(initial),
        wandb_project=str(log_cfg.wandb_project),
        wandb_mode=str(log_cfg.wandb_mode),
        wandb_config=None if run_config is None else run_config.to_dict())
    self.profile = Profile(workdir, log_cfg.profile_steps)
    self.progress = metrics_log.Progress(total, initial=initial, desc=desc,
                                         enabled=bool(log_cfg.progress))
    self.watch = PreemptionWatch()
    self.desc = desc

  def close(self):
    self.profile.stop()
    self.writer.close()
    self.progress.close()
    self.watch.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def run_loop(stage, state, start, books, *, log_every, hooks=(), stop_at=None):
  """Steps `stage` from `start` to stage.total_steps; returns (state, step, preempted).

  hooks: callables hook(step, state) after every step (validation, tests).
  stop_at: leave after this step with a checkpoint (time-sliced jobs). The
  checkpointer is closed (pending async saves finished) on the way out.
  """
  total, step, preempted = stage.total_steps, start, False
  # The logging window is saved with each checkpoint and restored here, so the first row
  # after a resume averages the same steps as a straight run's.
  pending = metrics_log.window_from_json(
      stage.ckpt.read_data(start).get("log_window") if start else None)
  logged = len(pending)            # restored steps: already counted by the progress bar

  def flush(cut=False):
    """One row for the window; cut=True (preemption, stop_at): a row off the log.every
    grid, marked "preempted", whose steps stay in the window saved with the checkpoint."""
    nonlocal logged
    if len(pending) > logged or (pending and not cut):
      record, fields = stage.log(step, list(pending))
      books.writer.write(step, dict(record, **device_memory()),
                         marks={"preempted": True} if cut else None)
      books.progress.update(len(pending) - logged, **fields)
      logged = len(pending)
      if not cut:
        pending.clear()
        logged = 0

  def save():
    stage.ckpt.save(step, state, dict(stage.data_position(step),
                                      log_window=metrics_log.window_to_json(pending)),
                    force=True)

  try:
    while step < total:
      books.profile.before(step)
      state, out = stage.step(state, step)
      step += 1
      books.profile.after(step, state)
      pending.append(out)
      if due(step, max(int(log_every), 1), total):
        flush()
      for hook in hooks:
        hook(step, state)
      if stage.ckpt.should_save(step) or step == total:
        save()
      if books.watch.reached(step) and step < total:
        flush(cut=True)
        save()
        preempted = True
        books.progress.write(f"{books.desc}: SIGTERM at step {step}; checkpoint written, "
                             "exiting")
        break
      if stop_at is not None and step >= stop_at:
        flush(cut=True)
        save()
        break
  finally:
    stage.ckpt.close()
  return state, step, preempted
