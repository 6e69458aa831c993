"""The demo: tiny Llama-style model, SafeRec-mini, local tokenizer, CPU.

    python -m launch.train_sft --config=configs/demo.py --workdir=runs/demo_sft
    python -m launch.train_gdpo --config=configs/demo.py:stage=gdpo --workdir=runs/demo_gdpo

arg: stage=sft|gdpo, data_dir= (default "mini"), model_dir= (HF dir instead of
the random-init preset), size=tiny|test ("test" is a 2-layer width-64 model for
unit tests and smoke runs), relational=off|twins|on (what relational-suite rows
the training sees; docs/relational-safety.md, "Training for it"):
  off (default)    plain rows in both stages, the reference's two rewards.
  twins            Safe-SFT on plain rows; Safe-GDPO mixes in counterfactual
                   twin triples (constrained / neutral / decoy) of the training
                   split, 0.375 of its prompts, with the rewards relevance,
                   safety, over_filter and count (lists of 10).
  on               suite rows (disclosure, turns; + counterfactual for
                   Safe-GDPO) in both stages, rewards relevance, safety,
                   over_filter, 384-token buckets.
"""
from configs import common

RECIPES = ("off", "twins", "on")   # relational=: what suite rows training sees (docstring)
SIZES = {
    "tiny": (),   # models.PRESETS["tiny"] as is (~2.5M params with the demo vocabulary)
    "test": (("hidden_size", 64), ("intermediate_size", 128), ("num_layers", 2),
             ("num_heads", 4), ("num_kv_heads", 2), ("head_dim", 16)),
}


def get_config(arg=None):
  a = common.parse_arg(arg, stage="sft", data_dir=common.MINI, model_dir="", size="tiny",
                       relational="off")
  if a.size not in SIZES:
    raise ValueError(f"size={a.size!r}; known: {sorted(SIZES)}")
  if a.relational not in RECIPES:
    raise ValueError(f"relational={a.relational!r}; expected one of {RECIPES}")
  rel = a.relational == "on"
  twins = a.relational == "twins" and a.stage == "gdpo"
  c = common.build(stage=a.stage, model_preset="tiny", model_dir=a.model_dir,
                   data_dir=a.data_dir)
  c.model.scan_layers = False        # unrolled layers compile to faster CPU code
  c.model.overrides = SIZES[a.size]
  c.mesh.num_devices = 1             # one CPU device; set -1 to shard over all

  # Without the <reasoning> block SafeRec-mini sequences are ~90-200 tokens.
  # The tiny model spends its few minutes on the lists instead of on
  # reproducing a long reasoning preamble (the paper-size configs keep it).
  c.sft.reasoning = False
  c.sft.curate = True                # SafeRec-mini ships the teacher's lists; curate them
  # Relational-suite rows (saferec/relational/training.py) are mixed into both
  # stages: Safe-SFT learns the implicit and distant disclosures from curated
  # targets, Safe-GDPO adds the counterfactual twins with the over_filter reward
  # (neutral / decoy users must keep what the teacher offered them). Suite
  # prompts run to ~350 tokens, hence the 384 buckets (plain rows stay in the
  # shorter ones). Turn controls (reminder / revoke / spoof) are test-only here.
  if rel:
    c.data.relational_mix = 0.1 if a.stage == "sft" else 0.2
    c.data.relational_parts = (("disclosure", "turns") if a.stage == "sft" else
                               ("disclosure", "turns", "counterfactual"))
    c.data.relational_controls = ("none",)
  # twins: only Safe-GDPO sees suite rows, and only the counterfactual triples,
  # 3 of every 8 prompts (one triple per step): the constrained twin is scored
  # by safety, its neutral and decoy twins by over_filter, so the policy is paid
  # for withholding a hazard from the user who stated it and for keeping it for
  # the users who did not. The count reward (target 10) stops it buying safety
  # with shorter lists. Seed 0: the best relational figures of any recipe; seed
  # 1: it misses the SafeRec cut (docs/relational-safety.md), so it is not the default.
  if twins:
    c.data.relational_mix = 0.375
    c.data.relational_parts = ("counterfactual",)
    c.data.relational_controls = ("none",)
  c.tokenizer.max_length = 384 if rel else 256
  c.tokenizer.buckets = (128, 256, 384) if rel else (128, 256)

  c.sft.num_steps = 300              # ~3 minutes on 2 CPU cores
  c.sft.batch_size = 16
  c.sft.grad_accum = 1
  c.sft.eval_every = 100
  c.sft.eval_batches = 4
  # A random-init tiny model needs a big SFT step. For GDPO, 3e-5 cut the
  # rollout SVR steadily with KL < 0.01; 1e-4 shrank the lists (fewer items,
  # fewer violations) and drove KL to ~0.9 within 15 steps.
  c.optim.lr = 2e-3 if a.stage == "sft" else 3e-5

  c.checkpoint.save_every = 100 if a.stage == "sft" else 20
  c.log.every = 10 if a.stage == "sft" else 5

  # 80 steps (~3 minutes on 2 CPU cores). At 40 the SVR cut rode on the float
  # summation order: the same recipe gave -26%, -34% and -3% on three code
  # versions whose only difference was the order of float sums (another
  # trajectory each); at 80 it gives -53% (docs/getting-started.md, "Will it be the
  # same table?").
  c.gdpo.num_steps = 80
  c.gdpo.batch_size = 32             # completions per step: 8 prompts x G = 4
  c.gdpo.grad_accum = 1
  c.gdpo.group_size = 4
  c.gdpo.max_prompt_length = 384 if rel or twins else 128
  c.gdpo.prompt_buckets = (128, 384) if rel or twins else (64, 128)
  if rel:
    c.gdpo.rewards = ("relevance", "safety", "over_filter")
    c.gdpo.reward_weights = (1.0, 1.0, 1.0)
  if twins:
    c.gdpo.rewards = ("relevance", "safety", "over_filter", "count")
    c.gdpo.reward_weights = (1.0, 1.0, 1.0, 1.0)
    c.gdpo.lambda_count = 1.0          # count reward on, target_count 10
  c.gdpo.max_completion_length = 96  # lists are ~40 tokens

  c.eval.max_new_tokens = 128
  c.eval.max_prompt_length = 384 if rel else 128
  c.eval.prompt_buckets = (64, 128, 384) if rel else (64, 128)
  return c
