"""Export for serving: launch.export_hf writes the dtype the run trained in, the stop tokens
in generation_config.json, and transformers greedy-decodes the export as our rollout does."""
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import demo
from safecrs_jax import models
from safecrs_jax.data import tokens
from safecrs_jax.rl import rollout
from safecrs_jax.train import policy, sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 24
CHATS = [
    [{"role": "user", "content": "I loved Alien (1979) and Heat (1995). What should I watch?"}],
    [{"role": "user", "content": "Spiders terrify me. Any calm films from the nineties?"}],
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """Two Safe-SFT steps of the 2-layer test model, trained in bfloat16 (as the paper configs)."""
  tmp = tmp_path_factory.mktemp("export")
  c = demo.get_config("size=test,relational=off")
  c.data.cache_dir = str(tmp / "cache")
  c.model.dtype = "bfloat16"
  c.tokenizer.max_length, c.tokenizer.buckets = 384, (384,)
  c.sft.num_steps, c.sft.batch_size, c.sft.grad_accum, c.sft.eval_every = 2, 2, 1, 0
  c.log.progress, c.log.tensorboard = False, False
  sft.train(c, str(tmp / "run"))
  return tmp / "run"


def _export(run_dir, out, *flags):
  proc = subprocess.run([sys.executable, "-m", "launch.export_hf", f"--checkpoint={run_dir}",
                         f"--out={out}", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def _safetensors_dtypes(path):
  with open(path, "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
  return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _prompts(tok):
  rows = [tokens.prompt_ids(tok, chat) for chat in CHATS]
  width = max(map(len, rows))
  ids = np.full((len(rows), width), tokens.pad_id(tok), np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):                       # left padding, as our rollouts take it
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  return ids, mask


def _ours(out, ids, mask, tok):
  cfg, params = models.load_hf(out, dtype="float32")
  sampling = rollout.SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True,
                                    stop_ids=tokens.stop_token_ids(tok), pad_id=tokens.pad_id(tok))
  r = rollout.generate(cfg, params, ids, mask, jax.random.key(0), sampling)
  toks, lengths = np.asarray(r.tokens), np.asarray(r.lengths)
  return [list(toks[i, :lengths[i]]) for i in range(len(ids))]


def _theirs(out, ids, mask, stops):
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():   # generation_config.json supplies eos / pad: greedy, as ours
    gen = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW_TOKENS).numpy()[:, ids.shape[1]:]
  rows = []
  for row in gen:
    ends = [j for j, t in enumerate(row) if t in stops]
    rows.append([int(t) for t in row[:ends[0] + 1 if ends else len(row)]])
  return rows


def test_export_writes_the_trained_dtype_and_stop_tokens(run_dir, tmp_path):
  out = _export(run_dir, str(tmp_path / "hf"))
  assert _safetensors_dtypes(os.path.join(out, "model.safetensors")) == {"BF16"}
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  tok = tokens.load_tokenizer(out)
  with open(os.path.join(out, policy.GENERATION_CONFIG)) as f:
    gen = json.load(f)
  stops = tokens.stop_token_ids(tok)
  assert gen["eos_token_id"] == (stops[0] if len(stops) == 1 else list(stops))
  assert tokens.end_of_turn_id(tok) in stops and gen["pad_token_id"] == tokens.pad_id(tok)
  # transformers reads it in the stored dtype, and takes the stop tokens from it
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
  assert model.dtype == torch.bfloat16
  hf_eos = model.generation_config.eos_token_id
  assert set([hf_eos] if isinstance(hf_eos, int) else hf_eos) == set(stops)
  # --dtype chooses
  f32 = _export(run_dir, str(tmp_path / "hf32"), "--dtype=float32")
  assert _safetensors_dtypes(os.path.join(f32, "model.safetensors")) == {"F32"}


def test_transformers_greedy_tokens_equal_ours(run_dir, tmp_path):
  """The bfloat16 export, computed in float32 by both: the same greedy continuations."""
  out = _export(run_dir, str(tmp_path / "hf"))
  tok = tokens.load_tokenizer(out)
  ids, mask = _prompts(tok)
  ours = _ours(out, ids, mask, tok)
  theirs = _theirs(out, ids, mask, set(tokens.stop_token_ids(tok)))
  assert all(len(r) > 0 for r in ours)
  assert theirs == ours
