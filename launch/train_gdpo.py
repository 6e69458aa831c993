r"""Safe-GDPO: group-relative policy optimisation from a Safe-SFT checkpoint.

  python -m launch.train_gdpo --config=configs/demo.py:stage=gdpo --workdir=runs/gdpo \
      [--config.gdpo.init_checkpoint=runs/sft] [--config.gdpo.advantage_mode=grpo]

gdpo.init_checkpoint takes a Safe-SFT run directory, one orbax step directory
or a Hugging Face directory. Re-running the same command in the same workdir
resumes from its latest checkpoint on the same trajectory — only if that
checkpoint came from the same inputs, the init checkpoint's exact step and
content included (else an error naming what differs; --overwrite discards
it). Exit codes: 0 done, 1 error, 143 preempted (SIGTERM: a checkpoint was
written; rerun to resume).
"""
from absl import app, flags
from ml_collections import config_flags

import launch
from safecrs_jax import plan
from safecrs_jax.infra import sharding
from safecrs_jax.train import gdpo

# Before JAX's CPU backend starts: CPU rollouts run over one device per core.
sharding.expose_cpu_cores()

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file; use its gdpo stage (…:stage=gdpo).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, tb).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Discard a checkpoint in --workdir that came from other inputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = launch.typed_config(_CONFIG.value)
  if config.stage != "gdpo":
    raise app.UsageError(f"config stage is {config.stage!r}; pass …:stage=gdpo")
  launch.quiet_logs()
  sharding.maybe_initialize_distributed()
  plan.preflight(config)  # compile-only memory check; stops here if it cannot fit
  if _OVERWRITE.value:
    config = launch.typed_config(config, **{"checkpoint.overwrite": True})
  with launch.clear_errors():
    summary = gdpo.train(config, _WORKDIR.value)
  if sharding.is_main_process():
    last = summary["history"][-1] if summary["history"] else {}
    print(f"gdpo: step {summary['final_step']} in {summary['workdir']}; last rollout "
          f"SVR {last.get('rollout/svr', float('nan')):.4f}, hit {last.get('rollout/hit', float('nan')):.4f}")
  if summary["preempted"]:
    raise SystemExit(launch.PREEMPTED)  # 128 + SIGTERM: the scheduler sees a preempted job


if __name__ == "__main__":
  launch.run(main)
