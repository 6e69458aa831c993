"""Orbax checkpoints: save every N steps, keep the last k, resume, read saved items.

A run directory is self-describing:

    <workdir>/
      checkpoints/<step>/state   the train state pytree (orbax, sharded arrays)
      checkpoints/<step>/data    JSON: data position {epoch, index}, RNG seed,
                                 and a fingerprint of what produced the state
      model_config.json          HF config.json of the model being trained
      tokenizer/                 the HF tokenizer used to build the batches
      config.json                the full ml_collections config of the run
      checkpoints/<step>/checksums.json  sha256 of every file of state/ and data/,
                                 written once the (async) save has finished

Integrity: a step whose state/ is gone or whose files do not match
checksums.json is *damaged*; every reader (resume, policy.load_params,
export, evaluation) refuses it with one line naming the step — nothing falls
back to an older step silently. A step without checksums.json is refused too
(it cannot be told from a corrupted one), unless the user passes
`checkpoint.accept_unverified=True` (export_hf: `--accept_unverified`): then
its checksums are recorded from its files as they are, with a warning.
`checkpoint.verify=False` skips the hashing (the structure is still checked).

`Checkpointer.restore_latest(abstract_state, fingerprint)` is how a restarted
command resumes; a checkpoint that cannot be read, or that was written for a
different model / optimiser / LoRA setting, raises `CheckpointError` naming the
directory — it never silently starts over. Loading a whole model from a step
(config, tokenizer, LoRA merge) is `policy.load_policy`.
"""
import errno
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from safecrs_jax.infra import provenance, storage
from safecrs_jax.train.checkpoint_files import (  # noqa: F401 (the module's public names)
  ACCEPT_UNVERIFIED,
  CHECKPOINTS,
  MODEL_CONFIG,
  STEP_ITEMS,
  TOKENIZER,
  UNVERIFIED,
  CheckpointError,
  IncompatibleCheckpoint,
  check_step,
  find_step_dir,
  load_state_items,
  metadata_signature,
  normalise_keys,
  one_line,
  quiet_asyncio,
  run_dir_of,
  saved_lora_info,
  saved_steps,
  step_problem,
  tokenizer_dir,
  tree_signature,
)


def _own_bytes(leaf):
  """Bytes this process writes for one leaf (its shards with replica id 0)."""
  shards = getattr(leaf, "addressable_shards", None)
  if shards is None:
    return int(getattr(leaf, "nbytes", 0) or 0)
  return sum(int(sh.data.nbytes) for sh in shards if sh.replica_id == 0)


class Checkpointer:
  """CheckpointManager wrapper holding one train state plus a JSON data position."""

  def __init__(self, directory, *, save_every=500, keep=3, async_save=True, verify=True,
               save_every_minutes=0.0, clock=time.monotonic, accept_unverified=False):
    self.directory = storage.resolve(directory)
    self.save_every = int(save_every)
    self.save_every_minutes, self._clock = float(save_every_minutes or 0.0), clock
    self._last_save = clock()
    self.verify, self._async, self._unsealed = bool(verify), bool(async_save), []
    self.accept_unverified = bool(accept_unverified)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1), max_to_keep=int(keep),
        enable_async_checkpointing=bool(async_save), create=True,
        cleanup_tmp_directories=True)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add("state", args)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add("data", args)
    try:
      self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)
    except Exception as e:  # noqa: BLE001 - rethrown with the directory named
      raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e

  def latest_step(self):
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def should_save(self, step):
    """Every `save_every` steps, or once `save_every_minutes` passed since the last save.

    The time test is made on process 0's clock and broadcast, so every host
    saves the same step (all processes call this at every step).
    """
    if self.save_every > 0 and step % self.save_every == 0:
      return True
    if self.save_every_minutes <= 0:
      return False
    due = np.int32(self._clock() - self._last_save >= 60.0 * self.save_every_minutes)
    if jax.process_count() > 1:
      due = multihost_utils.broadcast_one_to_all(due)
    return bool(due)

  def save(self, step, state, data, *, force=False):
    """Saves `state` (pytree) and `data` (JSON-able dict) at `step` (async if enabled).

    Returns True if a save was started. A step that already exists is skipped.
    """
    if step in self._mngr.all_steps():
      return False
    if not force and not self.should_save(step):
      return False
    self.seal()
    self._check_space(step, state)
    started = self._mngr.save(int(step), force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data))))
    if started:
      self._last_save = self._clock()
      self._unsealed.append(int(step))
      if not self._async:
        self.seal()
    return started

  def _check_space(self, step, state):
    """ENOSPC before orbax starts a save that cannot fit on a local disk: its background
    threads would fail in the middle of the step (a half-written temporary step and
    hundreds of lines of tracebacks) instead of this one error."""
    if storage.is_remote(self.directory) or not os.path.isdir(self.directory):
      return
    need = sum(_own_bytes(x) for x in jax.tree.leaves(state))
    free = shutil.disk_usage(self.directory).free
    if free < need + (1 << 20):
      where = os.path.join(self.directory, str(step))
      raise OSError(errno.ENOSPC, f"No space left on device (checkpoint step {step} needs "
                    f"about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free)", where)

  def seal(self):
    """Waits for pending saves, then writes checksums.json of each finished step."""
    if not self._unsealed:
      return
    self._mngr.wait_until_finished()
    if jax.process_index() == 0:
      for step in self._unsealed:
        step_dir = os.path.join(self.directory, str(step))
        if storage.isdir(os.path.join(step_dir, "state")):   # not garbage-collected meanwhile
          provenance.write_manifest(step_dir, STEP_ITEMS)
    self._unsealed = []

  def check_compatible(self, step, abstract_state, fingerprint=None):
    """Raises CheckpointError unless step `step` matches the state's shapes/dtypes."""
    where = os.path.join(self.directory, str(step))
    try:
      data = self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
      meta = self._mngr.metadata(step).item_metadata["state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} is unreadable or corrupt: "
                            f"{one_line(e)}") from None
    if meta is None:
      raise CheckpointError(f"checkpoint {where} has no readable 'state' item")
    meta_tree = getattr(meta, "tree", meta)
    if fingerprint is not None:
      provenance.check(f"checkpoint {where}", data.get("fingerprint"),
                       fingerprint, error=IncompatibleCheckpoint)
    want = normalise_keys(tree_signature(abstract_state))
    have = normalise_keys(metadata_signature(meta_tree))
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    bad = sorted(k for k in set(want) & set(have) if want[k][0] != have[k][0])
    if missing or extra or bad:
      detail = []
      if missing:
        detail.append(f"missing {missing[:3]}")
      if extra:
        detail.append(f"unexpected {extra[:3]}")
      if bad:
        detail.append("shape mismatch " + ", ".join(
            f"{k}: saved {have[k][0]} vs expected {want[k][0]}" for k in bad[:3]))
      raise CheckpointError(f"checkpoint {where} does not match the train state: "
                            + "; ".join(detail))
    return data

  def read_data(self, step):
    """The JSON data item saved with `step` (data position, fingerprint, log window)."""
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(
          data=ocp.args.JsonRestore()))["data"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {os.path.join(self.directory, str(step))} has no "
                            f"readable data item: {one_line(e)}") from None

  def restore(self, step, abstract_state, fingerprint=None):
    """(state, data) of `step`, restored into `abstract_state`'s shardings."""
    where = os.path.join(self.directory, str(step))
    check_step(where, verify=self.verify, accept_unverified=self.accept_unverified)
    data = self.check_compatible(step, abstract_state, fingerprint)
    quiet_asyncio()
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} could not be restored ({one_line(e)}); "
                            f"delete {where} to resume from the step before it") from None
    return out["state"], data

  def restore_latest(self, abstract_state, fingerprint=None):
    """(state, data) of the latest step, or None when there is no checkpoint.

    A damaged newest step (state/ gone, checksum mismatch) is an error, never
    skipped in favour of an older one.
    """
    step = max(saved_steps(self.directory) + [s for s in [self.latest_step()] if s is not None],
               default=None)
    if step is None:
      self._refuse_stray_contents()
      return None
    return self.restore(step, abstract_state, fingerprint)

  def _refuse_stray_contents(self):
    """Entries that look like checkpoints but are not recognised: refuse to start over."""
    if not storage.isdir(self.directory):   # an object store may not show an empty "dir"
      return
    stray = [n for n in storage.listdir(self.directory)
             if not n.startswith(".") and "tmp" not in n]
    if stray:
      raise CheckpointError(
          f"checkpoint directory {self.directory} holds {sorted(stray)[:5]} but no "
          "readable checkpoint; refusing to start over (delete it to restart)")

  def discard_all(self):
    """Deletes every step (process 0) and reopens the manager: the run starts over."""
    self._mngr.wait_until_finished()
    self._unsealed = []
    if jax.process_index() == 0 and storage.isdir(self.directory):
      for name in storage.listdir(self.directory):
        path = os.path.join(self.directory, name)
        if storage.isdir(path):
          storage.rmtree(path)
    self._mngr.reload()

  def wait(self):
    """Blocks until pending async saves are finished."""
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self.seal()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

