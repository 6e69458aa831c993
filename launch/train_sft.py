r"""Safe-SFT entry point.

  python -m launch.train_sft --config=configs/demo.py --workdir=runs/demo_sft
  python -m launch.train_sft --config=configs/qwen25.py:data_dir=/data/saferec,model_dir=/ckpt/qwen \
      --workdir=gs://bucket/qwen_sft --config.sft.batch_size=8

Re-running the same command resumes from the latest checkpoint in --workdir,
provided it came from the same inputs (else an error naming what differs;
--overwrite discards it). Exit codes: 0 done, 1 error, 143 preempted (SIGTERM:
a checkpoint was written; rerun to resume). The rows curation dropped are
printed and saved in <workdir>/curation.json.
"""
from absl import app, flags
from ml_collections import config_flags

import launch
from safecrs_jax import plan
from safecrs_jax.infra import sharding
from safecrs_jax.train import sft, sft_data

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<name>.py[:args] file (see configs/common.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, tokenizer")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Discard a checkpoint in --workdir that came from other inputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.quiet_logs()
  sharding.maybe_initialize_distributed()
  config = launch.typed_config(_CONFIG.value)
  if config.stage != "sft":
    raise app.UsageError(f"--config has stage={config.stage!r}; train_sft needs stage=sft")
  plan.preflight(config)  # compile-only memory check; stops here if it cannot fit
  if _OVERWRITE.value:
    config = launch.typed_config(config, **{"checkpoint.overwrite": True})
  with launch.clear_errors():
    summary = sft.train(config, _WORKDIR.value)
  if sharding.is_main_process():
    for split, report in summary["curation"].items():
      print("\n".join(sft_data.curation_lines(report, split)))
  if summary["preempted"]:
    raise SystemExit(launch.PREEMPTED)  # 128 + SIGTERM: the scheduler sees a preempted job


if __name__ == "__main__":
  launch.run(main)
