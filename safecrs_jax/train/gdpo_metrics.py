"""Safe-GDPO's host metrics of a loop step: rollouts, rewards, advantages, timings.

    info = rollout_stats(parsed, rows, oracle, rec_num)        # rollout/svr, hit, ...
    host = batch_metrics(batch, raw_adv, diag, reward_names, stop_ids)
    perf = timings(model_cfg, batch, mu, reference, (rollout_s, reward_s, learner_s), step_s)
    record = window_record(outs)       # at a logging step: window means, learner metrics

Shape letters (package legend): a rollout batch is dict of [A, B, ...] numpy
arrays (A micro-batches of B rows, P prompt tokens, T completion tokens); I
ranked items (rec_num).
"""
import jax
import numpy as np

from safecrs_jax import saferec
from safecrs_jax.infra import flops
from safecrs_jax.rl import policy_loss
from safecrs_jax.train import stage


def rollout_svr(violations, lengths):
  """[B] per-rollout violation ratio: violating items / items (0 for an empty list)."""
  v = np.asarray(violations).sum(1)
  n = np.asarray(lengths)
  return np.where(n > 0, v / np.maximum(n, 1), 0.0)


def rollout_stats(parsed, rows, oracle, rec_num):
  """Host metrics of a rollout batch: SVR, hit rate, list length, unknown and unparsed shares."""
  o_rows = oracle.rows(parsed, rec_num)                                     # [B, I]
  viol = oracle.trait_violations(o_rows, oracle.masks([r["constraints"] for r in rows])).any(-1)
  n_items = np.array([min(len(p), rec_num) for p in parsed])
  present = np.arange(rec_num)[None] < n_items[:, None]
  unknown = ((o_rows == oracle.unknown_row) & present).sum() / max(present.sum(), 1)
  hit = saferec.relevance_reward(parsed, rows, rec_num)
  return {"rollout/svr": float(rollout_svr(viol, n_items).mean()),
          "rollout/hit": float(hit.mean()),
          "rollout/num_items": float(n_items.mean()),
          "rollout/unknown": float(unknown),
          "rollout/unparsed": float((n_items == 0).mean())}


def batch_metrics(batch, raw_adv, diag, reward_names, stop_ids):
  """Advantage, completion-length and per-reward metrics of a rollout batch.

  raw_adv: the advantages ([B] or [B, I]); diag: advantages.advantage_diagnostics
  (fetched); reward_names: gdpo.rewards, in the order of diag's [R] arrays.
  """
  lengths = batch["completion_mask"].sum(-1)
  last = np.take_along_axis(batch["completion_ids"], np.maximum(lengths - 1, 0)[..., None],
                            -1)[..., 0]
  out = {"adv/mean": float(raw_adv.mean()), "adv/std": float(raw_adv.std()),
         "adv/abs_mean": float(np.abs(raw_adv).mean()),
         "adv/zero_share": float((np.abs(raw_adv) < 1e-6).mean()),
         "rollout/length": float(lengths.mean()),
         "rollout/stopped": float(np.mean(np.isin(last, stop_ids) & (lengths > 0))),
         "rollout/truncated_prompts": float(batch["truncated_prompts"])}
  for i, name in enumerate(reward_names):
    out[f"reward/{name}"] = float(diag["reward_mean"][i])
    out[f"reward/{name}_std"] = float(diag["reward_std"][i])
    out[f"adv/zero_var_{name}"] = float(diag["zero_var_groups"][i])
  out.update({f"adv/{k}": float(v) for k, v in diag.items() if k.startswith("collapse_")})
  return out


def step_flops(model_cfg, batch, mu, reference):
  """Analytic FLOPs of a loop step: rollouts, the reference forward (when on), mu updates."""
  a, b, p = batch["prompt_ids"].shape
  t = batch["completion_ids"].shape[-1]
  rows = a * b
  total = flops.generate(model_cfg, rows, p, t)
  if reference:
    total += flops.forward(model_cfg, rows, p + t, t)
  return total + mu * flops.train(model_cfg, rows, p + t, t)


def timings(model_cfg, batch, mu, reference, phases, step_s):
  """perf/mfu (on a known chip), time/* of the phases and step, rollout / learner tokens/s.

  phases: (rollout_s, reward_s, learner_s) of the step; step_s: the whole step.
  """
  rollout_s, reward_s, learner_s = phases
  gen_tokens = float(batch["completion_mask"].sum())
  return stage.StepTimer.mfu(step_flops(model_cfg, batch, mu, reference), step_s) | {
      "time/rollout_s": rollout_s, "time/reward_s": reward_s, "time/learner_s": learner_s,
      "time/step_s": step_s,
      "perf/rollout_tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
      "perf/learner_tokens_per_s": mu * float(
          batch["prompt_mask"].sum() + gen_tokens) / max(learner_s, 1e-9)}


def window_record(outs):
  """The record of a logging window: means of the host metrics and the learner's.

  outs: the steps' (host metrics, [learner metrics (device)] of the mu updates);
  fetching the learner metrics is the loop's host sync. train/<name> for
  policy_loss.LOSS_METRICS are means over every update, train/lr the last.
  """
  hosts = [h for h, _ in outs]
  keys = dict.fromkeys(k for h in hosts for k in h)
  record = {k: float(np.mean([h[k] for h in hosts if k in h])) for k in keys}
  fetched = jax.device_get([m for _, ms in outs for m in ms])
  record.update({f"train/{k}": float(np.mean([float(m[k]) for m in fetched]))
                 for k in policy_loss.LOSS_METRICS})
  record["train/lr"] = float(fetched[-1]["lr"])
  return record
