"""The shared config structure; model files only change what differs.

Every field, its type, its one default and its comment live in the schema
(safecrs_jax/config/); `build(...)` returns that tree as a ConfigDict with what
a stage and the per-file args change. `arg` strings look like
"stage=gdpo,data_dir=/data/saferec,model_dir=/ckpt/qwen" (big_vision-style
`parse_arg`). Tuples, not lists, so that every field can be overridden from the
command line (`--config.gdpo.group_size=4`); the entry points check every field
when they turn the ConfigDict into the typed config.
"""
import ml_collections

from safecrs_jax import config as config_lib

# Sentinels for the shipped default: SafeRec-mini data and the locally trained
# tokenizer, both built deterministically on first use into a cache folder.
MINI = "mini"
LOCAL_TOKENIZER = "local"


def parse_arg(arg, **defaults):
  """Parses "k=v,k2=v2" into a ConfigDict, typed after `defaults`."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"config arg {item!r} is not of the form key=value (in {arg!r})")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      value = value.lower() in ("1", "true", "yes")
    out[key] = kind(value)
  return out


def paper_model(arg, preset, *, remat, gdpo_lr_drop=None):
  """Config for one of the paper's models (qwen25 / llama32 / llama31 files).

  arg: stage=sft|gdpo, data_dir= (released SafeRec root; required to train),
  model_dir= (HF dir of the instruct model; empty = random init from the
  preset, for shape checks and smoke runs only), init= (gdpo: the Safe-SFT
  run dir / step dir to start from; a LoRA run is merged on load), lora=1
  (sft: LoRA Safe-SFT with the reference's r 16, alpha 32, dropout 0.05
  instead of full fine-tuning).
  """
  a = parse_arg(arg, stage="sft", data_dir="", model_dir="", init="", lora=False)
  c = build(stage=a.stage, model_preset=preset, model_dir=a.model_dir, data_dir=a.data_dir,
            tokenizer_path="")
  c.model.dtype = "bfloat16"     # bf16 compute, float32 master weights (param_dtype)
  c.model.remat = "full" if remat is True else (remat or "none")
  c.model.logits_chunk = 256     # never a [B,T,V] float32 logits buffer (vocab 128k-152k)
  # mesh.shape stays the schema's pure FSDP over every device (suits 0.5B-8B).
  c.gdpo.init_checkpoint = a.init
  if a.lora:
    c.sft.lora.rank = 16         # alpha 32 and dropout 0.05 are the shared defaults
  if a.stage == "gdpo" and gdpo_lr_drop:   # reference: 1e-7 from step 8000 for 3B / 8B
    c.optim.lr_drop_step, c.optim.lr_drop_to = gdpo_lr_drop
  return c


def build(*, stage, model_preset="", model_dir="", data_dir=MINI,
          tokenizer_path=LOCAL_TOKENIZER):
  """The full config tree with the paper's defaults for `stage` (the schema's, and
  Safe-GDPO's optimiser: lr 1e-6 constant, no warmup, betas (0.9, 0.99))."""
  if stage not in config_lib.STAGES:
    raise ValueError(f"stage must be 'sft' or 'gdpo', got {stage!r}")
  c = ml_collections.ConfigDict(config_lib.Config().to_dict())
  c.stage = stage
  c.model.preset = model_preset
  c.model.hf_dir = model_dir
  c.data.dir = data_dir
  c.tokenizer.path = tokenizer_path
  if stage == "gdpo":
    c.optim.lr = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    c.optim.b2 = 0.99
  return c
