"""The shared config structure; model files only change what differs.

Every config file calls `build(...)` and returns a locked-ready ConfigDict.
`arg` strings look like "stage=gdpo,data_dir=/data/saferec,model_dir=/ckpt/qwen"
(big_vision-style `parse_arg`). Tuples, not lists, so that every field can be
overridden from the command line (`--config.gdpo.group_size=4`).
"""
import ml_collections

from safecrs_jax.infra import sharding

# Logical parameter/activation axis -> mesh axis. The library's table (see
# safecrs_jax/infra/sharding.py for the logical names and how rules are matched) is
# copied into every config's `mesh.rules`, so a pod run changes the layout by
# overriding that field, without touching code.
DEFAULT_RULES = sharding.DEFAULT_RULES

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
  c.model.scan_layers = True
  c.model.logits_chunk = 256     # never a [B,T,V] float32 logits buffer (vocab 128k-152k)
  # Pure FSDP over every device suits 0.5B-8B on a pod slice or a GPU host; for
  # more chips than the batch allows, move devices to "data" (or "tensor").
  c.mesh.shape = (("data", 1), ("fsdp", -1), ("tensor", 1))
  c.gdpo.init_checkpoint = a.init
  if a.lora:
    c.sft.lora.rank = 16         # alpha 32 and dropout 0.05 are the shared defaults
  if a.stage == "gdpo" and gdpo_lr_drop:   # reference: 1e-7 from step 8000 for 3B / 8B
    c.optim.lr_drop_step, c.optim.lr_drop_to = gdpo_lr_drop
  return c


def build(*, stage, model_preset="", model_dir="", data_dir=MINI,
          tokenizer_path=LOCAL_TOKENIZER):
  """The full config tree with the paper's defaults for `stage`."""
  if stage not in ("sft", "gdpo"):
    raise ValueError(f"stage must be 'sft' or 'gdpo', got {stage!r}")
  c = ml_collections.ConfigDict()
  c.stage = stage              # which training stage this config launches
  c.seed = 0                   # root seed: init, data order, dropout, sampling

  c.model = ml_collections.ConfigDict()
  c.model.preset = model_preset  # models.PRESETS name, used when hf_dir is empty
  c.model.hf_dir = model_dir     # HF dir (config.json + safetensors); wins over preset
  c.model.dtype = "float32"      # compute dtype ("bfloat16" on TPU/GPU)
  c.model.param_dtype = "float32"  # master-weight dtype
  c.model.remat = "none"         # remat policy per decoder block: none | full | dots_no_batch | offload
  c.model.attention = "auto"     # attention kernel: auto (splash on TPU, cuDNN on GPU) | xla | cudnn | splash
  c.model.scan_layers = True     # lax.scan over layers (False: unrolled, faster on CPU)
  c.model.logits_chunk = 0       # output head on C positions at a time (0 = all at once, [B,T,V])
  c.model.overrides = ()         # ((field, value), ...) ModelConfig overrides for a preset

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (("data", 1), ("fsdp", -1), ("tensor", 1))  # -1 = the rest
  c.mesh.rules = DEFAULT_RULES   # logical axis -> mesh axis
  c.mesh.num_devices = -1        # use only the first N devices (-1 = all; single process)

  c.data = ml_collections.ConfigDict()
  c.data.dir = data_dir          # released SafeRec layout, or "mini" (SafeRec-mini)
  c.data.mini_seed = 0           # SafeRec-mini generator seed (data.dir == "mini")
  c.data.strict = True           # bad rows abort (True) or are skipped and counted
  c.data.risk_threshold = 0.66   # oracle: final >= threshold is unsafe
  c.data.cache_dir = ""          # where "mini"/"local" are built ("" = ~/.cache/safecrs_jax)
  c.data.relational_mix = 0.0    # share of training rows from the relational suite (0 = off)
  c.data.relational_seed = 0     # that suite's make_suite seed (phrasings, twins, held-out pairs)
  c.data.relational_parts = ()   # suite parts to train on (() = all: disclosure, multi, turns,
                                 # counterfactual)
  c.data.relational_controls = ()  # turn controls (() = all: reminder, revoke, spoof; ("none",) = none)

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = tokenizer_path  # HF tokenizer dir; "" = model.hf_dir; "local" = demo BPE
  c.tokenizer.max_length = 1024      # SFT: prompt + completion tokens (longer rows: see truncation)
  c.tokenizer.truncation = "right"   # SFT rows too long: "right" keeps the start (TRL), "left_prompt"
  c.tokenizer.buckets = (256, 512, 1024)  # padded lengths: one compilation each
  c.tokenizer.local_vocab_size = 2048     # vocabulary of the "local" demo tokenizer

  c.optim = ml_collections.ConfigDict()
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 500  # steps between checkpoints (and one at the end)
  c.checkpoint.save_every_minutes = 0.0  # also save this many minutes after the last save (0: off)
  c.checkpoint.keep = 3          # checkpoints kept
  c.checkpoint.async_save = True  # write checkpoints in the background
  c.checkpoint.verify = True     # check each step's checksums.json on restore / load / export
  c.checkpoint.overwrite = False  # a workdir holding another run's checkpoints: discard them

  c.log = ml_collections.ConfigDict()
  c.log.every = 10               # steps between metric writes
  c.log.tensorboard = True       # also write TensorBoard events
  c.log.progress = True          # console progress bar (process 0 only)
  c.log.wandb_project = ""       # Weights & Biases project ("" = off; needs the wandb extra)
  c.log.wandb_mode = "online"    # "online" | "offline" (synced later with `wandb sync`)
  c.log.profile_steps = (-1, -1)  # jax.profiler trace over loop steps [start, stop) -> <workdir>/profile

  c.sft = ml_collections.ConfigDict()
  c.sft.epochs = 10              # passes over the train split (num_steps wins if > 0)
  c.sft.num_steps = -1           # optimizer steps; -1 = derived from epochs
  c.sft.batch_size = 12          # per-device micro-batch (global = this x data-parallel devices)
  c.sft.grad_accum = 8           # micro-batches per optimizer step (scanned in the step)
  c.sft.eval_every = 200         # steps between validation-loss passes
  c.sft.eval_batches = 20        # validation micro-batches per pass (-1 = whole split)
  c.sft.curate = False           # reference: released completions verbatim; True = re-curate with the oracle
  c.sft.backfill = False         # reference: no back-fill; True fills lists back to the teacher's length with safe items the teacher recommended elsewhere
  c.sft.reasoning = True         # keep the <reasoning> block in curated targets
  c.sft.lora = ml_collections.ConfigDict()
  c.sft.lora.rank = 0            # 0 = full fine-tuning
  c.sft.lora.alpha = 32.0        # scale = alpha / rank (reference: r 16, alpha 32)
  c.sft.lora.dropout = 0.05      # dropout on the adapter input (reference: 0.05)
  c.sft.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

  c.gdpo = ml_collections.ConfigDict()
  c.gdpo.init_checkpoint = ""    # Safe-SFT result: orbax run dir / step dir, or HF dir
  c.gdpo.num_steps = 1000        # loop steps: one prompt batch each, mu optimizer updates per step
  c.gdpo.batch_size = 4          # per device per micro-batch, in gdpo.batch_unit
  c.gdpo.batch_unit = "completions"  # reference (TRL): batch_size counts completions; "prompts": x G
  c.gdpo.grad_accum = 8          # micro-batches per optimizer step
  c.gdpo.group_size = 8          # G rollouts per prompt
  c.gdpo.temperature = 1.0       # sampling temperature for rollouts
  c.gdpo.top_p = 1.0             # nucleus sampling (1.0 = off)
  c.gdpo.top_k = 0               # top-k sampling (0 = off)
  c.gdpo.max_prompt_length = 7168     # generation context 8192 - completion 1024: no cut in practice
  c.gdpo.max_completion_length = 1024  # new tokens per rollout
  c.gdpo.prompt_buckets = (256, 512, 1024, 2048, 4096, 7168)  # padded prompt lengths
  c.gdpo.rollout_chunks = 0      # rollout calls per loop step (0 = as many as possible up to grad_accum)
  c.gdpo.mu = 1                  # policy iterations per rollout batch (1 = on-policy)
  c.gdpo.beta = 1e-3             # KL(k3) weight to the frozen SFT reference; 0 = no reference
  c.gdpo.eps_low = 0.2           # clip range below 1
  c.gdpo.eps_high = 0.2          # clip range above 1
  c.gdpo.importance_sampling = "sequence"  # "sequence" | "token"
  c.gdpo.loss_agg = "dapo"       # "dapo" | "grpo" | "bnpo" | "dr_grpo"
  c.gdpo.advantage_mode = "gdpo"  # "gdpo" | "grpo" | "rank"
  c.gdpo.rewards = ("relevance", "safety")  # from: relevance, safety, count, safe_relevance, over_filter
  c.gdpo.reward_weights = (1.0, 1.0)        # one per reward
  c.gdpo.rec_num = 20            # ranks scored by the rewards
  c.gdpo.relevance = "hit"       # "hit" (released trainer) | "dcg"
  c.gdpo.lambda_safe = 1.0       # safety reward scale
  c.gdpo.penalty_safe = 1.0      # per-violation penalty
  c.gdpo.target_count = 10       # count reward target
  c.gdpo.lambda_count = 0.0      # count reward scale (0 = off)
  c.gdpo.rank_reward = "log_decay"  # per-rank form in rank mode: "exp_inf" | "log_decay"
  c.gdpo.year_order = "later_first"  # reward matching years y, y+1, y-1, ... (reference); "earlier_first"
  c.gdpo.rank_discount_safety = True  # rank mode: safety penalty x d_k (reference); False = undiscounted

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"          # split to evaluate
  c.eval.batch_size = 16         # prompts per generation batch (global)
  c.eval.max_new_tokens = 1024   # greedy decoding budget
  c.eval.max_prompt_length = 7168  # prompts cut from the left beyond this (counted, reported)
  c.eval.prompt_buckets = (256, 512, 1024, 2048, 4096, 7168)  # padded prompt lengths (one compile each)
  c.eval.ks = (5, 10, 15, 20)    # cut-offs for every metric (the paper's)
  c.eval.max_rows = -1           # evaluate only the first N rows (-1 = all)
  # Relational suite (evaluation/relational.py): built from the eval split's first N rows.
  c.eval.relational_max_sources = -1   # source rows of the suite (-1 = all); ~34 suite rows each
  c.eval.relational_pair_sources = -1  # counterfactual twins from the first N rows (-1 = as above)
  c.eval.relational_seed = 0           # make_suite seed (phrasings, fillers, twins)
  c.eval.relational_max_prompt_length = -1  # -1 = longest suite prompt (rounded up to 64)
  c.eval.relational_prompt_buckets = ()     # () = eval buckets below it + one per 128 tokens

  if stage == "sft":
    c.optim.lr = 5e-5            # peak learning rate
    c.optim.schedule = "cosine"  # "cosine" | "constant" (both after warmup)
    c.optim.warmup_ratio = 0.05  # share of steps in linear warmup
    c.optim.b1 = 0.9             # Adam beta1
    c.optim.b2 = 0.999           # Adam beta2
    c.optim.eps = 1e-8           # Adam epsilon
    c.optim.weight_decay = 0.0   # AdamW decoupled weight decay
    c.optim.grad_clip = 1.0      # global-norm clip (0 = off)
    c.optim.lr_drop_step = -1    # from this update on, lr = lr_drop_to (-1 = never)
    c.optim.lr_drop_to = 0.0
  else:
    c.optim.lr = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.lr_drop_step = -1    # llama31 / llama32 set 8000 -> 1e-7 (the reference recipe)
    c.optim.lr_drop_to = 0.0
  return c
