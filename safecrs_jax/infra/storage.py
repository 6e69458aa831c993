# Copyright 2026 The safecrs_jax Authors.
# SPDX-License-Identifier: Apache-2.0
"""Paths that are local or remote (`gs://`, `s3://`, any `etils.epath` URI).

Paths stay plain strings. A local path keeps today's behaviour (`os`,
`shutil`, `os.path.abspath`); a URI goes through `etils.epath`, which uses
`tf.io.gfile` when TensorFlow is installed and fsspec otherwise (`gcsfs` for
`gs://`: `pip install .[gcs]`). `os.path.join`, `basename` and `dirname` work
on URIs unchanged, so callers keep using them.

Object stores have no rename and no append: `write_atomic` writes the final
object directly (a GCS object appears whole or not at all), and a file opened
for append on a remote path is rewritten in full on every `flush()`/`close()`
(fine for the small JSONL logs it is used for).
"""

import builtins
import contextlib
import fnmatch
import glob as globlib
import io
import os
import re
import shutil
import tempfile

from etils import epath


def is_remote(path):
  """True for `scheme://...` URIs other than `file://`."""
  path = os.fspath(path)
  return "://" in path and not path.startswith("file://")


def resolve(path):
  """Absolute local path, or the URI without a trailing slash."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/") if not path.endswith("://") else path
  return os.path.abspath(path.removeprefix("file://"))


def _p(path):
  return epath.Path(os.fspath(path))


def exists(path):
  return _p(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path):
  return _p(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path):
  if is_remote(path):
    p = _p(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def makedirs(path):
  """mkdir -p (object stores have no directories: creating one is harmless)."""
  if is_remote(path):
    _p(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path):
  """Entry names of a directory (not full paths)."""
  if is_remote(path):
    return [p.name for p in _p(path).iterdir()]
  return os.listdir(path)


def glob(pattern):
  """Paths matching `pattern` (wildcards in the last component only when remote)."""
  if not is_remote(pattern):
    return sorted(globlib.glob(pattern))
  parent, pat = os.path.split(pattern)
  if not isdir(parent):
    return []
  return sorted(os.path.join(parent, n) for n in listdir(parent) if fnmatch.fnmatch(n, pat))


def rmtree(path, ignore_errors=False):
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=ignore_errors)
    return
  try:
    _p(path).rmtree()
  except Exception:  # noqa: BLE001
    if not ignore_errors:
      raise


def remove(path):
  _p(path).unlink() if is_remote(path) else os.remove(path)


def stat_key(path):
  """(size, mtime) of a file where the backend reports them; a cheap change key."""
  if not is_remote(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  st = _p(path).stat()
  return int(st.length), float(getattr(st, "mtime", 0) or 0)


class _RemoteAppend(io.StringIO):
  """Text append to an object: the whole object is rewritten on flush/close."""

  def __init__(self, path):
    super().__init__()
    self._path = path
    if exists(path):
      with _p(path).open("r") as f:
        self.write(f.read())
    self._written = None

  def flush(self):
    super().flush()
    text = self.getvalue()
    if text != self._written:
      with _p(self._path).open("w") as f:
        f.write(text)
      self._written = text

  def close(self):
    if not self.closed:
      self.flush()
    super().close()


class UnsafePathError(ValueError):
  """A path the stack refuses to write: outside its work directory, or through a link."""


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_name(name, what):
  """`name` if it is safe as one folder / file name (letters, digits, '.', '_', '-', not
  starting with '.'), else an UnsafePathError naming `what` (e.g. "--runs name")."""
  if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
    raise UnsafePathError(f"{what} {name!r} cannot be a folder name: use letters, digits, "
                          "'.', '_' and '-', not starting with '.'")
  return name


def confined(root, *parts):
  """os.path.join(root, *parts), refused (UnsafePathError) unless it lies inside `root`
  once '..' and (local) symbolic links are resolved."""
  path = os.path.join(root, *parts)
  if is_remote(root):
    inside = ".." not in os.path.normpath(os.path.relpath(path, root)).split(os.sep) \
        and not any(os.path.isabs(p) for p in parts)
  else:
    base, real = os.path.realpath(root), os.path.realpath(path)
    inside = real == base or real.startswith(base.rstrip(os.sep) + os.sep)
  if not inside:
    raise UnsafePathError(f"{path} lies outside the work directory {root}")
  return path


class _ReplacingWrite:
  """A local file written to a temp file beside `path` and renamed over it on close.

  The rename replaces whatever entry `path` is (a symlink included) instead of
  writing through it into the link's target, and readers never see half a file.
  Leaving the block on an exception discards the temp file and keeps the old one.
  """

  def __init__(self, path, mode, encoding, errors, newline):
    self._path = path
    self._tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                             f".{os.path.basename(path)}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    # O_EXCL: never through an existing entry; 0o666 & umask like a plain open.
    fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
      self._f = os.fdopen(fd, mode.replace("x", "w"), encoding=encoding, errors=errors,
                          newline=newline)
    except BaseException:
      os.close(fd)
      os.unlink(self._tmp)
      raise

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __iter__(self):
    return iter(self._f)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.discard()

  def close(self):
    if self._f.closed:
      return
    try:
      self._f.close()
      os.replace(self._tmp, self._path)
    except BaseException:
      self.discard()
      raise

  def discard(self):
    if not self._f.closed:
      self._f.close()
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self._tmp)


def open(path, mode="r", encoding=None, errors=None, newline=None):  # noqa: A001
  """`builtins.open` locally; `epath.Path.open` remotely (UTF-8; append emulated).

  Local writes never go through a symlink: "w" / "x" write a temp file and rename it over
  `path` (a link there is replaced, see `_ReplacingWrite`; "x" still refuses an existing
  file), and "a" refuses a link (`UnsafePathError`).
  """
  if not is_remote(path):
    if "w" in mode or "x" in mode:
      if "x" in mode and os.path.lexists(path):
        raise FileExistsError(f"{path} exists")
      return _ReplacingWrite(path, mode, encoding, errors, newline)
    if "a" in mode and os.path.islink(path):
      raise UnsafePathError(f"refusing to append to {path}: it is a symbolic link")
    return builtins.open(path, mode, encoding=encoding, errors=errors, newline=newline)
  if "a" in mode:
    if "b" in mode:
      raise ValueError(f"binary append is not supported on {path}")
    return _RemoteAppend(path)
  return _p(path).open(mode)


def write_atomic(path, data):
  """Writes `data` (str or bytes) so readers never see a partial file.

  Local: tmp file + os.replace. Remote: the object is written directly (object
  stores publish an object only once its upload completes).
  """
  mode = "wb" if isinstance(data, bytes) else "w"
  enc = None if isinstance(data, bytes) else "utf-8"
  if is_remote(path):
    with open(path, mode) as f:
      f.write(data)
    return
  with open(path, mode, encoding=enc) as f:   # temp file + rename: a symlink is replaced
    f.write(data)


def copy_file(src, dst):
  """Copies one file across backends."""
  if not is_remote(src) and not is_remote(dst):
    if os.path.islink(dst):     # replace a link, never write through it
      os.unlink(dst)
    shutil.copy2(src, dst)
    return
  with open(src, "rb") as fi, open(dst, "wb") as fo:
    shutil.copyfileobj(fi, fo)


def copy_tree(src, dst):
  """Copies a directory tree across backends (dst is created; files overwritten)."""
  makedirs(dst)
  for name in listdir(src):
    s, d = os.path.join(src, name), os.path.join(dst, name)
    if isdir(s):
      copy_tree(s, d)
    else:
      copy_file(s, d)


def replace_dir(src, dst):
  """Moves directory `src` over `dst` (a rename locally, copy + delete remotely)."""
  rmtree(dst, ignore_errors=True)
  if is_remote(src) or is_remote(dst):
    copy_tree(src, dst)
    rmtree(src, ignore_errors=True)
  else:
    os.rename(src, dst)


@contextlib.contextmanager
def local_dir_for(path):
  """A local directory standing in for `path` while the block writes to it.

  Local: `path` itself (created). Remote: a temp dir copied to `path` on
  success (safetensors, plots and tokenizers are written by libraries that
  only know local files).
  """
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="safecrs-upload-") as tmp:
    yield tmp
    copy_tree(tmp, path)


def walk_files(root, sub=""):
  """Relative paths of every file under directory `root` (any backend)."""
  here = os.path.join(root, sub) if sub else root
  for name in listdir(here):
    rel = os.path.join(sub, name) if sub else name
    if isdir(os.path.join(root, rel)):
      yield from walk_files(root, rel)
    else:
      yield rel
