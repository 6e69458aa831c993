"""Rank mode: which list item each completion token belongs to (host-side numpy).

Rank-level advantages [B, I] (advantages.py, mode "rank") become per-token
advantages [B, T] through this map: each completion token gets the advantage
of the list item it belongs to; items are split at newlines (the newline token
belongs to the item before); tokens past item rec_num, non-item lines and the
final stop token get 0.

    nl = newline_token_ids(tokenizer)
    items = item_index(ids, mask, nl, stop_ids, rec_num, decode=...)   # [B, T] in [-1, I)
    adv_t = token_advantages(rank_adv, items)                           # [B, T]
"""
import numpy as np

from safecrs_jax.saferec import parsing


def newline_token_ids(tokenizer):
  """Sorted ids whose decoded text contains a newline (they end a line)."""
  ids = [i for i in range(len(tokenizer))
         if "\n" in tokenizer.decode([i], skip_special_tokens=False)]
  return np.asarray(ids, np.int32)


def _items_of_lines(texts):
  """Item number of each line text (-1: not an item): parsed `Title (Year)` lines,
  inside a `<solution>` block when the completion has one."""
  inside = "<solution>" not in "".join(texts)
  out, k = np.full(len(texts), -1), 0
  for j, text in enumerate(texts):
    if "<solution>" in text:
      inside = True
      text = text.split("<solution>", 1)[1]
    if "</solution>" in text:
      text, inside_after = text.split("</solution>", 1)[0], False
    else:
      inside_after = inside
    if inside and parsing.parse_line(text.strip()) is not None:
      out[j], k = k, k + 1
    inside = inside_after
  return out


def item_index(tokens, mask, newline_ids, stop_ids, rec_num, decode=None):
  """Host-side token -> list-item map for rank-level advantages.

  tokens / mask: [B, T] completion ids and completion mask; stop_ids: the
  sampler's stop tokens (a final stop token belongs to no item). A line ends at a
  token holding a newline (that token belongs to the line before). Without
  `decode`, line j is item j (the Rank-GRPO convention for bare lists). With
  `decode` (ids -> text), only lines that parse as one `Title (Year)` count as
  items, numbered in order; inside a `<solution>` block when the completion has
  one — so tags and reasoning lines never take an item's advantage.
  Returns [B, T] int32 item index in [0, rec_num), or -1 (no item: non-item
  lines, tokens past item rec_num, the stop token, padding).
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
  stop_ids = {int(i) for i in stop_ids}
  is_nl = np.isin(tokens, np.asarray(newline_ids)) & mask
  line = np.cumsum(is_nl, axis=1) - is_nl                     # line of each token
  out = np.full(tokens.shape, -1, np.int32)
  for r in range(tokens.shape[0]):
    n = int(mask[r].sum())
    if n == 0:
      continue
    body = n - 1 if int(tokens[r, n - 1]) in stop_ids else n  # the stop token: no item
    if body == 0:
      continue
    if decode is None:
      item_of_line = np.arange(line[r, body - 1] + 1)
    else:
      ends = np.flatnonzero(is_nl[r, :body])
      starts = np.concatenate([[0], ends + 1])
      stops = np.concatenate([ends + 1, [body]])
      item_of_line = _items_of_lines(
          [decode(tokens[r, a:b].tolist()) for a, b in zip(starts, stops)])
    idx = item_of_line[line[r, :body]]
    out[r, :body] = np.where(idx < rec_num, idx, -1)
  return out


def token_advantages(rank_adv, items):
  """[B, I] item advantages + [B, T] item index (-1 = none) -> [B, T] per-token advantages."""
  rank_adv, items = np.asarray(rank_adv, np.float32), np.asarray(items)
  picked = np.take_along_axis(rank_adv, np.clip(items, 0, rank_adv.shape[1] - 1), axis=1)
  return np.where(items >= 0, picked, 0.0).astype(np.float32)
