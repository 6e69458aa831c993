"""Local copies of remote files and directories, for readers that only open local paths
(Hugging Face tokenizers, safetensors mmaps, `datasets.load_from_disk`, the pickle readers).
A copy is keyed by the remote URI and every file's name, size and mtime, so a changed
remote object is copied afresh, never served stale.
"""
import hashlib
import os
import shutil
import tempfile

from safecrs_jax.infra import storage


def local_copy(path, cache_root=None):
  """A local directory with `path`'s files (for readers that need local files).

  A local path is returned as is. A remote directory is copied once into
  `cache_root` (default `$SAFECRS_CACHE` or ~/.cache/safecrs_jax) under a key
  of its URI and every file's name, size and mtime, so a changed remote
  directory gets a fresh copy; subdirectories are copied too.
  """
  if not storage.is_remote(path):
    return path
  path = storage.resolve(path)
  h = hashlib.sha256(path.encode())
  for rel in sorted(storage.walk_files(path)):
    h.update(f"\0{rel}\0{storage.stat_key(os.path.join(path, rel))}".encode())
  final = os.path.join(cache_root_dir(cache_root), "remote", h.hexdigest()[:24])
  if not os.path.isdir(final):
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="copy-", dir=os.path.dirname(final))
    storage.copy_tree(path, tmp)
    try:
      os.rename(tmp, final)
    except OSError:           # another process won the race
      shutil.rmtree(tmp, ignore_errors=True)
  return final


def local_file(path, cache_root=None):
  """A local path with `path`'s bytes (a remote file is copied once, keyed as above)."""
  if not storage.is_remote(path):
    return path
  path = storage.resolve(path)
  key = hashlib.sha256(f"{path}\0{storage.stat_key(path)}".encode()).hexdigest()[:24]
  final = os.path.join(cache_root_dir(cache_root), "remote", key, os.path.basename(path))
  if not os.path.isfile(final):
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.tmp.{os.getpid()}"
    storage.copy_file(path, tmp)
    os.replace(tmp, final)
  return final


def cache_root_dir(explicit):
  """Where remote copies are kept: `explicit`, else $SAFECRS_CACHE, else ~/.cache/safecrs_jax."""
  return explicit or os.environ.get("SAFECRS_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "safecrs_jax")
