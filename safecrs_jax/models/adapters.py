"""LoRA adapters applied inside the forward pass, with dropout on the adapter input.

Shape legend: R rows (batch x positions, flattened), I in features, O out features,
r adapter rank.

For a projection y = x W (+ b) with adapter (A [I,r], B [r,O]) in the flax variable
collection "lora" (the tree of safecrs_jax.models.lora, e.g. lora/layers/self_attn/q_proj/
lora_a), the decoder computes

    y = x W (+ b) + scale * (dropout(x) A) B

as PEFT's LoRA layers do. Dropout (rate p, inverted: kept inputs are scaled by
1/(1-p)) draws from the "dropout" rng, independently per projection and per layer;
with p = 0 or no rng the result equals the merged weight W + scale A B
(lora.merge). Without adapters (Decoder.adapters None) no adapter code is traced.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

COLLECTION = "lora"


@dataclasses.dataclass(frozen=True)
class AdapterRun:
  """How the adapters of the "lora" collection are applied (static, hashable)."""
  scale: float = 1.0        # alpha / rank
  dropout: float = 0.0      # dropout rate on the adapter input (0 = off)

  def __post_init__(self):
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")


class Adapter(NamedTuple):
  """One projection's adapter: a [I,r], b [r,O], run settings, dropout key (or None)."""
  a: jax.Array
  b: jax.Array
  run: AdapterRun
  rng: Any


def adapter_delta(x2, adapter: Adapter, dt):
  """x2 [R,I] -> scale * (dropout(x2) @ a) @ b, [R,O] in dt."""
  p = adapter.run.dropout
  if p > 0 and adapter.rng is not None:
    keep = jax.random.bernoulli(adapter.rng, 1.0 - p, x2.shape)       # [R,I]
    x2 = jnp.where(keep, x2 / jnp.asarray(1.0 - p, x2.dtype), jnp.zeros((), x2.dtype))
  low = jnp.dot(x2, adapter.a.astype(dt))                             # [R,r]
  return jnp.dot(low, adapter.b.astype(dt)) * jnp.asarray(adapter.run.scale, dt)
