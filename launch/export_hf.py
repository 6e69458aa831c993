r"""Exports a Safe-SFT / Safe-GDPO checkpoint as a Hugging Face model directory.

  python -m launch.export_hf --checkpoint=runs/demo_sft --out=runs/demo_sft_hf
  python -m launch.export_hf --checkpoint=runs/qwen_sft/checkpoints/3000 --out=/models/safecrs-qwen \
      --dtype=bfloat16

--checkpoint is a run directory (latest step), its checkpoints/ dir or one step
dir. LoRA adapters are merged into the weights; the run's tokenizer is copied;
generation_config.json names the stop tokens (EOS and the end-of-turn token).
The weights are written in the dtype the run trained in (its model.dtype:
bfloat16 for the paper configs, float32 for the demo) unless --dtype says
otherwise. Serve the directory with `vllm serve <out> --dtype auto`.
The step's checksums are verified first; a damaged step (even the latest of a
run dir) is an error naming it, never replaced by an older one.
"""
import os

from absl import app, flags

import launch
from safecrs_jax.infra import sharding
from safecrs_jax.train import checkpoint, policy

_CKPT = flags.DEFINE_string("checkpoint", None, "run dir, checkpoints/ dir or step dir")
_OUT = flags.DEFINE_string("out", None, "output HF directory (config.json, safetensors, tokenizer)")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "dtype of the exported weights (default: the run's model.dtype)")
_ACCEPT = flags.DEFINE_bool("accept_unverified", False,
                            "Accept a step without checksums.json (its files cannot be "
                            "verified): record its checksums as they are now, with a warning.")
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  launch.quiet_logs()
  sharding.maybe_initialize_distributed()
  with launch.clear_errors():
    step_dir = checkpoint.find_step_dir(_CKPT.value)
    out = policy.export_hf(step_dir, _OUT.value, dtype=_DTYPE.value,
                           accept_unverified=_ACCEPT.value)
  if sharding.is_main_process():
    print(f"exported step {os.path.basename(step_dir)} ({step_dir}) -> {out}")


if __name__ == "__main__":
  launch.run(main)
