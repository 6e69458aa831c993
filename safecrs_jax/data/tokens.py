"""Tokenizer loading, chat templates, SFT masks and padding buckets.

Shape legend: N rows, B batch, T padded sequence length, P padded prompt length.

SFT rows become one token sequence each:

    chat_template(prompt, add_generation_prompt=True) + completion + <end-of-turn>
    |<------------------- prompt ------------------->| |<------- loss ------->|

`loss_mask[t] = 1` marks the tokens that are *targets* (the completion and the
end-of-turn token); the step predicts token t from tokens < t, so it weights
the next-token loss at position t-1 by `loss_mask[t]`. Sequences are padded on
the RIGHT for training (to the smallest bucket that fits the longest row of
the batch) and prompts on the LEFT for generation (`encode_prompts`).
Rows longer than `max_length` are truncated by `encode_sft(truncation=...)`:
  "right" (default, the reference: TRL keeps the start) keeps the first
      max_length tokens of prompt + completion + end-of-turn, so the end of
      the completion (and its end-of-turn) is lost; a prompt longer than
      max_length is cut too and leaves no target;
  "left_prompt" cuts the prompt from the left to make room; if the completion
      alone is too long it is cut on the right (its end-of-turn is then lost).
Both count rows whose prompt lost tokens and rows whose completion was cut.
"""
import dataclasses
import json
import os
import sys

import numpy as np
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as bpe_models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from safecrs_jax.infra import local_cache, storage

# End-of-turn markers of the chat templates we know, tried in this order.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

# The special tokens of the locally trained (demo) tokenizer.
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TokenizerError(ValueError):
  """A tokenizer directory that cannot be read (damaged file, no chat template)."""


def load_tokenizer(path):
  """Loads the HF tokenizer saved in directory `path` (no network)."""
  if not path or not storage.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  path = local_cache.local_copy(path)   # remote: HF reads local files only
  try:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad file
    raise TokenizerError(f"cannot read the tokenizer in {path}: {_damaged(path, e)}") from None
  if not getattr(tok, "chat_template", None):
    raise TokenizerError(f"tokenizer in {path!r} has no chat_template; SFT needs one")
  return tok


def _damaged(path, error):
  """The error of loading a tokenizer directory, naming the file at fault where one is."""
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    file = os.path.join(path, name)
    if os.path.isfile(file):
      try:
        with open(file, encoding="utf-8") as f:
          json.load(f)
      except (ValueError, UnicodeDecodeError) as e:
        return f"{file} is not valid JSON ({e})"
  return " ".join(f"{type(error).__name__}: {error}".split())


def end_of_turn_id(tokenizer):
  """Id of the token that closes an assistant turn (falls back to EOS)."""
  vocab = tokenizer.get_vocab()
  for token in END_OF_TURN_TOKENS:
    if token in vocab:
      return int(vocab[token])
  if tokenizer.eos_token_id is None:
    raise ValueError("tokenizer has neither a known end-of-turn token nor an EOS token")
  return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer):
  """Sorted ids that end generation: EOS (all of them) and the end-of-turn token."""
  ids = {end_of_turn_id(tokenizer)}
  eos = tokenizer.eos_token_id
  if eos is not None:
    ids.update([eos] if isinstance(eos, int) else eos)
  return tuple(sorted(int(i) for i in ids))


def pad_id(tokenizer):
  """Padding id: the tokenizer's pad token, else EOS (never attended, never a target)."""
  if tokenizer.pad_token_id is not None:
    return int(tokenizer.pad_token_id)
  return int(end_of_turn_id(tokenizer) if tokenizer.eos_token_id is None else tokenizer.eos_token_id)


def bucket_length(length, buckets):
  """Smallest bucket >= length; the largest bucket if none fits (caller truncated)."""
  buckets = sorted(int(b) for b in buckets)
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


def check_buckets(buckets, limit, name):
  if not buckets or any(int(b) <= 0 for b in buckets):
    raise ValueError(f"{name}: buckets must be positive, got {tuple(buckets)}")
  if max(buckets) < limit:
    raise ValueError(f"{name}: largest bucket {max(buckets)} < max length {limit}; "
                     f"add a bucket >= {limit}")


def prompt_ids(tokenizer, messages):
  """Token ids of the chat-templated `messages` with the generation prompt added.

  Control tokens typed inside message texts are encoded as plain text, so a
  user cannot end a turn by writing "<|im_end|>".
  """
  return list(tokenizer.apply_chat_template(
      list(messages), add_generation_prompt=True, tokenize=True, return_dict=False,
      sanitize_control_tokens=True))


def text_ids(tokenizer, text):
  """Token ids of plain `text` (no special tokens added, none parsed)."""
  return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@dataclasses.dataclass
class SFTExamples:
  """Tokenized SFT rows (ragged), ready to be collated into padded batches.

  tokens[i]: full sequence (prompt + completion + end-of-turn), int32.
  prompt_len[i]: number of leading prompt tokens (not targets).
  """
  tokens: list
  prompt_len: np.ndarray   # [N] int
  pad_id: int
  num_truncated: int = 0               # rows whose prompt lost tokens
  num_completion_truncated: int = 0    # rows whose completion was cut on the right

  def __len__(self):
    return len(self.tokens)

  @property
  def lengths(self):
    """[N] sequence lengths."""
    return np.array([len(t) for t in self.tokens], dtype=np.int64)

  def report(self):
    return {"rows": len(self), "truncated_prompts": self.num_truncated,
            "truncated_completions": self.num_completion_truncated}


TRUNCATIONS = ("right", "left_prompt")


def encode_sft(tokenizer, rows, max_length, truncation="right"):
  """Tokenizes SFT rows ({"prompt": messages, "completion": str}) into SFTExamples.

  truncation: "right" (reference) or "left_prompt" (module docstring).
  """
  if truncation not in TRUNCATIONS:
    raise ValueError(f"truncation={truncation!r}: expected one of {TRUNCATIONS}")
  eot = end_of_turn_id(tokenizer)
  tokens, plens = [], []
  n_trunc = n_ctrunc = 0
  for i, row in enumerate(rows):
    if "prompt" not in row or "completion" not in row:
      raise KeyError(f"SFT row {i} lacks 'prompt' or 'completion' (has {sorted(row)})")
    completion = row["completion"]
    if not isinstance(completion, str):
      raise TypeError(f"SFT row {i}: completion must be a string, got {type(completion).__name__}")
    p = prompt_ids(tokenizer, row["prompt"])
    c = text_ids(tokenizer, completion) + [eot]
    if truncation == "right":
      n_trunc += len(p) > max_length
      n_ctrunc += len(p) + len(c) > max_length
      p = p[:max_length]
      c = c[:max_length - len(p)]
    else:
      if len(c) >= max_length:  # keep one prompt token so the first target has context
        c = c[:max_length - 1]
        n_ctrunc += 1
      excess = len(p) + len(c) - max_length
      if excess > 0:
        p = p[excess:]
        n_trunc += 1
    tokens.append(np.asarray(p + c, dtype=np.int32))
    plens.append(len(p))
  return SFTExamples(tokens, np.asarray(plens, dtype=np.int64), pad_id(tokenizer),
                     n_trunc, n_ctrunc)


def collate_sft(examples, indices, length):
  """Right-padded batch of `examples[indices]` at sequence length `length`.

  Returns {"input_ids": [B,T] int32, "attention_mask": [B,T] int32,
           "loss_mask": [B,T] int32} (loss_mask: token t is a target). An index
  < 0 gives an empty row (all padding, no loss): fills the last eval batch.
  """
  n = len(indices)
  ids = np.full((n, length), examples.pad_id, dtype=np.int32)
  attn = np.zeros((n, length), dtype=np.int32)
  loss = np.zeros((n, length), dtype=np.int32)
  for r, i in enumerate(indices):
    if i < 0:
      continue
    seq = examples.tokens[i]
    if len(seq) > length:
      raise ValueError(f"row {i} has {len(seq)} tokens > bucket {length}")
    ids[r, :len(seq)] = seq
    attn[r, :len(seq)] = 1
    loss[r, examples.prompt_len[i]:len(seq)] = 1
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@dataclasses.dataclass
class PromptBatch:
  """Left-padded prompts for generation.

  input_ids [B,P] int32, attention_mask [B,P] int32 (1 = real token),
  lengths [B] real tokens per row, num_truncated rows cut on the left.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  lengths: np.ndarray
  num_truncated: int


def encode_prompts(tokenizer, prompts, *, max_prompt_length, buckets, length=None):
  """Chat-templated, LEFT-padded prompt batch (cut on the left beyond max_prompt_length).

  prompts: list of message lists. The padded length is the smallest bucket that
  fits the longest (truncated) prompt, or `length` when given (e.g. so that
  every process of a multi-host job agrees on one shape).
  """
  check_buckets(buckets, max_prompt_length, "encode_prompts")
  pad = pad_id(tokenizer)
  seqs, n_trunc = [], 0
  for messages in prompts:
    p = prompt_ids(tokenizer, messages)
    if len(p) > max_prompt_length:
      p = p[len(p) - max_prompt_length:]
      n_trunc += 1
    seqs.append(p)
  longest = max((len(s) for s in seqs), default=1)
  if length is None:
    length = bucket_length(longest, buckets)
  elif length < longest:
    raise ValueError(f"encode_prompts: length {length} < longest prompt {longest}")
  ids = np.full((len(seqs), length), pad, dtype=np.int32)
  mask = np.zeros((len(seqs), length), dtype=np.int32)
  for r, s in enumerate(seqs):
    if s:
      ids[r, length - len(s):] = s
      mask[r, length - len(s):] = 1
  lengths = np.array([len(s) for s in seqs], dtype=np.int32)
  return PromptBatch(ids, mask, lengths, n_trunc)


# --------------------------------------------------------------------------
# The offline demo tokenizer.

# What the demo tokenizer trains on, bounded so that a hostile row cannot stall the build:
# BPE training on one long word costs about the square of its length (a 1 MB field without
# spaces: minutes). Each field is cut to its first MAX_FIELD_CHARS characters and training
# stops after MAX_TRAIN_CHARS in all; both far above real data (SafeRec-mini's longest field
# is ~260 characters), which is used whole and unchanged.
MAX_FIELD_CHARS = 1 << 15
MAX_TRAIN_CHARS = 1 << 28
_REPORT_CHARS = 1 << 23     # a build over this many characters prints what it does


def _training_texts(texts):
  """(the non-empty texts, each cut to MAX_FIELD_CHARS, up to MAX_TRAIN_CHARS in all;
  the number of fields cut; whether the total cap was reached)."""
  out, total, cut = [], 0, 0
  for t in texts:
    if not t:
      continue
    if len(t) > MAX_FIELD_CHARS:
      t, cut = t[:MAX_FIELD_CHARS], cut + 1
    if total + len(t) > MAX_TRAIN_CHARS:
      return out, cut, True
    out.append(t)
    total += len(t)
  return out, cut, False


def build_local_tokenizer(texts, out_dir, vocab_size=2048):
  """Trains a byte-level BPE on `texts` and saves it as a HF tokenizer directory.

  ChatML chat template; special tokens <|endoftext|> (id 0, EOS and pad),
  <|im_start|> (1) and <|im_end|> (2, end of turn). Deterministic for the same
  texts (in the same order) and vocab_size. Returns out_dir.
  """
  specials = [ENDOFTEXT, IM_START, IM_END]
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(specials):
    raise ValueError(f"vocab_size {vocab_size} < {len(alphabet) + len(specials)} "
                     "(256 bytes + special tokens)")
  tok = Tokenizer(bpe_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=alphabet, show_progress=False,
                                min_frequency=2)
  train_texts, cut, full = _training_texts(texts)
  size = sum(map(len, train_texts))
  if cut or full or size > _REPORT_CHARS:
    print(f"local tokenizer: training a {vocab_size}-token BPE on {len(train_texts)} texts "
          f"({size / 1e6:.1f}M characters; {cut} fields cut to {MAX_FIELD_CHARS} characters"
          + (f", stopped at {MAX_TRAIN_CHARS} characters" if full else "") + ")",
          file=sys.stderr, flush=True)
    trainer.show_progress = sys.stderr.isatty()
  tok.train_from_iterator(train_texts, trainer=trainer)
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
      bos_token=None, unk_token=None, additional_special_tokens=[IM_START, IM_END],
      model_max_length=1 << 20, padding_side="right", clean_up_tokenization_spaces=False)
  fast.chat_template = CHATML_TEMPLATE
  storage.makedirs(out_dir)
  fast.save_pretrained(out_dir)
  return out_dir


def rows_texts(rows):
  """Every text of SFT/GDPO rows (message contents and completions), in order."""
  for row in rows:
    for m in row.get("prompt", ()):
      yield m.get("content", "")
    c = row.get("completion")
    if isinstance(c, str):
      yield c
