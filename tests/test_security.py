"""Issue 27: untrusted files run no code, writes stay in their work directory, hostile rows
cost linear bounded work, an unverified checkpoint step is never accepted silently."""
import json
import os
import pickle

import pytest

from safecrs_jax import saferec
from safecrs_jax.infra import storage
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


# ------------------------------------------------------------------ 2. writes stay inside
@pytest.mark.parametrize("name", ["../../escaped", "/abs/olute", ".hidden", "..", "", "a/b",
                                  "sp ace", "x\n"])
def test_unsafe_names_refused(name):
  with pytest.raises(storage.UnsafePathError, match="cannot be a folder name"):
    storage.check_name(name, "--runs name")


@pytest.mark.parametrize("name", ["sft", "step_10", "Qwen2.5-0.5B-Instruct", "-x", "a.b"])
def test_safe_names_accepted(name):
  assert storage.check_name(name, "split") == name


def test_confined_resolves_dots_and_links(tmp_path):
  work, outside = tmp_path / "work", tmp_path / "outside"
  work.mkdir()
  outside.mkdir()
  assert storage.confined(str(work), "a", "b") == str(work / "a" / "b")
  with pytest.raises(storage.UnsafePathError, match="outside the work directory"):
    storage.confined(str(work), "..", "outside", "x")
  with pytest.raises(storage.UnsafePathError):
    storage.confined(str(work), "/etc")
  (work / "link").symlink_to(outside)
  with pytest.raises(storage.UnsafePathError):
    storage.confined(str(work), "link", "report.json")


def test_compare_refuses_escaping_run_names(tmp_path):
  """launch.evaluate --runs=../../escaped=RUN: refused before anything is written."""
  from safecrs_jax import evaluation
  work = tmp_path / "a" / "b" / "work"
  for name in ("../../escaped", str(tmp_path / "abs")):
    with pytest.raises(storage.UnsafePathError, match="--runs name"):
      evaluation.compare(None, {"ok": "x", name: "y"}, workdir=str(work))
  assert sorted(p.name for p in tmp_path.rglob("*")) == []


@pytest.mark.parametrize("fname", ["config.json", "curation.json", "model_config.json"])
def test_writes_replace_a_symlink(tmp_path, fname):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  work = tmp_path / "work"
  work.mkdir()
  link = work / fname
  link.symlink_to(victim)
  with storage.open(str(link), "w", encoding="utf-8") as f:
    json.dump({"a": 1}, f)
  assert victim.read_text() == "precious"
  assert not link.is_symlink() and json.loads(link.read_text()) == {"a": 1}
  link.unlink()
  link.symlink_to(victim)
  storage.write_atomic(str(link), b"xyz")
  assert victim.read_text() == "precious" and link.read_bytes() == b"xyz"
  link.unlink()
  link.symlink_to(victim)
  src = tmp_path / "src"
  src.write_text("copied")
  storage.copy_file(str(src), str(link))
  assert victim.read_text() == "precious" and link.read_text() == "copied"
  link.unlink()
  link.symlink_to(victim)
  with pytest.raises(storage.UnsafePathError, match="symbolic link"):
    storage.open(str(link), "a", encoding="utf-8")
  assert victim.read_text() == "precious"
  assert sorted(p.name for p in work.iterdir()) == [fname]   # no temp file left


def test_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text("old")
  with pytest.raises(RuntimeError), storage.open(str(path), "w") as f:
    f.write("half")
    raise RuntimeError
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
  from safecrs_jax.data import tokens
  d = str(tmp_path_factory.mktemp("tok"))
  tokens.build_local_tokenizer(["a b c abc abd", "<solution>\nx (1999)\n</solution>"] * 4, d,
                               vocab_size=300)
  return tokens.load_tokenizer(d)


def test_run_files_not_written_through_links(tmp_path, tiny_tokenizer):
  """loop.write_run_files: model_config.json and config.json replace planted links."""
  import ml_collections

  from safecrs_jax.train import loop
  victim = tmp_path / "victim"
  victim.write_text("precious")
  work = tmp_path / "run"
  work.mkdir()
  for name in ("config.json", "model_config.json"):
    (work / name).symlink_to(victim)

  class Cfg:
    def to_hf_dict(self):
      return {"model_type": "llama"}

  loop.write_run_files(str(work), ml_collections.ConfigDict({"a": 1}), Cfg(), tiny_tokenizer)
  assert victim.read_text() == "precious"
  assert json.loads((work / "model_config.json").read_text()) == {"model_type": "llama"}
  assert json.loads((work / "config.json").read_text()) == {"a": 1}


def test_hf_index_names_confined(tmp_path):
  np = pytest.importorskip("numpy")
  from safetensors.numpy import save_file

  from safecrs_jax.models import hf_io
  model = tmp_path / "model"
  model.mkdir()
  save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "outside.safetensors"))
  save_file({"w": np.zeros(2, np.float32)}, str(model / "inside.safetensors"))
  index = model / hf_io.INDEX_FILE
  for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
    index.write_text(json.dumps({"weight_map": {"w": bad}}))
    with pytest.raises(hf_io.CheckpointError, match="is not a file name inside"):
      hf_io._open_checkpoint(str(model))
  index.write_text(json.dumps({"weight_map": {"w": "inside.safetensors"}}))
  assert list(hf_io._open_checkpoint(str(model))) == ["w"]
  index.write_text("{trunc")
  with pytest.raises(hf_io.CheckpointError, match="index.json: not valid JSON"):
    hf_io._open_checkpoint(str(model))


# ------------------------------------------------------------------ 3. bounded work
def test_tokenizer_training_capped_on_a_huge_field(tmp_path, capsys):
  """A 1 MB field without spaces (minutes of BPE training) is cut to MAX_FIELD_CHARS, and the
  build says so; the tokenizer equals one trained on the cut field."""
  from safecrs_jax.data import tokens
  base = ["I am terrified of spiders, please keep that in mind.", "Alien (1979)"] * 30
  huge = "".join("abcdefghij"[(i * 7919) % 10] for i in range(1_000_000))
  tokens.build_local_tokenizer(base + [huge], str(tmp_path / "a"), vocab_size=400)
  assert "1 fields cut to" in capsys.readouterr().err
  tokens.build_local_tokenizer(base + [huge[:tokens.MAX_FIELD_CHARS]], str(tmp_path / "b"),
                               vocab_size=400)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tokenizer_caps_leave_real_data_alone(tmp_path):
  """SafeRec-mini's texts (the demo tokenizer's input) pass the caps unchanged, so the demo
  tokenizer is bit-identical."""
  from safecrs_jax import saferec
  from safecrs_jax.data import tokens
  from safecrs_jax.saferec import mini
  mini.generate(str(tmp_path), seed=0, sizes={("sft", "train"): 300}, with_statistics=False)
  texts = [t for t in tokens.rows_texts(saferec.load_split(str(tmp_path), "train")) if t]
  out, cut, full = tokens._training_texts(texts)
  assert cut == 0 and not full
  assert len(out) == len(texts) and all(a is b for a, b in zip(out, texts, strict=True))
  assert tokens.MAX_FIELD_CHARS >= 100 * max(map(len, texts))


def test_build_once_cleans_its_temp_folder(tmp_path):
  from safecrs_jax.data import assets
  final = tmp_path / "tokenizer_v2_abc"

  def interrupted(tmp):
    open(os.path.join(tmp, "half"), "w").close()
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    assets.build_once(str(final), interrupted)
  assert os.listdir(tmp_path) == []
  # A folder left by a killed build of this host (its process is gone) is removed by the
  # next build; one of a live process is left alone.
  dead = tmp_path / f"tokenizer_v2_abc.tmp-{assets._HOST}-999999999-x1"
  live = tmp_path / f"tokenizer_v2_abc.tmp-{assets._HOST}-{os.getppid()}-x2"
  dead.mkdir()
  live.mkdir()
  assets.build_once(str(final), lambda tmp: open(os.path.join(tmp, "ok"), "w").close())
  assert sorted(os.listdir(tmp_path)) == sorted([final.name, live.name])


def _reference_strip_format(text):
  """parsing._strip_format before issue 27 (a copy per round: quadratic in the line)."""
  import re
  lead, trail = re.compile(r"^[*_\-#]+"), re.compile(r"[*_\-#]+$")
  bullet = re.compile(r"^(?:[*_\-#]+\s+|\d+\s*[.)、\-—–]\s+)")
  hashes = re.compile(r"^#+\s*")
  text = text.strip()
  while True:
    new = lead.sub("", text).strip()
    new = trail.sub("", new).strip()
    new = bullet.sub("", new).strip()
    new = hashes.sub("", new)
    if new == text:
      return text
    text = new


def test_strip_format_same_result_without_copies(monkeypatch):
  import random

  from safecrs_jax.saferec import parsing
  rng = random.Random(0)
  alphabet = list("*_-#12 .)\t、—–a(\"'“”\n") + ["\u00a0", "\u3000", "Heat (1995)", " (2001) "]
  for _ in range(20000):
    t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
    assert parsing._strip_format(t) == _reference_strip_format(t), repr(t)
  # A line of 300 list numbers takes 300 rounds; each round must read the line in place
  # (the old rounds each copied the rest of the line: 1 MB of such lines took 1.4 s).
  seen = []
  real = parsing._BULLET_OR_NUMBER_AT

  class Spy:
    def match(self, text, pos, endpos):
      seen.append(text)
      return real.match(text, pos, endpos)

  monkeypatch.setattr(parsing, "_BULLET_OR_NUMBER_AT", Spy())
  line = "1. " * 300 + "Heat (1995)"
  assert parsing._strip_format(line) == "Heat (1995)"
  assert len(seen) > 300 and all(t is line for t in seen)


# ------------------------------------------------------------------ 5. unverified steps
def test_step_without_checksums_refused_unless_accepted(tmp_path, capsys):
  import jax.numpy as jnp

  from safecrs_jax.infra import provenance
  from safecrs_jax.train import checkpoint
  state = {"w": jnp.arange(64, dtype=jnp.float32)}
  with checkpoint.Checkpointer(str(tmp_path / "ck"), save_every=1, async_save=False) as ck:
    ck.save(1, state, {"epoch": 0})
  step = tmp_path / "ck" / "1"
  manifest = step / provenance.MANIFEST
  assert manifest.exists()
  manifest.unlink()
  files = sorted(p for p in (step / "state").rglob("*") if p.is_file() and p.stat().st_size > 8)
  victim = max(files, key=lambda p: p.stat().st_size)
  raw = bytearray(victim.read_bytes())
  raw[-1] ^= 0xFF                                     # flipped bytes, no manifest to notice
  victim.write_bytes(bytes(raw))
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.check_step(str(step))
  assert "has no checksums.json" in str(e.value) and "accept_unverified" in str(e.value)
  assert not manifest.exists()                        # nothing recorded for it
  ck = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
  with pytest.raises(checkpoint.CheckpointError, match="has no checksums.json"):
    ck.restore_latest(jax_abstract(state))
  with pytest.raises(checkpoint.CheckpointError, match="has no checksums.json"):
    checkpoint.load_state_items(str(step), {"w": jax_abstract(state)["w"]})
  capsys.readouterr()
  checkpoint.check_step(str(step), accept_unverified=True)
  assert "accepted unverified" in capsys.readouterr().err
  assert json.loads(manifest.read_text())          # recorded from a fresh read
  checkpoint.check_step(str(step))                 # and now verified against it
  ck.close()


def jax_abstract(tree):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
