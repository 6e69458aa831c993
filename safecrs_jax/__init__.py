"""safecrs_jax: SafeCRS (Safe-SFT + Safe-GDPO) on SafeRec, in JAX/Flax.

The packages follow the layers, lowest first (docs/architecture.md):

  config        the typed config schema: every default stated once
  infra/        storage (local, gs://), sharding and multi-host start,
                provenance, run lock, chips / FLOPs, metric writers
  models/       ModelConfig, the linen decoder, attention, KV-cache decode,
                LoRA, HF I/O
  saferec/      the benchmark, host-side: traits, injection, oracle, parsing,
                matching, rewards (a registry by name), metrics, curation,
                loaders, SafeRec-mini, the relational suite
  data/         tokenizers, chat templates, buckets; cached run assets
  rl/           rollouts, advantages, policy loss, rank items, learner steps
  train/        state, optimizer, loop, checkpoints, policy loading, the stages
  evaluation/   resumable generation; scoring, reports, tables, plots
  plan/         AOT compilation for TPU topologies
  demo          the whole pipeline on SafeRec-mini

Each layer imports only the layers listed above it; no stage imports another
(tests/test_architecture.py).

Shape letters, used in every docstring and shape comment of the package:
  A  micro-batches accumulated per optimizer step
  B  rows of a (micro-)batch; in Safe-GDPO a rollout batch has B = prompts x G
     rows and a group is G consecutive rows
  G  rollouts per prompt (group size)
  T  tokens: the padded sequence (SFT) or the completion (GDPO)
  P  prompt tokens            S  key/value slots (cache length)
  R  reward functions         I  ranked list items scored per completion (rec_num)
  L  layers   D  model dim    F  MLP dim    V  vocab
  N  query heads   K  kv heads   Q = N / K query heads per kv head   H  head dim

Submodules are imported lazily so that `import safecrs_jax.saferec` does not
pull in the model stack (and the other way round).
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "config", "infra", "models", "saferec", "data", "rl", "train", "evaluation", "plan",
    "demo",
)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
