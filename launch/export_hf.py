r"""Exports a Safe-SFT / Safe-GDPO checkpoint as a Hugging Face model directory.

  python -m launch.export_hf --checkpoint=runs/demo_sft --out=runs/demo_sft_hf
  python -m launch.export_hf --checkpoint=runs/qwen_sft/checkpoints/3000 --out=/models/safecrs-qwen \
      --dtype=bfloat16

--checkpoint is a run directory (latest step), its checkpoints/ dir or one step
dir. LoRA adapters are merged into the weights; the run's tokenizer is copied.
"""
from absl import app, flags, logging

from safecrs_jax import policy, sharding

_CKPT = flags.DEFINE_string("checkpoint", None, "run dir, checkpoints/ dir or step dir")
_OUT = flags.DEFINE_string("out", None, "output HF directory (config.json, safetensors, tokenizer)")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "storage dtype of the exported weights (default: as trained)")
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  sharding.maybe_initialize_distributed()
  out = policy.export_hf(_CKPT.value, _OUT.value, dtype=_DTYPE.value)
  if sharding.is_main_process():
    print(f"exported {_CKPT.value} -> {out}")


if __name__ == "__main__":
  app.run(main)
