"""Issue 27: untrusted files run no code, writes stay in their work directory, hostile rows
cost linear bounded work, an unverified checkpoint step is never accepted silently."""
import json
import os
import pickle

import pytest

from safecrs_jax import saferec
from safecrs_jax.saferec import safe_pickle
from safecrs_jax.saferec.metrics import Catalog
from safecrs_jax.saferec.oracle import SafetyOracle

GORE = "Anti-gore / squeamish"


class _Payload:
  """Unpickling this with plain pickle.load creates the marker directory."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


# ------------------------------------------------------------------ 1. no code runs from data
def _released(root, catalog, mapping):
  (root / "downloaded_datasets").mkdir(parents=True)
  (root / "data" / "phase1_mapping").mkdir(parents=True)
  (root / "downloaded_datasets" / "movie_trait_sensitivity.json").write_text(json.dumps(
      [{"imdbId": "0000007", "traits": {GORE: {"final": 0.8}}}]))
  (root / "data" / "phase1_mapping" / "title_to_imdb.pkl").write_bytes(pickle.dumps(mapping))
  (root / "gt_catalog_complete.pkl").write_bytes(pickle.dumps(catalog))


@pytest.mark.parametrize("which", ["catalog", "mapping"])
def test_malicious_pickle_does_not_run(tmp_path, which):
  marker = tmp_path / "pwned"
  good_catalog, good_mapping = [("Heat", 1995)], {("heat", 1995): "tt0000007"}
  bad = [("Heat", 1995), _Payload(str(marker))]
  _released(tmp_path / "root", bad if which == "catalog" else good_catalog,
            {("heat", 1995): _Payload(str(marker))} if which == "mapping" else good_mapping)
  root = str(tmp_path / "root")
  name = "gt_catalog_complete.pkl" if which == "catalog" else "title_to_imdb.pkl"
  with pytest.raises(safe_pickle.UnsafePickleError) as e:
    saferec.load_catalog(root) if which == "catalog" else saferec.load_oracle(root)
  assert not marker.exists()
  msg = str(e.value)
  assert name in msg and "refusing to load type os.makedirs" in msg
  assert "\n" not in msg


def test_plain_pickles_still_load(tmp_path):
  """What SafeRec-mini and the released files hold: lists, tuples, dicts, sets, numpy ints."""
  np = pytest.importorskip("numpy")
  path = tmp_path / "cat.pkl"
  for protocol in (2, 4, 5):
    path.write_bytes(pickle.dumps([("Heat", 1995), ["Alien", "1979"], ("Up", np.int64(2009))],
                                  protocol=protocol))
    assert Catalog.from_pickle(str(path)).items == [("Heat", 1995), ("Alien", 1979), ("Up", 2009)]
    path.write_bytes(pickle.dumps({"a": {1, 2}, "b": frozenset([3])}, protocol=protocol))
    assert safe_pickle.load(str(path)) == {"a": {1, 2}, "b": frozenset([3])}
  path.write_bytes(pickle.dumps([np.array([1, 2])]))      # arrays run numpy's reconstructor
  with pytest.raises(safe_pickle.UnsafePickleError, match="cat.pkl: refusing"):
    safe_pickle.load(str(path))
  path.write_bytes(b"\x80\x04garbage")
  with pytest.raises(safe_pickle.UnsafePickleError, match="cat.pkl: not a readable"):
    safe_pickle.load(str(path))


def test_oracle_from_files_refuses_payload(tmp_path):
  marker = tmp_path / "pwned"
  (tmp_path / "t.json").write_text(json.dumps([{"imdbId": "1", "traits": {GORE: 0.9}}]))
  (tmp_path / "m.pkl").write_bytes(pickle.dumps({("heat", 1995): _Payload(str(marker))}))
  with pytest.raises(ValueError, match="m.pkl: refusing to load type"):
    SafetyOracle.from_files(str(tmp_path / "t.json"), str(tmp_path / "m.pkl"))
  assert not marker.exists()


def test_catalog_not_read_from_an_arbitrary_parent(tmp_path):
  """The parent directory is looked at only for the layout's own downloaded_datasets/."""
  _released(tmp_path, [("Heat", 1995)], {("heat", 1995): "tt0000007"})
  (tmp_path / "elsewhere").mkdir()
  with pytest.raises(FileNotFoundError):
    saferec.load_catalog(str(tmp_path / "elsewhere"))
  assert len(saferec.load_catalog(str(tmp_path / "downloaded_datasets"))) == 1
  assert len(saferec.load_catalog(str(tmp_path / "downloaded_datasets") + "/")) == 1
