"""Where an artefact came from: content hashes, fingerprints, and the check on reuse.

    fp = {"data": provenance.data_fingerprint(data_dir), "tokenizer": tokenizer_hash(tok), ...}
    provenance.check("checkpoint runs/sft/checkpoints/20", recorded=saved_fp, current=fp)

Every artefact the stack writes and later reuses (checkpoints, tokenizers,
generations) records a fingerprint of its inputs; every reuse calls `check`,
which raises `ProvenanceError` naming the artefact, the first field that
differs (recorded vs now) and how to proceed. Hashes are sha256, streamed in
1 MiB blocks, so multi-GB files never sit in memory. `write_manifest` /
`verify_manifest` keep per-file checksums of a directory (checkpoint steps).
"""
import hashlib
import json
import os

import jax

import safecrs_jax
from safecrs_jax.infra import storage

MANIFEST = "checksums.json"
_BLOCK = 1 << 20
_TREE_MEMO = {}
HOW_TO_PROCEED = ("rerun with --overwrite (config: checkpoint.overwrite=True) to discard it, "
                  "or use a new --workdir")


class ProvenanceError(RuntimeError):
  """A stored artefact was produced from other inputs than the ones now in use."""


def file_sha256(path):
  """Hex sha256 of a file's bytes."""
  h = hashlib.sha256()
  with storage.open(path, "rb") as f:
    for block in iter(lambda: f.read(_BLOCK), b""):
      h.update(block)
  return h.hexdigest()


def _files(root, skip=()):
  """Relative paths of the regular files under `root`, sorted (hidden files skipped)."""
  if storage.is_remote(root):
    return sorted(rel for rel in storage.walk_files(root)
                  if not any(p.startswith(".") for p in rel.split("/")) and rel not in skip)
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(n for n in dirs if not n.startswith("."))
    for n in files:
      rel = os.path.relpath(os.path.join(d, n), root)
      if not n.startswith(".") and rel not in skip:
        out.append(rel)
  return sorted(out)


def manifest(root, skip=()):
  """{relative path: sha256} of every file under directory `root`."""
  return {rel: file_sha256(os.path.join(root, rel)) for rel in _files(root, skip)}


def digest(obj):
  """Short hex sha256 of a JSON-able object (canonical JSON)."""
  text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def tree_hash(path):
  """Content hash of a file or a directory tree (names and bytes), memoised per process.

  The memo is keyed by every file's (name, size, mtime), so an edited file is
  hashed again.
  """
  path = storage.resolve(path)
  if storage.isfile(path):
    key = (path, ((os.path.basename(path), *storage.stat_key(path)),))
    files = None
  else:
    files = _files(path)
    key = (path, tuple((f, *_stat(os.path.join(path, f))) for f in files))
  if key not in _TREE_MEMO:
    if files is None:
      _TREE_MEMO[key] = file_sha256(path)[:16]
    else:
      _TREE_MEMO[key] = digest(manifest(path))
  return _TREE_MEMO[key]


def _stat(path):
  return storage.stat_key(path)


def data_fingerprint(data_dir):
  """Content hash of a SafeRec data directory (or .jsonl file): every file it holds."""
  return tree_hash(data_dir)


def tokenizer_hash(tokenizer):
  """Hash of what a tokenizer does: its full serialisation, chat template and special tokens."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  body = backend.to_str() if backend is not None else json.dumps(
      sorted(tokenizer.get_vocab().items()))
  return digest({"tokenizer": body, "chat_template": getattr(tokenizer, "chat_template", None),
                 "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                 "len": len(tokenizer)})


def software_version():
  """The package and jax versions (recorded with every fingerprint)."""
  return {"safecrs_jax": safecrs_jax.__version__, "jax": jax.__version__}


def first_difference(recorded, current, prefix=""):
  """(dotted field, recorded value, current value) of the first difference, or None."""
  if isinstance(recorded, dict) and isinstance(current, dict):
    for k in sorted(set(recorded) | set(current), key=str):
      if k not in recorded or k not in current:
        return (prefix + str(k), recorded.get(k, "<absent>"), current.get(k, "<absent>"))
      d = first_difference(recorded[k], current[k], f"{prefix}{k}.")
      if d:
        return d
    return None
  return None if recorded == current else (prefix.rstrip(".") or "<value>", recorded, current)


def _norm(obj):
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


def check(artefact, recorded, current, how=HOW_TO_PROCEED, error=ProvenanceError):
  """Raises `error` unless `recorded` == `current` (JSON-normalised fingerprints)."""
  d = first_difference(_norm(recorded) if recorded is not None else {}, _norm(current))
  if d is None:
    return
  field, was, now = d
  raise error(f"{artefact} is incompatible: it was produced from other inputs ({field} "
              f"recorded {_short(was)}, now {_short(now)}); {how}")


def _short(value, n=120):
  s = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
  return s if len(s) <= n else s[:n] + "..."


# -- per-file checksums of a directory ------------------------------------------

def write_manifest(root, subdirs):
  """Writes <root>/checksums.json: sha256 of every file under root/<subdir> for subdirs."""
  files = {}
  for sub in subdirs:
    if storage.isdir(os.path.join(root, sub)):
      files.update({os.path.join(sub, rel): h
                    for rel, h in manifest(os.path.join(root, sub)).items()})
  storage.write_atomic(os.path.join(root, MANIFEST), json.dumps(
      {"files": files, "software": software_version()}, indent=1, sort_keys=True))
  return files


def read_manifest(root):
  """The {relative path: sha256} recorded in <root>/checksums.json, or None."""
  path = os.path.join(root, MANIFEST)
  if not storage.exists(path):
    return None
  with storage.open(path, encoding="utf-8") as f:
    return json.load(f)["files"]


def verify_manifest(root, subdirs):
  """None when every recorded file is present and unchanged, else a one-line problem."""
  want = read_manifest(root)
  if want is None:
    return f"no {MANIFEST}"
  have = set()
  for sub in subdirs:
    if storage.isdir(os.path.join(root, sub)):
      have.update(os.path.join(sub, rel) for rel in _files(os.path.join(root, sub)))
  for rel in sorted(set(want) | have):
    path = os.path.join(root, rel)
    if rel not in want:
      return f"{path} is not in {MANIFEST}"
    if rel not in have:
      return f"{path} is missing"
    if file_sha256(path) != want[rel]:
      return f"{path} does not match its recorded sha256"
  return None
