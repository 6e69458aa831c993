"""Thin absl entry points: `python -m launch.<name> --config=configs/<file>.py ...`.

Exit codes shared by every entry point: 0 when the requested work is done;
1 on an error, printed as one line `error: ...` for the expected ones (a
damaged or incompatible checkpoint, data that do not follow the schema, a
work directory held by another run); 143 (128 + SIGTERM) when a training run
was preempted: it wrote a checkpoint and the same command resumes it.
"""
import contextlib
import sys

from absl import flags, logging

from safecrs_jax import config as config_lib
from safecrs_jax.infra import provenance, run_lock
from safecrs_jax.saferec import data as saferec_data
from safecrs_jax.train import checkpoint

PREEMPTED = 143
CLEAR_ERRORS = (checkpoint.CheckpointError, provenance.ProvenanceError, run_lock.LockError,
                saferec_data.SafeRecDataError, config_lib.ConfigError)


def quiet_logs():
  """orbax logs every save / restore at INFO: show warnings only, unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


@contextlib.contextmanager
def clear_errors():
  """The expected errors as one line on stderr and exit status 1 (no traceback)."""
  try:
    yield
  except CLEAR_ERRORS as e:
    sys.exit(f"error: {e}")


def typed_config(config_dict, **changes):
  """The --config ConfigDict (or a Config) as the typed, checked config; `changes`:
  {dotted field: value} set on it. An unknown or mistyped field: one line `error: ...`,
  exit status 1."""
  with clear_errors():
    config = config_lib.resolve(config_dict)
    for key, value in changes.items():
      config = config_lib.override(config, key, value)
  return config
