"""The config sections every stage shares: model, mesh, data, tokenizer, checkpoint, log, eval.

One default per field; configs/*.py set only what differs.
"""
import dataclasses
from typing import Any

from safecrs_jax.config.fields import Section

# The mesh rules' values: one mesh axis, several, or None (replicated).
MeshAxes = str | tuple[str, ...] | None

BATCH_AXES = ("data", "fsdp")   # mesh axes a batch is split over (infra/sharding.py)

# Logical parameter/activation axis -> mesh axis, the default of mesh.rules (the
# logical names are the models'; infra/sharding.py matches them to a mesh):
# (logical name, mesh axis | tuple of mesh axes | None). A name may appear several
# times: the first entry whose mesh axes are still free (and divide the dimension)
# wins, else the dimension is replicated.
DEFAULT_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),       # fused heads*head_dim dim of q / o projections
    ("kv_heads", "tensor"),    # fused kv_heads*head_dim dim of k / v projections
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache [L, B, S, K, H]
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class Model(Section):
  PATH = "model"
  preset: str = ""               # models.PRESETS name, used when hf_dir is empty
  hf_dir: str = ""               # HF dir (config.json + safetensors); wins over preset
  dtype: str = "float32"         # compute dtype ("bfloat16" on TPU/GPU)
  param_dtype: str = "float32"   # master-weight dtype
  remat: str = "none"            # remat policy per decoder block: none | full | dots_no_batch |
                                 # offload
  attention: str = "auto"        # attention kernel: auto (splash on TPU, cuDNN on GPU) | xla |
                                 # cudnn | splash
  scan_layers: bool = True       # lax.scan over layers (False: unrolled, faster on CPU)
  logits_chunk: int = 0          # output head on C positions at a time (0 = all at once, [B,T,V])
  overrides: tuple[tuple[str, Any], ...] = ()  # ((field, value), ...) ModelConfig overrides
                                               # for a preset


@dataclasses.dataclass(frozen=True)
class Mesh(Section):
  PATH = "mesh"
  # -1 = the rest. Pure FSDP over every device suits 0.5B-8B on a pod slice or a GPU
  # host; for more chips than the batch allows, move devices to "data" (or "tensor").
  shape: tuple[tuple[str, int], ...] = (("data", 1), ("fsdp", -1), ("tensor", 1))
  # Logical axis -> mesh axis (DEFAULT_RULES above): a pod run changes the layout by
  # overriding this field, without touching code.
  rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES
  num_devices: int = -1          # use only the first N devices (-1 = all; single process)
  num_slices: int = 1            # TPU slices joined over DCN: `shape` is then one slice's mesh
                                 # and "data" also spans the slices (data parallel over DCN)


@dataclasses.dataclass(frozen=True)
class Data(Section):
  PATH = "data"
  dir: str = "mini"              # released SafeRec layout, or "mini" (SafeRec-mini, built
                                 # deterministically on first use into the cache folder)
  mini_seed: int = 0             # SafeRec-mini generator seed (data.dir == "mini")
  strict: bool = True            # bad rows abort (True) or are skipped and counted
  risk_threshold: float = 0.66   # oracle: final >= threshold is unsafe
  cache_dir: str = ""            # where "mini"/"local" are built ("" = ~/.cache/safecrs_jax)
  relational_mix: float = 0.0    # share of training rows from the relational suite (0 = off)
  relational_seed: int = 0       # that suite's make_suite seed (phrasings, twins, held-out pairs)
  relational_parts: tuple[str, ...] = ()     # suite parts to train on (() = all: disclosure,
                                             # multi, turns, counterfactual)
  relational_controls: tuple[str, ...] = ()  # turn controls (() = all: reminder, revoke, spoof;
                                             # ("none",) = none)


@dataclasses.dataclass(frozen=True)
class Tokenizer(Section):
  PATH = "tokenizer"
  path: str = "local"            # HF tokenizer dir; "" = model.hf_dir; "local" = demo BPE
                                 # (trained deterministically on first use into the cache folder)
  max_length: int = 1024         # SFT: prompt + completion tokens (longer rows: see truncation)
  truncation: str = "right"      # SFT rows too long: "right" keeps the start (TRL), "left_prompt"
  buckets: tuple[int, ...] = (256, 512, 1024)  # padded lengths: one compilation each
  local_vocab_size: int = 2048   # vocabulary of the "local" demo tokenizer


@dataclasses.dataclass(frozen=True)
class Checkpoint(Section):
  PATH = "checkpoint"
  save_every: int = 500          # steps between checkpoints (and one at the end)
  save_every_minutes: float = 0.0  # also save this many minutes after the last save (0: off)
  keep: int = 3                  # checkpoints kept
  async_save: bool = True        # write checkpoints in the background
  verify: bool = True            # check each step's checksums.json on restore / load / export
  accept_unverified: bool = False  # accept a step without checksums.json (records one, warns)
  overwrite: bool = False        # a workdir holding another run's checkpoints: discard them


@dataclasses.dataclass(frozen=True)
class Log(Section):
  PATH = "log"
  every: int = 10                # steps between metric writes
  tensorboard: bool = True       # also write TensorBoard events
  progress: bool = True          # console progress bar (process 0 only)
  wandb_project: str = ""        # Weights & Biases project ("" = off; needs the wandb extra)
  wandb_mode: str = "online"     # "online" | "offline" (synced later with `wandb sync`)
  profile_steps: tuple[int, int] = (-1, -1)  # jax.profiler trace over loop steps [start, stop)
                                             # -> <workdir>/profile


@dataclasses.dataclass(frozen=True)
class Eval(Section):
  PATH = "eval"
  split: str = "test"            # split to evaluate
  batch_size: int = 16           # prompts per generation batch (global)
  max_new_tokens: int = 1024     # greedy decoding budget
  max_prompt_length: int = 7168  # prompts cut from the left beyond this (counted, reported)
  prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 7168)  # padded prompt lengths
                                                                        # (one compile each)
  ks: tuple[int, ...] = (5, 10, 15, 20)  # cut-offs for every metric (the paper's)
  max_rows: int = -1             # evaluate only the first N rows (-1 = all)
  # Relational suite (evaluation/relational.py): built from the eval split's first N rows.
  relational_max_sources: int = -1   # source rows of the suite (-1 = all); ~34 suite rows each
  relational_pair_sources: int = -1  # counterfactual twins from the first N rows (-1 = as above)
  relational_seed: int = 0           # make_suite seed (phrasings, fillers, twins)
  relational_max_prompt_length: int = -1  # -1 = longest suite prompt (rounded up to 64)
  relational_prompt_buckets: tuple[int, ...] = ()  # () = eval buckets below it + one per 128
                                                   # tokens
