"""Resumable generation: each distinct prompt's completion, appended batch by batch.

    done = generate_texts(model_cfg, params, tokenizer, prompts, sampling=..., raw_path=...)

`raw_generations.jsonl` starts with a header line {"header": {...}} — the
checkpoint's identity, the dataset fingerprint, the tokenizer and every
generation setting (runner.generation_header) — then holds one line per
distinct prompt (prompt_id, text, num_tokens, stopped, prompt_truncated),
appended after every batch; an interrupted evaluation resumes from it and
finished batches are never generated again. A file whose header differs from
the current one (another model, other settings, other rows) is derived data
from other inputs: it is discarded, with one line saying why, and generated
anew. Batches have a fixed composition (prompts sorted by token
length, then cut in chunks of batch_size), so a resumed run reproduces the
uninterrupted one exactly.
"""
import json
import os

import jax
import numpy as np

from safecrs_jax.data import tokens
from safecrs_jax.infra import metrics_log, provenance, storage
from safecrs_jax.rl import rollout


def _prompt_key(prompt):
  return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def unique_prompts(rows):
  """(prompts, row_to_prompt): distinct prompt message lists and, per row, its index."""
  index, prompts, row_to_prompt = {}, [], []
  for row in rows:
    key = _prompt_key(row["prompt"])
    if key not in index:
      index[key] = len(prompts)
      prompts.append(row["prompt"])
    row_to_prompt.append(index[key])
  return prompts, row_to_prompt


def _read_raw(path):
  """(header, finished generations {prompt_id: record}); a torn last line (crash) is ignored."""
  header, done = None, {}
  if not storage.exists(path):
    return header, done
  with storage.open(path, encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f):
      try:
        rec = json.loads(line)
      except ValueError:
        break  # the line being written when the process died
      if n == 0 and "header" in rec:
        header = rec["header"]
        continue
      done[int(rec["prompt_id"])] = rec
  return header, done


def _check_header(path, header, recorded, done):
  """The reusable generations: `done` when the file's header matches, else {} (file reset)."""
  if header is None:
    return done
  if storage.exists(path) and (recorded is None or provenance.first_difference(
      json.loads(json.dumps(recorded)), json.loads(json.dumps(header)))):
    if recorded is None:
      why = "it has no header"
    else:
      field, was, now = provenance.first_difference(
          json.loads(json.dumps(recorded)), json.loads(json.dumps(header)))
      why = f"{field} was {json.dumps(was, default=str)[:80]}, now {json.dumps(now)[:80]}"
    if jax.process_index() == 0:
      print(f"eval: regenerating {path}: {why}", flush=True)
      os.remove(path)
    return {}
  return done


def write_header(path, header):
  """Starts a raw generations file with its header line (process 0)."""
  if jax.process_index() == 0:
    with storage.open(path, "w", encoding="utf-8") as f:
      f.write(json.dumps({"header": header}, ensure_ascii=False, default=str) + "\n")


def _batch_plan(lengths, batch_size):
  """Prompt ids in fixed batches: sorted by token length (stable), then chunked."""
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_texts(model_cfg, params, tokenizer, prompts, *, sampling, batch_size,
                   max_prompt_length, buckets, raw_path, mesh=None, rules=None,
                   progress=True, desc="eval", max_batches=None, header=None):
  """Greedy (or `sampling`) completions for every prompt, appended to raw_path.

  Returns {prompt id: record}. Prompts already in raw_path are not generated
  again when its header equals `header` (module docstring). `max_batches`
  stops after that many new batches (used to simulate an interruption).
  """
  recorded, done = _read_raw(raw_path)
  done = _check_header(raw_path, header, recorded, done)
  if jax.process_index() == 0:
    storage.makedirs(os.path.dirname(storage.resolve(raw_path)))
    if not storage.exists(raw_path) and header is not None:
      write_header(raw_path, header)
    with storage.open(raw_path, "a", encoding="utf-8"):
      pass
  # Drop a torn tail so that appends start on a fresh line.
  _rewrite_clean(raw_path, done, header)
  lengths = [len(tokens.prompt_ids(tokenizer, p)) for p in prompts]
  plan = [b for b in _batch_plan(lengths, batch_size) if not all(i in done for i in b)]
  bar = metrics_log.Progress(len(plan), desc=desc, enabled=progress)
  rng = jax.random.PRNGKey(0)
  new = 0
  for batch_ids in plan:
    if max_batches is not None and new >= max_batches:
      break
    pb = tokens.encode_prompts(tokenizer, [prompts[i] for i in batch_ids],
                               max_prompt_length=max_prompt_length, buckets=buckets)
    ids, mask = _pad_rows(pb.input_ids, batch_size), _pad_rows(pb.attention_mask, batch_size)
    out = rollout.generate(model_cfg, params, ids, mask, rng, sampling, mesh=mesh, rules=rules)
    toks = np.asarray(jax.device_get(out.tokens))
    lens = np.asarray(jax.device_get(out.lengths))
    recs = []
    for r, pid in enumerate(batch_ids):
      n = int(lens[r])
      ids_r = toks[r, :n].tolist()
      text = tokenizer.decode(ids_r, skip_special_tokens=True)
      stopped = bool(n and ids_r[-1] in sampling.stop_ids)
      recs.append({"prompt_id": pid, "text": text, "num_tokens": n, "stopped": stopped,
                   "prompt_truncated": lengths[pid] > max_prompt_length})
    if jax.process_index() == 0:
      with storage.open(raw_path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs))
    for x in recs:
      done[x["prompt_id"]] = x
    new += 1
    bar.update(1)
  bar.close()
  return done


def _rewrite_clean(path, done, header):
  if jax.process_index() != 0 or not storage.exists(path):
    return
  with storage.open(path, encoding="utf-8", errors="replace") as f:
    content = f.read()
  if content and not content.endswith("\n"):
    if header is not None:
      write_header(path, header)
    with storage.open(path, "a" if header is not None else "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(done[k], ensure_ascii=False) + "\n" for k in done))


def _pad_rows(x, n):
  """Pads [b, P] to [n, P] by repeating the last row (results for it are ignored)."""
  if x.shape[0] == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)], axis=0)
