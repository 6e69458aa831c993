"""Safe-SFT's data: rows loaded and curated, tokenized, ordered and collated into batches.

    rows, report = load_sft_rows(config, data_dir, "train", oracle)   # curated rows
    examples = encode_rows(config, tokenizer, rows)                   # data.tokens.SFTExamples
    batcher = Batcher(examples, accum=A, micro=B, seed=..., buckets=..., sharding=...)
    batch, real_tokens = batcher.batch(step)                          # TokenBatch [A, B, T]
    for batch in eval_batches(val_examples, micro=B, ...): ...        # TokenBatch [B, T]

Batches come from a permutation seeded by (seed, epoch), so a restarted run
sees the same batches. Shape letters (package legend): A micro-batches per
optimizer step, B rows per micro-batch (global), T padded length.
"""
import re

import numpy as np

from safecrs_jax import saferec
from safecrs_jax.data import tokens
from safecrs_jax.infra import sharding as shd
from safecrs_jax.rl import steps
from safecrs_jax.train import loop

_REASONING = re.compile(r"<reasoning>.*?</reasoning>\s*", re.DOTALL)


def prepare_rows(rows, config, oracle=None, *, curate=None):
  """The Safe-SFT curation hook on loaded rows.

  sft.curate: the teacher's list minus every item the oracle marks unsafe for
  the row's constraints (saferec.curate_sft_rows; rows left with no safe
  ground truth are dropped), with the <reasoning> block when sft.reasoning;
  sft.backfill fills the lists back to the teacher's length (off: reference).
  Without curation (targets already curated), sft.reasoning=False strips any
  <reasoning> block. Returns (rows, report); report["dropped"] lists the dropped
  rows (index in the split, the user's request, its constraints). curate=None
  reads sft.curate.
  """
  reasoning = bool(config.sft.reasoning)
  if config.sft.curate if curate is None else curate:
    if oracle is None:
      raise ValueError("sft.curate needs the safety oracle")
    loaded = rows
    rows, report = saferec.curate_sft_rows(rows, oracle, reasoning=reasoning,
                                           backfill=bool(config.sft.backfill))
    report = dict(report, dropped=[_dropped_row(i, loaded[i])
                                   for i in report.pop("dropped_indices")])
    return rows, report
  if not reasoning:
    rows = [dict(r, completion=_REASONING.sub("", r["completion"])) for r in rows]
  return rows, {"rows_in": len(rows), "rows_out": len(rows)}


def _dropped_row(index, row):
  text = row["prompt"][-1]["content"] if row.get("prompt") else ""
  return {"index": int(index), "request": text[-160:],
          "constraints": sorted(k for k, v in (row.get("constraints") or {}).items() if v)}


def curation_lines(report, split, limit=5):
  """Console lines: how many rows curation dropped from `split`, and the first few."""
  dropped = report.get("dropped", [])
  lines = [f"sft curation: {split}: {report.get('rows_in')} rows -> {report.get('rows_out')} "
           f"({len(dropped)} dropped: no safe ground truth left)"]
  lines += [f"  dropped row {d['index']} ({', '.join(d['constraints']) or 'no constraint'}): "
            f"...{d['request'][-70:]!r}" for d in dropped[:limit]]
  return lines


def load_sft_rows(config, data_dir, split, oracle=None):
  """Loaded and curated rows of `split`: (rows, curation report)."""
  rows = saferec.load_split(data_dir, split, stage="sft",
                            strict=config.data.strict)
  if config.sft.curate and oracle is None:
    oracle = saferec.load_oracle(data_dir, risk_threshold=config.data.risk_threshold)
  rows, report = prepare_rows(rows, config, oracle)
  if not rows:
    raise saferec.SafeRecDataError(
        f"no SFT rows left in {data_dir} split {split!r}: {report['rows_in']} rows read, "
        f"{report['rows_dropped_no_safe_gt']} without a safe ground-truth item, "
        f"{report['rows_empty_target']} with an empty target")
  return rows, report


def encode_rows(config, tokenizer, rows):
  return tokens.encode_sft(tokenizer, rows, int(config.tokenizer.max_length),
                           truncation=str(config.tokenizer.truncation))


def load_sft_examples(config, tokenizer, data_dir, split, oracle=None):
  """Loaded, curated and tokenized rows of `split`: (SFTExamples, curation report)."""
  rows, report = load_sft_rows(config, data_dir, split, oracle)
  return encode_rows(config, tokenizer, rows), report


def _collate(examples, indices, length, sharding, global_shape, axis):
  """TokenBatch of global arrays; this process collates only the rows it holds."""
  lo, hi = shd.local_rows(sharding, global_shape, axis)
  local = indices[:, lo:hi] if axis == 1 else indices[lo:hi]
  if axis == 1:
    parts = [tokens.collate_sft(examples, row, length) for row in local]
    arrays = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
  else:
    arrays = tokens.collate_sft(examples, list(local), length)
  return steps.TokenBatch(**{k: shd.to_global(v, sharding, global_shape)
                             for k, v in arrays.items()})


class Batcher:
  """Global TokenBatches [A, B, T] for step s: epoch s // steps_per_epoch, drop-last.

  Every process knows every row's length (so all agree on the bucket T) and
  collates only the rows its devices hold. `mix` (a relational_training.Mix
  whose rows are `examples`): its order per epoch instead of the permutation,
  with a suite unit never split across micro-batches.
  """

  def __init__(self, examples, *, accum, micro, seed, buckets, sharding, mix=None):
    self.examples, self.accum, self.micro = examples, int(accum), int(micro)
    self.seed, self.buckets, self.sharding = int(seed), tuple(buckets), sharding
    self.mix = mix
    self.global_batch = self.accum * self.micro
    self.steps_per_epoch = (mix.length if mix else len(examples)) // self.global_batch
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(examples)} training rows < one global batch of "
                       f"{self.global_batch} (grad_accum {accum} x micro {micro}); "
                       "lower sft.batch_size or sft.grad_accum")
    self._lengths = examples.lengths
    self._perm_cache = {}

  def position(self, step):
    """(epoch, index within the epoch) of global step `step`."""
    return divmod(int(step), self.steps_per_epoch)

  def indices(self, step):
    """[A, B] row indices of step `step`."""
    epoch, index = self.position(step)
    if epoch not in self._perm_cache:
      self._perm_cache = {epoch: (
          self.mix.order(self.seed, epoch, self.micro) if self.mix else
          loop.epoch_permutation(self.seed, epoch, len(self.examples)))}
    perm = self._perm_cache[epoch]
    rows = perm[index * self.global_batch:(index + 1) * self.global_batch]
    return rows.reshape(self.accum, self.micro)

  def batch(self, step):
    """(TokenBatch of global arrays [A,B,T], real tokens in the global batch)."""
    idx = self.indices(step)
    length = tokens.bucket_length(int(self._lengths[idx].max()), self.buckets)
    shape = (self.accum, self.micro, length)
    return (_collate(self.examples, idx, length, self.sharding, shape, 1),
            int(self._lengths[idx].sum()))


def eval_batches(examples, *, micro, buckets, sharding, max_batches=-1):
  """Validation TokenBatches [B,T] in order; the last one padded with empty rows."""
  n = len(examples)
  count = -(-n // micro)
  if max_batches is not None and max_batches >= 0:
    count = min(count, max_batches)
  for b in range(count):
    idx = list(range(b * micro, min((b + 1) * micro, n)))
    length = tokens.bucket_length(int(examples.lengths[idx].max()), buckets)
    full = np.asarray(idx + [-1] * (micro - len(idx)))
    yield _collate(examples, full, length, sharding, (micro, length), 0)
