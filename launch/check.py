r"""Checks a data directory and a weights directory before a run: exit 0, or 1 with one line.

  python -m launch.check --data_dir=/data/SafeCRS --model_dir=/models/Llama-3.1-8B-Instruct
  python -m launch.check --data_dir=/data/SafeCRS --splits=sft:train,sft:validation

--data_dir: the SafeRec data (the released layout, or any form the loaders take);
every row of each split in --splits is validated, and the safety oracle and
the catalog are loaded. --model_dir: a Hugging Face model directory; its
config, every tensor's name, shape and bytes (no weights are read), and its
tokenizer with a chat template. Give either or both.
"""
import sys

from absl import app, flags

import launch
from safecrs_jax.data import check

_DATA = flags.DEFINE_string("data_dir", None, "SafeRec data directory")
_MODEL = flags.DEFINE_string("model_dir", None, "Hugging Face model directory")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "tokenizer directory (default: "
                                 "--model_dir's own)")
_SPLITS = flags.DEFINE_list("splits", [f"{st}:{sp}" for st, sp in check.SPLITS],
                            "stage:split pairs of --data_dir to validate")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _DATA.value and not _MODEL.value:
    raise app.UsageError("give --data_dir, --model_dir or both")
  launch.quiet_logs()
  try:
    splits = [tuple(s.split(":", 1)) for s in _SPLITS.value]
    if any(len(s) != 2 for s in splits):
      raise check.InputError(f"--splits={','.join(_SPLITS.value)}: expected stage:split pairs")
    lines = check.check_data(_DATA.value, splits) if _DATA.value else []
    if _MODEL.value:
      lines += check.check_weights(_MODEL.value, _TOKENIZER.value)
  except check.InputError as e:
    sys.exit(f"error: {e}")
  print("\n".join(lines + ["ok"]))


if __name__ == "__main__":
  app.run(main)
