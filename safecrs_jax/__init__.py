"""safecrs_jax: SafeCRS (Safe-SFT + Safe-GDPO) on SafeRec, in JAX/Flax.

The modules follow the data path — rows -> tokens -> model -> text -> rewards
-> advantages -> loss -> update -> loop (docs/architecture.md):

  saferec/       the benchmark, host-side: traits, injection, oracle, parsing,
                 matching, rewards (a registry by name), metrics, curation,
                 loaders, SafeRec-mini
  tokens         tokenizers, chat templates, loss masks, buckets
  models/        ModelConfig, the linen decoder, KV cache, HF I/O
  sharding       meshes, logical rules, batch shardings, host <-> global arrays
  policy         a run's model config; the one loader (preset | HF dir | orbax)
  rollout        prefill + KV-cache decode, sampling, log-probs
  advantages     rewards -> advantages (gdpo / grpo / rank), diagnostics
  policy_loss    clipped objective, KL, aggregations
  rank_items     rank mode: completion token -> list item
  steps          the jitted SFT and GDPO steps over one accumulation scan
  train_loop     run directory, restore-or-init, cadence, preemption, the loop
  sft, gdpo      the two stages: setup and the body of a step
  evaluation/    resumable generation; scoring, reports, tables, plots
  checkpoint     orbax save / restore; per-step checksums, damage checks
  provenance     content hashes, fingerprints, the check on every reuse
  run_lock       one run per work directory
  optim, lora, train_state, metrics_log, assets, demo

Imports point one way: launch/ and demo -> stages and evaluation -> loop,
steps, policy, rollout, advantages, losses -> models, sharding, tokens,
saferec, checkpoint, optim, lora, metric writers. No stage imports another.

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
    "models", "sharding", "tokens", "saferec", "optim", "checkpoint", "policy", "rollout",
    "advantages", "policy_loss", "rank_items", "steps", "train_loop", "sft", "gdpo",
    "evaluation", "metrics_log", "lora", "assets", "train_state", "demo", "plan", "provenance",
    "run_lock", "chips", "flops",
)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
