"""Metric writers (JSON lines, TensorBoard, optionally Weights & Biases) and a progress bar.

Generic over metric names, shared by Safe-SFT and Safe-GDPO:

    writer = metrics_log.MetricWriter(workdir, tensorboard=True)
    writer.write(step, {"train/loss": 1.2, "train/lr": 5e-5})
    writer.close()

Only process 0 writes; other processes get a writer that does nothing, so the
training loop calls it unconditionally. Values may be Python/NumPy/JAX scalars
(converted with float(); call it at logging points only — it syncs the host).
"""
import json
import logging
import os
import time

import jax
import numpy as np

from safecrs_jax.infra import storage


def _scalar(v):
  if isinstance(v, (int, float, np.integer, np.floating, bool)):
    return float(v)
  arr = np.asarray(v)
  if arr.size != 1:
    raise ValueError(f"metric value must be a scalar, got shape {arr.shape}")
  return float(arr.reshape(()))


class JsonlWriter:
  """Appends {"step": s, "time": t, **metrics} lines to `path`.

  resume_step: the step a run restarts from; existing rows past it (written by
  the interrupted run after its last checkpoint) and torn lines are dropped
  first. 0 starts an empty file; None keeps everything.
  """

  def __init__(self, path, resume_step=None):
    storage.makedirs(os.path.dirname(storage.resolve(path)))
    if resume_step is not None and storage.exists(path):
      _truncate_after(path, int(resume_step))
    self._f = storage.open(path, "a", encoding="utf-8")

  def write(self, step, metrics, marks=None):
    """marks: JSON fields written as they are (e.g. {"preempted": True}); JSON lines only."""
    rec = {"step": int(step), "time": time.time()}
    rec.update({k: _scalar(v) for k, v in metrics.items()})
    rec.update(marks or {})
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()

  def close(self):
    self._f.close()


def _truncate_after(path, step):
  """Rewrites a metrics.jsonl keeping the well-formed rows with step <= `step` (0: none)."""
  keep = []
  with storage.open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if step > 0 and int(rec.get("step", 0)) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  storage.write_atomic(path, "".join(keep))


class TensorBoardWriter:
  """Scalars as TensorBoard events (tensorboardX) under `logdir`.

  purge_step: a new event file whose readers discard every event at or after
  this step from older files (the resumed run rewrites them).
  """

  def __init__(self, logdir, purge_step=None):
    from tensorboardX import SummaryWriter  # optional dependency at import time
    self._w = SummaryWriter(logdir=logdir, flush_secs=30, purge_step=purge_step)

  def write(self, step, metrics):
    for k, v in metrics.items():
      self._w.add_scalar(k, _scalar(v), int(step))

  def close(self):
    self._w.flush()
    self._w.close()


class WandbWriter:
  """Scalars to a Weights & Biases run (the optional `wandb` package, extra `.[wandb]`).

  `mode` is passed to wandb.init: "online", or "offline" (written under
  <workdir>/wandb, synced later with `wandb sync`). The run id is stable per
  workdir, so a resumed run continues the same W&B run.
  """

  def __init__(self, workdir, *, project, mode="online", name=None, config=None):
    try:
      import wandb  # optional dependency: only when log.wandb_project is set
    except ImportError as e:
      raise ImportError("log.wandb_project is set but wandb is not installed: "
                        "pip install -e '.[wandb]'") from e
    run_id = "safecrs-" + os.path.basename(storage.resolve(workdir).rstrip("/"))
    self._run = wandb.init(project=project, mode=mode, dir=workdir, id=run_id,
                           name=name or run_id, resume="allow", config=config,
                           reinit="create_new")

  def write(self, step, metrics):
    self._run.log({k: _scalar(v) for k, v in metrics.items()}, step=int(step))

  def close(self):
    self._run.finish()


class MetricWriter:
  """Fan-out to JSONL (`<workdir>/metrics.jsonl`), TensorBoard (`<workdir>/tb`) and,
  when `wandb_project` is given, Weights & Biases.

  Does nothing on processes other than 0 (or when `enabled=False`).
  """

  def __init__(self, workdir, *, tensorboard=True, jsonl_name="metrics.jsonl",
               enabled=None, resume_step=None, wandb_project="", wandb_mode="online",
               wandb_config=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writers = []
    if not self.enabled:
      return
    self._writers.append(JsonlWriter(os.path.join(workdir, jsonl_name), resume_step))
    if tensorboard and storage.is_remote(workdir):
      # tensorboardX writes gs:// only through TensorFlow; a local log synced
      # later would be lost with a preempted pod, so remote runs log JSONL only.
      logging.warning("TensorBoard is off for remote workdir %s (metrics.jsonl is written); "
                      "run with a local workdir for TensorBoard", workdir)
    elif tensorboard:
      # a fresh start hides every old event; a resume those after the restored step
      purge = None if resume_step is None else (int(resume_step) + 1 if resume_step else 0)
      self._writers.append(TensorBoardWriter(os.path.join(workdir, "tb"), purge))
    if wandb_project:
      self._writers.append(WandbWriter(workdir, project=wandb_project, mode=wandb_mode,
                                       config=wandb_config))

  def write(self, step, metrics, marks=None):
    """marks: fields that describe the row rather than measure (e.g. {"preempted": True}:
    its window was cut short); written to metrics.jsonl only."""
    if not self.enabled or not metrics:
      return
    for w in self._writers:
      if isinstance(w, JsonlWriter):
        w.write(step, metrics, marks)
      else:
        w.write(step, metrics)

  def close(self):
    for w in self._writers:
      w.close()
    self._writers = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def window_to_json(outs):
  """The per-step outputs of an open logging window (nested tuples / lists / dicts of
  scalars and arrays) as JSON, exactly: saved with a checkpoint so that the first row after
  a resume averages the same steps as a straight run (`window_from_json` reverses it)."""
  def enc(x):
    if isinstance(x, dict):
      return {"dict": {str(k): enc(v) for k, v in x.items()}}
    if isinstance(x, (list, tuple)):
      return {"tuple" if isinstance(x, tuple) else "list": [enc(v) for v in x]}
    if x is None or isinstance(x, (bool, int, float, str)):
      return {"py": x}
    arr = np.asarray(x)
    return {"array": arr.tolist(), "dtype": arr.dtype.name}
  return [enc(o) for o in jax.device_get(list(outs))]


def window_from_json(saved):
  """The outputs `window_to_json` saved ([] for None: a checkpoint without a window)."""
  def dec(x):
    if "dict" in x:
      return {k: dec(v) for k, v in x["dict"].items()}
    if "tuple" in x:
      return tuple(dec(v) for v in x["tuple"])
    if "list" in x:
      return [dec(v) for v in x["list"]]
    if "py" in x:
      return x["py"]
    return np.asarray(x["array"], dtype=jax.numpy.dtype(x["dtype"]))
  return [dec(o) for o in saved or ()]


def read_jsonl(path):
  """All records of a metrics.jsonl file (for tests, plots and reports)."""
  with storage.open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """tqdm bar over optimizer steps on process 0; a no-op elsewhere or when disabled."""

  def __init__(self, total, *, initial=0, desc="train", enabled=True):
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                       mininterval=1.0)

  def update(self, n=1, **postfix):
    if self._bar is None:
      return
    if postfix:
      self._bar.set_postfix({k: (f"{_scalar(v):.4g}" if not isinstance(v, str) else v)
                             for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def write(self, text):
    """Prints a line without breaking the bar (process 0 only)."""
    if self._bar is not None:
      self._bar.write(text)
    elif jax.process_index() == 0:
      print(text, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
