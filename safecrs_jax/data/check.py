"""Check a run's inputs before the run: a SafeRec data directory and a model weights directory.

    lines = check.check_data("/data/SafeCRS")                 # what was found, one line each
    lines = check.check_weights("/models/Llama-3.1-8B-Instruct")
    python -m launch.check --data_dir=/data/SafeCRS --model_dir=/models/Llama-3.1-8B-Instruct

The same checks the loaders make when a stage starts (saferec.load_split on
every row, the oracle and the catalog; the model's config.json, every tensor's
name, shape and bytes; the tokenizer and its chat template), made at once and
without reading any weight, so a bad download is found before chips are
reserved. A failure is an InputError with one line naming the file, row,
field or tensor.
"""
from __future__ import annotations

from safecrs_jax import models, saferec
from safecrs_jax.data import tokens
from safecrs_jax.infra import storage
from safecrs_jax.models import safetensors_io

# (stage, split) the stages read: Safe-SFT train / validation, evaluation test, Safe-GDPO train.
SPLITS = (("sft", "train"), ("sft", "validation"), ("sft", "test"), ("grpo", "train"))


class InputError(ValueError):
  """A data or weights directory that a run could not use (one line)."""


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split()) or type(e).__name__


_LOADER_ERRORS = (FileNotFoundError, saferec.SafeRecDataError, models.CheckpointError,
                  models.ConfigError, safetensors_io.SafetensorsError, ValueError, OSError)


def check_data(data_dir: str, splits=SPLITS, risk_threshold: float = 0.66) -> list[str]:
  """Loads every split in `splits`, the safety oracle and the catalog of `data_dir` (the
  released layout or any form load_split takes); lines saying what was found."""
  if not storage.isdir(data_dir):
    raise InputError(f"data: {data_dir} is not a directory")
  lines = []
  try:
    for stage, split in splits:
      rows = saferec.load_split(data_dir, split, stage=stage)
      if not rows:
        raise InputError(f"data: {stage} split {split!r} in {data_dir} has no rows")
      lines.append(f"data: {stage} {split}: {len(rows)} rows "
                   f"({saferec.find_split(data_dir, split, stage)})")
    oracle = saferec.load_oracle(data_dir, risk_threshold)
    lines.append(f"data: oracle: {oracle.num_movies} movies x {len(oracle.traits)} traits")
    catalog = saferec.load_catalog(data_dir)
    lines.append(f"data: catalog: {len(catalog)} titles")
  except InputError:
    raise
  except _LOADER_ERRORS as e:
    raise InputError(f"data: {_one_line(e)}") from None
  return lines


def check_weights(model_dir: str, tokenizer_dir: str | None = None) -> list[str]:
  """models.check_hf on `model_dir` and its tokenizer (`tokenizer_dir`, default the model's
  own): loads with a chat template, fits the vocabulary; lines saying what was found."""
  if not storage.isdir(model_dir):
    raise InputError(f"weights: {model_dir} is not a directory")
  try:
    cfg, info = models.check_hf(model_dir)
    tok = tokens.load_tokenizer(tokenizer_dir or model_dir)
    if len(tok) > cfg.vocab_size:
      raise InputError(f"weights: tokenizer has {len(tok)} tokens > the model's vocab_size "
                       f"{cfg.vocab_size}")
    stops = tokens.stop_token_ids(tok)
  except InputError:
    raise
  except _LOADER_ERRORS as e:
    raise InputError(f"weights: {_one_line(e)}") from None
  return [f"weights: {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}, {models.count_params(cfg) / 1e9:.3g}B parameters in "
          f"{info['tensors']} tensors, {info['files']} file(s)",
          f"weights: tokenizer {len(tok)} tokens, chat template, stop ids {list(stops)}"]
