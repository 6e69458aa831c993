"""The config sections of the training stages: optim, sft (+ sft.lora), gdpo.

The optim defaults are Safe-SFT's; configs/common.py::build sets the four values
Safe-GDPO changes (lr 1e-6, constant, no warmup, b2 0.99).
"""
import dataclasses

from safecrs_jax.config.fields import Section


@dataclasses.dataclass(frozen=True)
class Optim(Section):
  PATH = "optim"
  lr: float = 5e-5               # peak learning rate
  schedule: str = "cosine"       # "cosine" | "constant" | "linear" (all after warmup)
  warmup_ratio: float = 0.05     # share of steps in linear warmup
  b1: float = 0.9                # Adam beta1
  b2: float = 0.999              # Adam beta2
  eps: float = 1e-8              # Adam epsilon
  weight_decay: float = 0.0      # AdamW decoupled weight decay
  grad_clip: float = 1.0         # global-norm clip (0 = off)
  lr_drop_step: int = -1         # from this update on, lr = lr_drop_to (-1 = never; llama31 /
                                 # llama32 Safe-GDPO: 8000 -> 1e-7, the reference recipe)
  lr_drop_to: float = 0.0        # the learning rate after lr_drop_step


@dataclasses.dataclass(frozen=True)
class Lora(Section):
  PATH = "sft.lora"
  rank: int = 0                  # 0 = full fine-tuning (reference LoRA: r 16, alpha 32)
  alpha: float = 32.0            # scale = alpha / rank
  dropout: float = 0.05          # dropout on the adapter input (reference: 0.05)
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj")   # module names whose kernels get adapters


@dataclasses.dataclass(frozen=True)
class Sft(Section):
  PATH = "sft"
  epochs: int = 10               # passes over the train split (num_steps wins if > 0)
  num_steps: int = -1            # optimizer steps; -1 = derived from epochs
  batch_size: int = 12           # per-device micro-batch (global = this x data-parallel devices)
  grad_accum: int = 8            # micro-batches per optimizer step (scanned in the step)
  eval_every: int = 200          # steps between validation-loss passes
  eval_batches: int = 20         # validation micro-batches per pass (-1 = whole split)
  curate: bool = False           # reference: released completions verbatim; True = re-curate
                                 # with the oracle
  backfill: bool = False         # reference: no back-fill; True fills lists back to the
                                 # teacher's length with safe items the teacher recommended
                                 # elsewhere
  reasoning: bool = True         # keep the <reasoning> block in curated targets
  lora: Lora = dataclasses.field(default_factory=Lora)


@dataclasses.dataclass(frozen=True)
class Gdpo(Section):
  PATH = "gdpo"
  init_checkpoint: str = ""      # Safe-SFT result: orbax run dir / step dir, or HF dir
  num_steps: int = 1000          # loop steps: one prompt batch each, mu optimizer updates per step
  batch_size: int = 4            # per device per micro-batch, in gdpo.batch_unit
  batch_unit: str = "completions"  # reference (TRL): batch_size counts completions; "prompts": x G
  grad_accum: int = 8            # micro-batches per optimizer step
  group_size: int = 8            # G rollouts per prompt
  temperature: float = 1.0       # sampling temperature for rollouts
  top_p: float = 1.0             # nucleus sampling (1.0 = off)
  top_k: int = 0                 # top-k sampling (0 = off)
  max_prompt_length: int = 7168  # generation context 8192 - completion 1024: no cut in practice
  max_completion_length: int = 1024  # new tokens per rollout
  prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 7168)  # padded prompt lengths
  rollout_chunks: int = 0        # rollout calls per loop step (0 = as many as possible up to
                                 # grad_accum)
  mu: int = 1                    # policy iterations per rollout batch (1 = on-policy)
  beta: float = 1e-3             # KL(k3) weight to the frozen SFT reference; 0 = no reference
  eps_low: float = 0.2           # clip range below 1
  eps_high: float = 0.2          # clip range above 1
  importance_sampling: str = "sequence"  # "sequence" | "token"
  loss_agg: str = "dapo"         # "dapo" | "grpo" | "bnpo" | "dr_grpo"
  advantage_mode: str = "gdpo"   # "gdpo" | "grpo" | "rank"
  rewards: tuple[str, ...] = ("relevance", "safety")  # from: relevance, safety, count,
                                                      # safe_relevance, over_filter
  reward_weights: tuple[float, ...] = (1.0, 1.0)      # one per reward
  rec_num: int = 20              # ranks scored by the rewards
  relevance: str = "hit"         # "hit" (released trainer) | "dcg"
  lambda_safe: float = 1.0       # safety reward scale
  penalty_safe: float = 1.0      # per-violation penalty
  target_count: int = 10         # count reward target
  lambda_count: float = 0.0      # count reward scale (0 = off)
  rank_reward: str = "log_decay"  # per-rank form in rank mode: "exp_inf" | "log_decay"
  year_order: str = "later_first"  # reward matching years y, y+1, y-1, ... (reference);
                                   # "earlier_first"
  rank_discount_safety: bool = True  # rank mode: safety penalty x d_k (reference); False =
                                     # undiscounted
