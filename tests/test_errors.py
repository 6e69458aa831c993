"""Every entry point, every known bad input: exit 1, one `error:` line naming the file / field /
flag, no traceback, nothing half-written (issue 27; docs/errors.md lists the messages).

Each case runs the real command in a subprocess. The inputs are refused before any heavy work
(the full-disk case trains two steps of the test-size model), so a case costs about the start
of JAX.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from safecrs_jax import saferec
from safecrs_jax.data import tokens
from safecrs_jax.saferec import mini

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOPE = "/nonexistent/safecrs_nowhere"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Small SafeRec-mini data, the same with an empty validation split, a truncated tokenizer."""
  root = tmp_path_factory.mktemp("errors")
  data = root / "mini"
  mini.generate(str(data), seed=0, sizes={("sft", "train"): 40, ("sft", "validation"): 8,
                                          ("sft", "test"): 8, ("grpo", "train"): 8},
               with_statistics=False)
  empty = root / "empty_val"
  for rel in ("downloaded_datasets/movie_trait_sensitivity.json",
              "data/phase1_mapping/title_to_imdb.pkl", "gt_catalog_complete.pkl"):
    os.makedirs(os.path.dirname(empty / rel), exist_ok=True)
    shutil.copy(data / rel, empty / rel)
  rows = saferec.load_split(str(data), "train")
  for split, rs in (("train", rows), ("validation", []), ("test", rows[:4])):
    (empty / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
  tok = root / "bad_tokenizer"
  tokens.build_local_tokenizer([m["content"] for r in rows for m in r["prompt"]], str(tok),
                               vocab_size=300)
  text = (tok / "tokenizer.json").read_text()
  (tok / "tokenizer.json").write_text(text[:len(text) // 2])
  return {"root": root, "data": str(data), "empty": str(empty), "tok": str(tok),
          "cache": str(root / "cache")}


def _config(env, stage="sft", data=None):
  return [f"--config=configs/demo.py:size=test,stage={stage},data_dir={data or env['data']}",
          f"--config.data.cache_dir={env['cache']}", "--config.log.progress=False",
          "--config.log.tensorboard=False"]


def _run(module, args):
  run_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run_env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=run_env)


def _files(path):
  return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path)
                for f in fs) if os.path.exists(path) else []


def _check(proc, expect, out=None, allowed=()):
  """exit 1, one `error:` line holding `expect`, no traceback; `out` holds no file but
  `allowed` (complete files written before the failure)."""
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert expect in lines[0], lines[0]
  if out is not None:
    assert [f for f in _files(out) if f not in allowed] == []
  return lines[0]


# (name, module, args(env, out), expected text in the error line)
CASES = [
    ("sft misspelled config field", "launch.train_sft",
     lambda e, o: _config(e) + ["--config.sft.num_step=3", f"--workdir={o}"],
     "unknown config field sft.num_step; did you mean sft.num_steps?"),
    ("sft unknown flag", "launch.train_sft", lambda e, o: _config(e) + [f"--workdirr={o}"],
     "Unknown command line flag 'workdirr'"),
    ("sft missing config file", "launch.train_sft",
     lambda e, o: ["--config=configs/nope.py", f"--workdir={o}"],
     "config file configs/nope.py not found"),
    ("sft bad config arg", "launch.train_sft",
     lambda e, o: ["--config=configs/demo.py:size=huge", f"--workdir={o}"], "size='huge'"),
    ("sft missing data dir", "launch.train_sft",
     lambda e, o: _config(e, data=NOPE) + [f"--workdir={o}"], NOPE),
    ("sft empty validation split", "launch.train_sft",
     lambda e, o: _config(e, data=e["empty"]) + [f"--workdir={o}"],
     "split 'validation'"),
    ("sft truncated tokenizer.json", "launch.train_sft",
     lambda e, o: _config(e) + [f"--config.tokenizer.path={e['tok']}", f"--workdir={o}"],
     "bad_tokenizer/tokenizer.json is not valid JSON"),
    ("gdpo missing init checkpoint", "launch.train_gdpo",
     lambda e, o: _config(e, "gdpo") + [f"--config.gdpo.init_checkpoint={NOPE}",
                                        f"--workdir={o}"], NOPE),
    ("evaluate missing checkpoint", "launch.evaluate",
     lambda e, o: _config(e) + [f"--checkpoint={NOPE}", f"--workdir={o}"], NOPE),
    ("evaluate empty --checkpoint=", "launch.evaluate",
     lambda e, o: _config(e) + ["--checkpoint=", f"--workdir={o}"],
     "give exactly one of --checkpoint and --runs"),
    ("evaluate --steps=abc", "launch.evaluate",
     lambda e, o: _config(e) + [f"--checkpoint={NOPE}", "--steps=abc", f"--workdir={o}"],
     "--steps"),
    ("evaluate misspelled --split", "launch.evaluate",
     lambda e, o: _config(e) + [f"--checkpoint={e['data']}", "--split=tset", f"--workdir={o}"],
     "no sft split 'tset'"),
    ("evaluate --runs escaping name", "launch.evaluate",
     lambda e, o: _config(e) + [f"--runs=../../escaped={NOPE}", f"--workdir={o}"],
     "--runs name '../../escaped' cannot be a folder name"),
    ("evaluate --runs absolute name", "launch.evaluate",
     lambda e, o: _config(e) + [f"--runs=/tmp/x={NOPE}", f"--workdir={o}"],
     "--runs name '/tmp/x'"),
    ("export missing checkpoint", "launch.export_hf",
     lambda e, o: [f"--checkpoint={NOPE}", f"--out={o}"], NOPE),
    ("plan unknown topology", "launch.plan",
     lambda e, o: ["--config=configs/demo.py", "--topology=v99-8"], "--topology=v99-8"),
    ("plan cpu:abc", "launch.plan",
     lambda e, o: ["--config=configs/demo.py", "--topology=cpu:abc"], "--topology=cpu:abc"),
    ("plan cpu:0", "launch.plan",
     lambda e, o: ["--config=configs/demo.py", "--topology=cpu:0"], "--topology=cpu:0"),
    ("demo unknown --set field", "launch.demo",
     lambda e, o: [f"--workdir={o}", "--size=test", "--set=sft.num_step=3"],
     "unknown config field sft.num_step"),
    ("demo --set without =", "launch.demo",
     lambda e, o: [f"--workdir={o}", "--size=test", "--set=nonsense"], "--set"),
    ("relational bad --parts", "safecrs_jax.saferec.relational",
     lambda e, o: [f"--data_dir={e['data']}", f"--out={o}", "--parts=disclosur"],
     "--parts=disclosur"),
    ("relational bad --turn_distances", "safecrs_jax.saferec.relational",
     lambda e, o: [f"--data_dir={e['data']}", f"--out={o}", "--turn_distances=1,x"],
     "--turn_distances=1,x"),
    ("relational missing --data_dir", "safecrs_jax.saferec.relational",
     lambda e, o: [f"--data_dir={NOPE}", f"--out={o}"], f"--data_dir={NOPE}"),
    ("relational misspelled --split", "safecrs_jax.saferec.relational",
     lambda e, o: [f"--data_dir={e['data']}", f"--out={o}", "--split=tset"], "--split=tset"),
    ("relational --max_rows=-5", "safecrs_jax.saferec.relational",
     lambda e, o: [f"--data_dir={e['data']}", f"--out={o}", "--max_rows=-5"],
     "--max_rows=-5"),
]


@pytest.mark.parametrize("name,module,args,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(env, tmp_path, name, module, args, expect):
  out = str(tmp_path / "out")
  _check(_run(module, args(env, out)), expect, out)


def _mount(args, where):
  os.makedirs(where, exist_ok=True)
  proc = subprocess.run(["mount", *args, where], capture_output=True, text=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount here ({proc.stderr.strip() or 'mount failed'}); needs root")
  return where


def _umount(where):
  subprocess.run(["umount", where], capture_output=True)


def _train_args(env, workdir):
  return _config(env) + ["--config.sft.num_steps=2", "--config.sft.batch_size=2",
                         "--config.sft.eval_every=0", "--config.checkpoint.save_every=2",
                         f"--workdir={workdir}"]


def test_full_disk_is_one_line(env, tmp_path):
  """A 2 MB tmpfs: the checkpoint does not fit. One line, no half-written step."""
  disk = _mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs"], str(tmp_path / "disk"))
  try:
    run = os.path.join(disk, "run")
    proc = _run("launch.train_sft", _train_args(env, run))
    line = _check(proc, "no space left on device writing ")
    assert run in line
    leftovers = [f for f in _files(run) if f.startswith("checkpoints/")]
    assert leftovers == []                       # no partial (or temporary) step
    # A disk already full: the first write fails, and no empty lock is left behind.
    shutil.rmtree(run)
    with open(os.path.join(disk, "fill"), "wb") as f:
      try:
        while True:
          f.write(b"\0" * (1 << 16))
      except OSError:
        pass
    _check(_run("launch.train_sft", _train_args(env, run)), "no space left on device writing ",
           run)
  finally:
    _umount(disk)


def test_read_only_workdir_is_one_line(env, tmp_path):
  ro = str(tmp_path / "ro")
  os.makedirs(ro)
  _mount(["--bind", "-o", "ro", ro], ro)
  try:
    if os.access(ro, os.W_OK) and _writable(ro):
      pytest.skip("the read-only bind mount is writable here")
    run = os.path.join(ro, "run")
    _check(_run("launch.train_sft", _train_args(env, run)), "read-only file system")
    assert not os.path.exists(run)
  finally:
    _umount(ro)


def _writable(path):
  try:
    with open(os.path.join(path, ".probe"), "w"):
      pass
  except OSError:
    return False
  os.remove(os.path.join(path, ".probe"))
  return True
