"""Orbax checkpoints: save every N steps, keep the last k, resume, read saved items.

A run directory is self-describing:

    <workdir>/
      checkpoints/<step>/state   the train state pytree (orbax, sharded arrays)
      checkpoints/<step>/data    JSON: data position {epoch, index}, RNG seed,
                                 and a fingerprint of what produced the state
      model_config.json          HF config.json of the model being trained
      tokenizer/                 the HF tokenizer used to build the batches
      config.json                the full ml_collections config of the run

`Checkpointer.restore_latest(abstract_state, fingerprint)` is how a restarted
command resumes; a checkpoint that cannot be read, or that was written for a
different model / optimiser / LoRA setting, raises `CheckpointError` naming the
directory — it never silently starts over. Loading a whole model from a step
(config, tokenizer, LoRA merge) is `policy.load_policy`.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINTS = "checkpoints"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: unreadable, corrupt or incompatible."""


def _tree_signature(tree):
  """{path: (shape, dtype)} of every array leaf of a (possibly abstract) pytree."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    out[jax.tree_util.keystr(path)] = (tuple(shape) if shape is not None else None,
                                       str(np.dtype(dtype)) if dtype is not None else None)
  return out


def _metadata_signature(meta_tree):
  """Signature of orbax's saved tree metadata (nested dicts of ArrayMetadata)."""
  out = {}
  def visit(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        visit(v, prefix + f"[{k!r}]")
    elif isinstance(node, (list, tuple)) and not hasattr(node, "shape"):
      for i, v in enumerate(node):
        visit(v, prefix + f"[{i}]")
    elif node is not None:
      shape = getattr(node, "shape", None)
      dtype = getattr(node, "dtype", None)
      out[prefix] = (tuple(shape) if shape is not None else None,
                     str(np.dtype(dtype)) if dtype is not None else None)
  visit(meta_tree, "")
  return out


def _normalise_keys(sig):
  """Key paths without attribute/dict syntax: ".params['a']" and "['params']['a']" agree."""
  def norm(k):
    for ch in "[]'\".":
      k = k.replace(ch, "/")
    return "/".join(p for p in k.split("/") if p)
  return {norm(k): v for k, v in sig.items()}


class Checkpointer:
  """CheckpointManager wrapper holding one train state plus a JSON data position."""

  def __init__(self, directory, *, save_every=500, keep=3, async_save=True):
    self.directory = os.path.abspath(directory)
    self.save_every = int(save_every)
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
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step, state, data, *, force=False):
    """Saves `state` (pytree) and `data` (JSON-able dict) at `step` (async if enabled).

    Returns True if a save was started. A step that already exists is skipped.
    """
    if step in self._mngr.all_steps():
      return False
    if not force and not self.should_save(step):
      return False
    return self._mngr.save(int(step), force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data))))

  def check_compatible(self, step, abstract_state, fingerprint=None):
    """Raises CheckpointError unless step `step` matches the state's shapes/dtypes."""
    where = os.path.join(self.directory, str(step))
    try:
      data = self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
      meta = self._mngr.metadata(step).item_metadata["state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} is unreadable or corrupt: "
                            f"{type(e).__name__}: {e}") from e
    if meta is None:
      raise CheckpointError(f"checkpoint {where} has no readable 'state' item")
    meta_tree = getattr(meta, "tree", meta)
    if fingerprint is not None:
      saved = data.get("fingerprint")
      if saved != json.loads(json.dumps(fingerprint)):
        diff = _dict_diff(saved or {}, json.loads(json.dumps(fingerprint)))
        raise CheckpointError(
            f"checkpoint {where} was written by an incompatible run ({diff}); "
            f"use a new --workdir or delete {self.directory}")
    want = _normalise_keys(_tree_signature(abstract_state))
    have = _normalise_keys(_metadata_signature(meta_tree))
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

  def restore(self, step, abstract_state, fingerprint=None):
    """(state, data) of `step`, restored into `abstract_state`'s shardings."""
    data = self.check_compatible(step, abstract_state, fingerprint)
    where = os.path.join(self.directory, str(step))
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} could not be restored: "
                            f"{type(e).__name__}: {e}") from e
    return out["state"], data

  def restore_latest(self, abstract_state, fingerprint=None):
    """(state, data) of the latest step, or None when there is no checkpoint."""
    step = self.latest_step()
    if step is None:
      self._refuse_stray_contents()
      return None
    return self.restore(step, abstract_state, fingerprint)

  def _refuse_stray_contents(self):
    """Entries that look like checkpoints but are not recognised: refuse to start over."""
    stray = [n for n in os.listdir(self.directory)
             if not n.startswith(".") and "tmp" not in n]
    if stray:
      raise CheckpointError(
          f"checkpoint directory {self.directory} holds {sorted(stray)[:5]} but no "
          "readable checkpoint; refusing to start over (delete it to restart)")

  def wait(self):
    """Blocks until pending async saves are finished."""
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _dict_diff(a, b, prefix=""):
  keys = sorted(set(a) | set(b))
  for k in keys:
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      d = _dict_diff(va, vb, f"{prefix}{k}.")
      if d:
        return d
    elif va != vb:
      return f"{prefix}{k}: saved {va!r}, now {vb!r}"
  return ""


# --------------------------------------------------------------------------
# Reading saved steps (policy.load_policy builds on these).

def saved_steps(ckdir):
  """Sorted steps under a checkpoints directory (entries <step>/ holding state/)."""
  if not os.path.isdir(ckdir):
    return []
  return sorted(int(n) for n in os.listdir(ckdir)
                if n.isdigit() and os.path.isdir(os.path.join(ckdir, n, "state")))


def find_step_dir(path):
  """Step directory for a run dir, its checkpoints/ dir, or a step dir itself."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    return path
  ckdir = os.path.join(path, CHECKPOINTS) if os.path.isdir(
      os.path.join(path, CHECKPOINTS)) else path
  if not os.path.isdir(ckdir):
    raise CheckpointError(f"{path} is not a run directory, checkpoints directory or step")
  steps = saved_steps(ckdir)
  if not steps:
    raise CheckpointError(f"no checkpoint found under {ckdir}")
  return os.path.join(ckdir, str(steps[-1]))


def run_dir_of(step_dir):
  """The run directory (holding model_config.json / tokenizer/) of a step dir, or None."""
  d = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
  return d if os.path.exists(os.path.join(d, MODEL_CONFIG)) else None


def load_state_items(path, abstract_items):
  """Restores only the named top-level items of a saved train state.

  abstract_items: {"params": abstract tree, "lora": abstract tree or None, ...}
  (jax.ShapeDtypeStruct leaves, with shardings to restore sharded). The optimiser
  state is never read. Returns the same dict with arrays.
  """
  step_dir = find_step_dir(path)
  state_dir = os.path.join(step_dir, "state")
  items = {k: v for k, v in abstract_items.items() if v is not None}
  want = _normalise_keys(_tree_signature(items))
  try:
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    meta_tree = getattr(meta, "tree", meta)
    have = _normalise_keys(_metadata_signature(meta_tree))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} is unreadable or corrupt: {e}") from e
  bad = [k for k in want if k not in have or have[k][0] != want[k][0]]
  if bad:
    k = bad[0]
    raise CheckpointError(
        f"checkpoint {step_dir} does not match the requested params at {k}: saved "
        f"{have.get(k, ('absent',))[0]} vs expected {want[k][0]} ({len(bad)} mismatches)")
  restore_args = ocp.checkpoint_utils.construct_restore_args(items)
  try:
    out = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=items, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} could not be restored: {e}") from e
  return {k: out.get(k) if k in items else None for k in abstract_items}


def saved_lora_info(path):
  """The LoRA settings stored with a checkpoint ({} when trained without LoRA)."""
  step_dir = find_step_dir(path)
  try:
    with open(os.path.join(step_dir, "data", "metadata"), encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {step_dir} has no readable data item: {e}") from e
  return (data.get("fingerprint") or {}).get("lora") or {}


def tokenizer_dir(path):
  """The tokenizer saved with the run that `path` (run / checkpoints / step dir) belongs to."""
  step_dir = find_step_dir(path)
  run_dir = run_dir_of(step_dir)
  tok = os.path.join(run_dir or "", TOKENIZER)
  if run_dir is None or not os.path.isdir(tok):
    raise CheckpointError(f"{step_dir}: no {TOKENIZER}/ directory in its run directory")
  return tok
