r"""Safe-SFT entry point.

  python -m launch.train_sft --config=configs/demo.py --workdir=runs/demo_sft
  python -m launch.train_sft --config=configs/qwen25.py:data_dir=/data/saferec,model_dir=/ckpt/qwen \
      --workdir=gs://bucket/qwen_sft --config.sft.batch_size=8

Re-running the same command resumes from the latest checkpoint in --workdir.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from safecrs_jax import plan, sharding, sft

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<name>.py[:args] file (see configs/common.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, tokenizer")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  sharding.maybe_initialize_distributed()
  config = _CONFIG.value
  if config.stage != "sft":
    raise app.UsageError(f"--config has stage={config.stage!r}; train_sft needs stage=sft")
  plan.preflight(config)  # compile-only memory check; stops here if it cannot fit
  summary = sft.train(config, _WORKDIR.value)
  if summary["preempted"]:
    raise SystemExit(143)  # 128 + SIGTERM: the scheduler sees a preempted job


if __name__ == "__main__":
  app.run(main)
