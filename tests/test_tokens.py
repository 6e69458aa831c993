"""tokens.py + assets.py: chat template, loss mask, truncation, buckets, local tokenizer."""
import os

import numpy as np
import pytest

from safecrs_jax.data import assets, tokens

TEXTS = [
    "I am terrified of spiders, please keep that in mind.",
    "Can you recommend a movie like Alien (1979) or The Thing (1982)?",
    "<solution>\nArrival (2016)\nMoon (2009)\n</solution>",
    "We watch with the kids on Friday nights, nothing too violent.",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  tokens.build_local_tokenizer(TEXTS, str(d), vocab_size=320)
  return tokens.load_tokenizer(str(d))


def _row(user="Something like Alien (1979) please, no spiders.",
         completion="<solution>\nArrival (2016)\nMoon (2009)\n</solution>"):
  return {"prompt": [{"role": "system", "content": "You recommend movies."},
                     {"role": "user", "content": user}],
          "completion": completion}


def test_special_tokens_and_stop_ids(tok):
  vocab = tok.get_vocab()
  assert tokens.end_of_turn_id(tok) == vocab["<|im_end|>"]
  assert tokens.stop_token_ids(tok) == tuple(sorted({vocab["<|im_end|>"], vocab["<|endoftext|>"]}))
  assert tokens.pad_id(tok) == vocab["<|endoftext|>"]
  assert len(tok) <= 320


def test_loss_mask_covers_completion_and_end_of_turn_only(tok):
  row = _row()
  ex = tokens.encode_sft(tok, [row], max_length=512)
  p_ids = tokens.prompt_ids(tok, row["prompt"])
  c_ids = tokens.text_ids(tok, row["completion"])
  eot = tokens.end_of_turn_id(tok)
  seq = ex.tokens[0]
  np.testing.assert_array_equal(seq, p_ids + c_ids + [eot])
  assert ex.prompt_len[0] == len(p_ids)
  b = tokens.collate_sft(ex, [0], 256)
  n = len(seq)
  np.testing.assert_array_equal(b["input_ids"][0, :n], seq)
  assert (b["input_ids"][0, n:] == tokens.pad_id(tok)).all()          # right padding
  np.testing.assert_array_equal(b["attention_mask"][0], np.arange(256) < n)
  mask = b["loss_mask"][0]
  assert mask[:len(p_ids)].sum() == 0 and mask[n:].sum() == 0
  assert mask[len(p_ids):n].all()
  # the targets decode to exactly the completion followed by <|im_end|>
  target_text = tok.decode(b["input_ids"][0][mask.astype(bool)])
  assert target_text == row["completion"] + "<|im_end|>"
  # the prompt is the ChatML rendering ending in the generation prompt
  assert tok.decode(p_ids).endswith("<|im_start|>assistant\n")


def test_control_tokens_in_text_are_plain_text(tok):
  row = _row(user="no spiders <|im_end|> please")
  ids = tokens.prompt_ids(tok, row["prompt"])
  eot = tokens.end_of_turn_id(tok)
  assert ids.count(eot) == 2          # system + user turns only, not the typed one


def test_left_prompt_truncation_is_counted(tok):
  """truncation="left_prompt" (this project's earlier default): the prompt loses its left."""
  row = _row(user="spiders " * 60)
  full = tokens.encode_sft(tok, [row], max_length=4096).tokens[0]
  limit = len(tokens.encode_sft(tok, [_row()], max_length=4096).tokens[0]) + 2
  assert len(full) > limit
  ex = tokens.encode_sft(tok, [row, _row()], max_length=limit, truncation="left_prompt")
  assert ex.num_truncated == 1 and ex.num_completion_truncated == 0
  assert len(ex.tokens[0]) == limit
  np.testing.assert_array_equal(ex.tokens[0], full[-limit:])          # prompt cut on the left
  assert ex.report() == {"rows": 2, "truncated_prompts": 1, "truncated_completions": 0}
  long = tokens.encode_sft(tok, [_row(completion="Moon (2009)\n" * 50)], max_length=16,
                           truncation="left_prompt")
  assert long.num_completion_truncated == 1 and len(long.tokens[0]) == 16
  assert long.prompt_len[0] == 1


def test_right_truncation_keeps_the_start_and_is_counted(tok):
  """Default (TRL): the first max_length tokens of prompt + completion survive."""
  row = _row(completion="Moon (2009)\n" * 50)
  full = tokens.encode_sft(tok, [row], max_length=4096)
  plen = int(full.prompt_len[0])
  fits = _row(user="hi", completion="Moon (2009)")
  ex = tokens.encode_sft(tok, [row, fits], max_length=plen + 5)
  np.testing.assert_array_equal(ex.tokens[0], full.tokens[0][:plen + 5])
  assert len(ex.tokens[1]) < plen + 5
  assert ex.prompt_len[0] == plen and ex.report() == {
      "rows": 2, "truncated_prompts": 0, "truncated_completions": 1}
  short = tokens.encode_sft(tok, [row], max_length=plen - 3)          # the prompt alone is too long
  np.testing.assert_array_equal(short.tokens[0], full.tokens[0][:plen - 3])
  assert short.prompt_len[0] == plen - 3                               # no target left
  assert (short.num_truncated, short.num_completion_truncated) == (1, 1)
  with pytest.raises(ValueError, match="truncation"):
    tokens.encode_sft(tok, [row], max_length=16, truncation="left")


def test_buckets_and_empty_rows(tok):
  assert tokens.bucket_length(3, (8, 4, 16)) == 4
  assert tokens.bucket_length(9, (4, 8, 16)) == 16
  ex = tokens.encode_sft(tok, [_row()], max_length=512)
  b = tokens.collate_sft(ex, [0, -1], 128)
  assert b["input_ids"].shape == (2, 128)
  assert b["attention_mask"][1].sum() == 0 and b["loss_mask"][1].sum() == 0
  with pytest.raises(ValueError, match="bucket"):
    tokens.collate_sft(ex, [0], 8)


def test_encode_prompts_left_padded(tok):
  prompts = [[{"role": "user", "content": "Alien (1979)?"}],
             [{"role": "user", "content": "hi"}],
             [{"role": "user", "content": "spiders " * 80}]]
  pb = tokens.encode_prompts(tok, prompts, max_prompt_length=64, buckets=(32, 64))
  assert pb.input_ids.shape == (3, 64) and pb.num_truncated == 1
  short = tokens.prompt_ids(tok, prompts[1])
  assert len(short) < 32
  np.testing.assert_array_equal(pb.input_ids[1, -len(short):], short)
  assert pb.attention_mask[1, :64 - len(short)].sum() == 0             # left padding
  assert (pb.input_ids[1, :64 - len(short)] == tokens.pad_id(tok)).all()
  assert pb.attention_mask[2].all() and pb.lengths[2] == 64
  full = tokens.prompt_ids(tok, prompts[2])
  np.testing.assert_array_equal(pb.input_ids[2], full[-64:])            # cut on the left
  one = tokens.encode_prompts(tok, prompts[1:2], max_prompt_length=64, buckets=(32, 64))
  assert one.input_ids.shape == (1, 32) and one.num_truncated == 0
  fixed = tokens.encode_prompts(tok, prompts[1:2], max_prompt_length=64, buckets=(32, 64),
                                length=64)
  assert fixed.input_ids.shape == (1, 64)
  with pytest.raises(ValueError, match="largest bucket"):
    tokens.encode_prompts(tok, prompts[1:2], max_prompt_length=128, buckets=(32, 64))


def test_local_tokenizer_is_deterministic(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  tokens.build_local_tokenizer(TEXTS, str(a), vocab_size=300)
  tokens.build_local_tokenizer(TEXTS, str(b), vocab_size=300)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (a / name).read_bytes() == (b / name).read_bytes()


def test_build_once_is_atomic(tmp_path):
  final = tmp_path / "asset"

  def failing(tmp):
    open(os.path.join(tmp, "half"), "w").close()
    raise RuntimeError("crash mid-build")
  with pytest.raises(RuntimeError):
    assets.build_once(str(final), failing)
  assert not final.exists() and os.listdir(tmp_path) == []            # nothing half-built

  calls = []

  def good(tmp):
    calls.append(tmp)
    open(os.path.join(tmp, "done"), "w").close()
  assert assets.build_once(str(final), good) == str(final)
  assert assets.build_once(str(final), good) == str(final)             # cached: built once
  assert len(calls) == 1 and (final / "done").exists()

  # a builder that loses the race to another process keeps the winner's result
  final2 = tmp_path / "asset2"

  def racer(tmp):
    os.makedirs(final2)
    open(os.path.join(final2, "winner"), "w").close()
    open(os.path.join(tmp, "loser"), "w").close()
  assert assets.build_once(str(final2), racer) == str(final2)
  assert os.listdir(final2) == ["winner"]
  assert sorted(os.listdir(tmp_path)) == ["asset", "asset2"]
