"""The files of saved checkpoint steps: names, the run-directory layout, integrity checks,
and reading saved items without a Checkpointer (policy.load_policy builds on these).

Layout and integrity rules: the `checkpoint` module docstring.
"""
import json
import logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from safecrs_jax.infra import provenance, storage

CHECKPOINTS = "checkpoints"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer"


STEP_ITEMS = ("state", "data")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: unreadable, corrupt, damaged or incompatible."""


class IncompatibleCheckpoint(CheckpointError, provenance.ProvenanceError):
  """A readable checkpoint written from other inputs (model, data, settings, init)."""


def quiet_asyncio():
  """Orbax's background event loops log "Event loop is closed" after a failed read."""
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def one_line(e):
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def tree_signature(tree):
  """{path: (shape, dtype)} of every array leaf of a (possibly abstract) pytree."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    out[jax.tree_util.keystr(path)] = (tuple(shape) if shape is not None else None,
                                       str(np.dtype(dtype)) if dtype is not None else None)
  return out


def metadata_signature(meta_tree):
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


def normalise_keys(sig):
  """Key paths without attribute/dict syntax: ".params['a']" and "['params']['a']" agree."""
  def norm(k):
    for ch in "[]'\".":
      k = k.replace(ch, "/")
    return "/".join(p for p in k.split("/") if p)
  return {norm(k): v for k, v in sig.items()}


# --------------------------------------------------------------------------
# Reading saved steps (policy.load_policy builds on these).

def saved_steps(ckdir):
  """Sorted steps under a checkpoints directory: every <step>/ entry, damaged ones included.

  (orbax writes a step under a temporary name and renames it when finished, so
  a digit-named directory without state/ is damaged, not absent.)
  """
  if not storage.isdir(ckdir):
    return []
  return sorted(int(n) for n in storage.listdir(ckdir)
                if n.isdigit() and storage.isdir(os.path.join(ckdir, n)))


UNVERIFIED = "unverified"   # step_problem's answer for a step without checksums.json
ACCEPT_UNVERIFIED = ("checkpoint.accept_unverified=True (export_hf: --accept_unverified)")


def step_problem(step_dir, verify=True, accept_unverified=False):
  """None for a usable step directory, else what is wrong with it (one phrase), or
  UNVERIFIED for a finished step without checksums.json.

  Such a step (a crash between the end of an async save and its manifest, a checkpoint
  older than checksums, or a manifest deleted) cannot be told from a corrupted one, so it
  is refused unless `accept_unverified`: then its checksums are recorded from the files as
  they are now, with a warning.
  """
  if not storage.isdir(os.path.join(step_dir, "state")):
    return "its state/ directory is missing"
  if not verify:
    return None
  if provenance.read_manifest(step_dir) is None:
    if not accept_unverified:
      return UNVERIFIED
    if jax.process_index() == 0 and (storage.is_remote(step_dir) or os.access(step_dir, os.W_OK)):
      provenance.write_manifest(step_dir, STEP_ITEMS)
    logging.warning("checkpoint %s had no %s: accepted unverified as asked, its checksums "
                    "recorded from its files as they are now", step_dir, provenance.MANIFEST)
    print(f"warning: checkpoint {step_dir} had no {provenance.MANIFEST}; accepted unverified "
          "as asked, its checksums recorded from its files as they are now", file=sys.stderr,
          flush=True)
    return None
  return provenance.verify_manifest(step_dir, STEP_ITEMS)


def check_step(step_dir, verify=True, accept_unverified=False):
  """Raises CheckpointError (one line: the step, what is wrong, what to do) for a damaged or
  unverified step."""
  problem = step_problem(step_dir, verify, accept_unverified)
  step = os.path.basename(step_dir.rstrip("/"))
  if problem == UNVERIFIED:
    raise CheckpointError(
        f"checkpoint step {step} ({step_dir}) has no {provenance.MANIFEST}: its files cannot "
        f"be verified; pass {ACCEPT_UNVERIFIED} to accept it as it is, or delete that "
        "directory to use the step before it")
  if problem:
    raise CheckpointError(
        f"checkpoint step {step} ({step_dir}) is damaged: {problem}; delete that directory "
        "to use the step before it, or name another step explicitly")


def find_step_dir(path):
  """Step directory for a run dir (its latest step), its checkpoints/ dir, or a step dir.

  The step is checked for damage (state/ present); a damaged latest step is an
  error, not a reason to fall back to an older one.
  """
  path = storage.resolve(path)
  if storage.isdir(os.path.join(path, "state")) or (
      os.path.basename(path).isdigit() and storage.isdir(path)):
    check_step(path, verify=False)
    return path
  ckdir = os.path.join(path, CHECKPOINTS) if storage.isdir(
      os.path.join(path, CHECKPOINTS)) else path
  if not storage.isdir(ckdir):
    raise CheckpointError(f"{path} is not a run directory, checkpoints directory or step")
  steps = saved_steps(ckdir)
  if not steps:
    raise CheckpointError(f"no checkpoint found under {ckdir}")
  step_dir = os.path.join(ckdir, str(steps[-1]))
  check_step(step_dir, verify=False)
  return step_dir


def run_dir_of(step_dir):
  """The run directory (holding model_config.json / tokenizer/) of a step dir, or None."""
  d = os.path.dirname(os.path.dirname(storage.resolve(step_dir)))
  return d if storage.exists(os.path.join(d, MODEL_CONFIG)) else None


def load_state_items(path, abstract_items, verify=True, accept_unverified=False):
  """Restores only the named top-level items of a saved train state (checksums verified).

  abstract_items: {"params": abstract tree, "lora": abstract tree or None, ...}
  (jax.ShapeDtypeStruct leaves, with shardings to restore sharded). The optimiser
  state is never read. Returns the same dict with arrays.
  """
  step_dir = find_step_dir(path)
  check_step(step_dir, verify=verify, accept_unverified=accept_unverified)
  state_dir = os.path.join(step_dir, "state")
  items = {k: v for k, v in abstract_items.items() if v is not None}
  want = normalise_keys(tree_signature(items))
  try:
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
    meta_tree = getattr(meta, "tree", meta)
    have = normalise_keys(metadata_signature(meta_tree))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} is unreadable or corrupt: "
                          f"{one_line(e)}") from None
  bad = [k for k in want if k not in have or have[k][0] != want[k][0]]
  if bad:
    k = bad[0]
    raise CheckpointError(
        f"checkpoint {step_dir} does not match the requested params at {k}: saved "
        f"{have.get(k, ('absent',))[0]} vs expected {want[k][0]} ({len(bad)} mismatches)")
  restore_args = ocp.checkpoint_utils.construct_restore_args(items)
  quiet_asyncio()
  try:
    out = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=items, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} could not be restored: "
                          f"{one_line(e)}") from None
  return {k: out.get(k) if k in items else None for k in abstract_items}


def saved_lora_info(path):
  """The LoRA settings stored with a checkpoint ({} when trained without LoRA)."""
  step_dir = find_step_dir(path)
  try:
    with storage.open(os.path.join(step_dir, "data", "metadata"), encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {step_dir} has no readable data item: {e}") from e
  return (data.get("fingerprint") or {}).get("lora") or {}


def tokenizer_dir(path):
  """The tokenizer saved with the run that `path` (run / checkpoints / step dir) belongs to."""
  step_dir = find_step_dir(path)
  run_dir = run_dir_of(step_dir)
  tok = os.path.join(run_dir or "", TOKENIZER)
  if run_dir is None or not storage.isdir(tok):
    raise CheckpointError(f"{step_dir}: no {TOKENIZER}/ directory in its run directory")
  return tok
