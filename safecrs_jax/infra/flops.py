"""Analytic model FLOPs of the stage programs (the numerator of MFU).

Shape letters (package legend): L layers, D model dim, F MLP dim, N query
heads, K kv heads, H head dim, V vocab; rows, T tokens per row.

A matmul of [m, k] x [k, n] is 2mkn FLOPs. Per token the decoder body costs
2 x (its weight-matmul parameters) and causal attention 2 x L x N x H x (keys
seen) x 2 (scores and values); the head 2 x D x V where it is applied. A
training step is forward + backward = 3 x forward; rematerialisation is not
counted (it is what the MFU ceiling charges, see report.py).
"""
from __future__ import annotations


def body_matmul_params(cfg) -> int:
  """Weight-matmul parameters of the L decoder blocks (no embedding, no head)."""
  d, h = cfg.hidden_size, cfg.head_dim
  attn = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2
  return cfg.num_layers * (attn + 3 * d * cfg.intermediate_size)


def forward(cfg, rows, length, head_positions) -> float:
  """One forward over rows x length tokens (causal), the head on head_positions per row."""
  body = 2.0 * body_matmul_params(cfg) * rows * length
  attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * rows * length * (length + 1) / 2
  head = 2.0 * cfg.hidden_size * cfg.vocab_size * rows * head_positions
  return body + attn + head


def train(cfg, rows, length, head_positions) -> float:
  """Forward + backward of one optimizer step (all micro-batches)."""
  return 3.0 * forward(cfg, rows, length, head_positions)


def generate(cfg, rows, prompt, new_tokens) -> float:
  """Prefill of rows x prompt (head on the last position) + new_tokens decode steps."""
  prefill = forward(cfg, rows, prompt, 1)
  per_token = 2.0 * (body_matmul_params(cfg) + cfg.hidden_size * cfg.vocab_size) * rows
  keys = new_tokens * prompt + new_tokens * (new_tokens + 1) / 2       # keys seen, summed
  attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * rows * keys
  return prefill + per_token * new_tokens + attn
