"""Reading the released pickles without running code from them.

`gt_catalog_complete.pkl` (a list of (title, year)) and `title_to_imdb.pkl`
(a dict {(normalised_title, year): imdbId}) hold only plain containers and
scalars, which pickle stores as opcodes that import nothing. A plain
`pickle.load` would also import and call whatever a `__reduce__` payload names
(`os.system`, ...); `load` imports only the few harmless types below (sets and
frozensets as protocol 2 writes them, numpy scalars of plain dtypes as a
pandas-built file may hold) and refuses everything else with one line naming
the file and the type.
"""
from __future__ import annotations

import io
import pickle

# (module, name) that a released data pickle may legitimately reference.
_ALLOWED = {
    ("builtins", "set"), ("builtins", "frozenset"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"),       # protocol 2 from Python 2
    ("numpy", "dtype"),                                           # numpy scalars: the dtype
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),                # protocol 2 writes bytes as encode(str, "latin1")
}
# numpy dtypes a scalar may carry: numbers, bools and strings (no objects).
_SCALAR_KINDS = "biufUS"


class UnsafePickleError(ValueError):
  """A data pickle that references a type the loader does not admit."""


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise UnsafePickleError(f"{self._path}: refusing to load type {module}.{name} (a data "
                              "pickle may hold only lists, tuples, dicts, sets, strings and "
                              "numbers)")
    obj = super().find_class(module, name)
    if name == "scalar":
      return _checked_scalar(obj, self._path)
    if name == "encode":
      return _latin1(obj, self._path)
    return obj


def _latin1(encode, path):
  def make(text, encoding="utf-8"):
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
      raise UnsafePickleError(f"{path}: refusing to load _codecs.encode({encoding!r})")
    return encode(text, encoding)
  return make


def _checked_scalar(scalar, path):
  def make(dtype, *args):
    if getattr(dtype, "kind", "O") not in _SCALAR_KINDS:
      raise UnsafePickleError(f"{path}: refusing to load a numpy scalar of dtype {dtype}")
    return scalar(dtype, *args)
  return make


def load(path: str):
  """The object pickled in the local file `path`, refusing any code-bearing type."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return _Unpickler(io.BytesIO(data), path).load()
  except UnsafePickleError:
    raise
  except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
          TypeError, ValueError) as e:
    raise UnsafePickleError(f"{path}: not a readable data pickle ({type(e).__name__}: {e})") \
        from None
