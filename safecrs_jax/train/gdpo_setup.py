"""Safe-GDPO's settings, batch geometry, prompts and starting policy, from the config.

    per_rank = check_config(config.gdpo)       # validates; True for per-rank advantages
    loss_cfg = loss_config(config.gdpo)        # policy_loss.LossConfig
    rewards = reward_settings(config.gdpo)     # saferec.RewardSettings
    geo = batch_geometry(config.gdpo, dp)      # group, accum, micro_rows, step_prompts, chunks
    n = steps_per_epoch(num_rows, geo["step_prompts"])
    sampling = sampling_config(config.gdpo, tokenizer)   # rollout.SamplingConfig
    rows, oracle, mix = load_prompts(config, data_dir)
    pol = load_init_policy(config, mesh, rules, data_dir)

The planner (plan/programs.py) builds the stage's programs from the same
geometry and loss settings.
"""
import jax

from safecrs_jax import saferec
from safecrs_jax.data import tokens
from safecrs_jax.rl import advantages, policy_loss, rollout
from safecrs_jax.saferec.relational import training as rel_training
from safecrs_jax.train import policy


def loss_config(gcfg):
  """policy_loss.LossConfig from the gdpo config section."""
  return policy_loss.LossConfig(beta=float(gcfg.beta), eps_low=float(gcfg.eps_low),
                                eps_high=float(gcfg.eps_high),
                                importance_sampling=str(gcfg.importance_sampling),
                                loss_agg=str(gcfg.loss_agg))


def reward_settings(gcfg):
  """saferec.RewardSettings from the gdpo config section."""
  return saferec.RewardSettings(
      rec_num=int(gcfg.rec_num), lambda_safe=float(gcfg.lambda_safe),
      penalty_safe=float(gcfg.penalty_safe), target_count=int(gcfg.target_count),
      lambda_count=float(gcfg.lambda_count), relevance=str(gcfg.relevance),
      rank_reward=str(gcfg.rank_reward), year_order=str(gcfg.year_order),
      discount_safety=bool(gcfg.rank_discount_safety))


def check_config(g):
  """Validates the gdpo section; returns True when advantages are per rank."""
  if g.advantage_mode not in advantages.ADVANTAGES:
    raise ValueError(f"gdpo.advantage_mode must be one of {advantages.ADVANTAGE_MODES}, "
                     f"got {g.advantage_mode!r}")
  if len(g.rewards) != len(g.reward_weights):
    raise ValueError(f"gdpo.rewards {tuple(g.rewards)} and gdpo.reward_weights "
                     f"{tuple(g.reward_weights)} must have the same length")
  per_rank = advantages.ADVANTAGES[g.advantage_mode].per_rank
  table = saferec.RANK_REWARDS if per_rank else saferec.SEQUENCE_REWARDS
  if not set(g.rewards) <= set(table):
    kind = "per-rank forms" if per_rank else "sequence forms"
    raise ValueError(f"gdpo.advantage_mode={g.advantage_mode!r} has {kind} of "
                     f"{sorted(table)} only, got rewards {tuple(g.rewards)}")
  if int(g.mu) < 1:
    raise ValueError(f"gdpo.mu must be >= 1, got {int(g.mu)}")
  return per_rank


BATCH_UNITS = ("completions", "prompts")


def batch_geometry(g, dp):
  """How a loop step's rollouts are generated and cut into learner micro-batches.

  g: the gdpo config section; dp: data-parallel devices. gdpo.batch_size counts
  completions per device per micro-batch (batch_unit "completions", TRL's
  per_device_train_batch_size, the reference: 4 x 8 accumulation with G = 8 is
  4 prompts per device per optimizer step) or prompts (batch_unit "prompts":
  batch_size x G completions). Returns group, accum (A), micro_rows (global
  rows per micro-batch), step_prompts, and the rollout chunks: as many calls as
  possible up to A, each with a whole number of prompts per device (rollout
  memory scales with a call's rows; gdpo.rollout_chunks > 0 forces a count).
  """
  group, accum, unit = int(g.group_size), int(g.grad_accum), str(g.batch_unit)
  if unit not in BATCH_UNITS:
    raise ValueError(f"gdpo.batch_unit must be one of {BATCH_UNITS}, got {unit!r}")
  micro_rows = int(g.batch_size) * dp * (group if unit == "prompts" else 1)
  if (micro_rows * accum) % group:
    raise ValueError(f"gdpo: {micro_rows * accum} completions per step (batch_size "
                     f"{int(g.batch_size)} x {dp} devices x grad_accum {accum}) are not whole "
                     f"groups of group_size={group}")
  step_prompts = micro_rows * accum // group
  chunks = int(g.rollout_chunks)
  if chunks <= 0:
    chunks = max(c for c in range(1, accum + 1)
                 if step_prompts % c == 0 and (step_prompts // c) % dp == 0) \
        if step_prompts % dp == 0 else 1
  if step_prompts % chunks or (step_prompts // chunks) % dp:
    raise ValueError(f"gdpo: {step_prompts} prompts per step do not split into {chunks} rollout "
                     f"chunks of a multiple of {dp} devices; change gdpo.rollout_chunks, "
                     "batch_size or grad_accum")
  return {"group": group, "accum": accum, "micro_rows": micro_rows,
          "step_prompts": step_prompts, "chunks": chunks, "chunk_prompts": step_prompts // chunks}


def steps_per_epoch(num_rows, step_prompts):
  """Loop steps in an epoch of num_rows prompts (drop-last); an error when none."""
  steps = num_rows // step_prompts
  if steps == 0:
    raise ValueError(f"{num_rows} GDPO prompts < one step of {step_prompts} "
                     "(gdpo.batch_size x devices x grad_accum, see gdpo.batch_unit); lower "
                     "gdpo.batch_size / grad_accum")
  return steps


def sampling_config(g, tokenizer):
  """rollout.SamplingConfig of the gdpo section: G samples, stop and pad ids of `tokenizer`."""
  return rollout.SamplingConfig(
      max_new_tokens=int(g.max_completion_length), num_samples=int(g.group_size),
      temperature=float(g.temperature), top_p=float(g.top_p), top_k=int(g.top_k),
      stop_ids=tokens.stop_token_ids(tokenizer), pad_id=tokens.pad_id(tokenizer))


def load_prompts(config, data_dir):
  """(rows, oracle, mix): the training prompts, the safety oracle, the relational mix.

  With data.relational_mix > 0 the rows are the mix's (training rows plus the
  relational suite) and mix orders them; mix is None when off.
  """
  rows = saferec.load_split(data_dir, "train", stage="grpo",
                            strict=config.data.strict)
  oracle = saferec.load_oracle(data_dir, float(config.data.risk_threshold))
  mix = rel_training.from_config(rows, oracle, config.data)
  return (mix.rows if mix else rows), oracle, mix


def load_init_policy(config, mesh, rules, data_dir):
  """policy.Policy of gdpo.init_checkpoint; warns when it is empty (no Safe-SFT start)."""
  init = config.gdpo.init_checkpoint
  if not init and jax.process_index() == 0:
    print("gdpo: WARNING: gdpo.init_checkpoint is empty: training from "
          + (f"the base model {config.model.hf_dir}" if config.model.hf_dir else
             f"a RANDOM init of preset {config.model.preset!r}")
          + ", not from a Safe-SFT checkpoint", flush=True)
  return policy.load_policy(config, init, mesh, rules, data_dir=data_dir)
