"""A local stand-in for a `gs://` bucket, for tests (no network, no credentials).

`install(root)` makes every `gs://bucket/key` live at `<root>/bucket/key`:
  * fsspec's "gs"/"gcs" protocol becomes a DirFileSystem over `root`, which
    etils.epath (fsspec backend, used when TensorFlow is absent) and therefore
    orbax's metadata / commit files go through;
  * orbax's TensorStore array writes, which talk to GCS natively, get a `file`
    kvstore under `root` instead of the `gcs` one, and its bucket query
    (hierarchical namespace, through google-cloud-storage) answers "flat".
Nothing else is faked: the code under test sees real `gs://` strings.
"""
import sys

import fsspec.registry  # noqa: F401 - loads the module read through sys.modules
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.serialization import tensorstore_utils


def install(root, monkeypatch):
  root = str(root).rstrip("/")

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, *args, **kwargs):
      kwargs.pop("finalize_on_close", None)
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
      path = path[0] if isinstance(path, list) else path
      for p in ("gs://", "gcs://"):
        if path.startswith(p):
          return path[len(p):]
      return path.lstrip("/")

    def _join(self, path):
      if isinstance(path, str):
        return f"{root}/{self._strip_protocol(path)}".rstrip("/")
      return [self._join(p) for p in path]

  registry = sys.modules["fsspec.registry"]._registry   # `fsspec.registry` is a read-only view
  for name in ("gs", "gcs"):   # undone at teardown by monkeypatch; then call reset()
    monkeypatch.setitem(registry, name, FakeGCS)
  reset()

  def kvstore(path):
    return {"driver": "file", "path": f"{root}/{path.removeprefix('gs://')}"}

  gcs = tensorstore_utils.gcs_utils
  monkeypatch.setattr(gcs, "get_kvstore_for_gcs", kvstore)
  # orbax asks google-cloud-storage whether the bucket has a hierarchical
  # namespace; the stand-in is a flat bucket.
  monkeypatch.setattr(gcs, "is_hierarchical_namespace_enabled", lambda path: False)
  return root


def reset():
  """Forgets the filesystems etils.epath cached (after the monkeypatch is undone)."""
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
