"""launch.check: a data and a weights directory validated before a run (exit 0, or 1 with
one `error:` line naming what is wrong)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from configs import demo
from safecrs_jax import config as config_lib
from safecrs_jax import models
from safecrs_jax.data import assets, check, tokens
from safecrs_jax.train import policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """SafeRec-mini and a tiny HF model dir (the 2-layer test model + the demo tokenizer)."""
  tmp = tmp_path_factory.mktemp("check")
  config = config_lib.resolve(demo.get_config("size=test,relational=off"))
  config = config_lib.override(config, "data.cache_dir", str(tmp / "cache"))
  data_dir = assets.resolve_data_dir(config)
  tok_dir = assets.resolve_tokenizer_path(config, data_dir)
  tok = tokens.load_tokenizer(tok_dir)
  cfg = policy.model_config(config, tok)
  model_dir = str(tmp / "model")
  models.save_hf(cfg, models.init_params(cfg, jax.random.key(0)), model_dir)
  tok.save_pretrained(model_dir)
  return data_dir, model_dir


def _launch(*args):
  return subprocess.run([sys.executable, "-m", "launch.check", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_good_directories_pass(dirs):
  data_dir, model_dir = dirs
  lines = check.check_data(data_dir)
  assert [line.split(":")[1].strip() for line in lines[:4]] == [
      "sft train", "sft validation", "sft test", "grpo train"]
  assert "oracle" in lines[4] and "catalog" in lines[5]
  lines = check.check_weights(model_dir)
  assert lines[0].startswith("weights: llama, 2 layers, hidden 64") and "1 file(s)" in lines[0]
  proc = _launch(f"--data_dir={data_dir}", f"--model_dir={model_dir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().endswith("ok") and "sft train" in proc.stdout


def _one_error_line(proc):
  assert proc.returncode == 1, proc.stdout[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  return lines[0]


def test_broken_data_is_one_error_line(dirs, tmp_path):
  data_dir, _ = dirs
  broken = str(tmp_path / "data")
  shutil.copytree(data_dir, broken)
  os.remove(os.path.join(broken, "downloaded_datasets", "movie_trait_sensitivity.json"))
  line = _one_error_line(_launch(f"--data_dir={broken}"))
  assert "movie_trait_sensitivity.json" in line and line.startswith("error: data:")
  # a row without its prompt, in a JSON-lines split: the file, row and field are named
  jsonl = tmp_path / "jsonl"
  jsonl.mkdir()
  row = {"prompt": [{"role": "user", "content": "hi"}], "completion": "x",
         "groundtruth_with_release_year": [["Heat", 1995]], "seen_titles": [],
         "constraints": {}}
  bad = dict(row)
  del bad["prompt"]
  (jsonl / "train.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(bad) + "\n")
  with pytest.raises(check.InputError, match=r"train.jsonl row 1 \(line 2\).*'prompt'"):
    check.check_data(str(jsonl), splits=[("sft", "train")])
  with pytest.raises(check.InputError, match="no sft split 'validation'"):
    check.check_data(str(jsonl), splits=[("sft", "validation")])


def test_broken_weights_are_one_error_line(dirs, tmp_path):
  _, model_dir = dirs
  truncated = str(tmp_path / "truncated")
  shutil.copytree(model_dir, truncated)
  weights = os.path.join(truncated, "model.safetensors")
  with open(weights, "r+b") as f:          # a download cut short
    f.truncate(os.path.getsize(weights) - 1024)
  line = _one_error_line(_launch(f"--model_dir={truncated}"))
  assert line.startswith("error: weights:") and "truncated" in line
  assert "model.safetensors" in line
  # a config.json of another architecture: the field is named
  other = str(tmp_path / "other")
  shutil.copytree(model_dir, other)
  with open(os.path.join(other, "config.json")) as f:
    hf = json.load(f)
  with open(os.path.join(other, "config.json"), "w") as f:
    json.dump(dict(hf, num_hidden_layers=3), f)
  with pytest.raises(check.InputError, match="model.layers.2.* is missing"):
    check.check_weights(other)
  # no weights at all
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(model_dir, "config.json"), empty)
  with pytest.raises(check.InputError, match="no \\*.safetensors"):
    check.check_weights(str(empty))
