"""Thin absl entry points: `python -m launch.<name> --config=configs/<file>.py ...`.

Exit codes shared by every entry point (docs/errors.md lists the messages):
  0    the requested work is done;
  1    an error, printed as one line `error: ...` on stderr naming the file, field or flag
       (a bad flag or config field, a missing path, a damaged or incompatible
       checkpoint, data that do not follow the schema, a work directory held by
       another run, a full disk, a read-only work directory); a traceback only
       for what the code did not expect (a bug: please report it);
  143  (128 + SIGTERM) a training run was preempted: it wrote a checkpoint and the
       same command resumes it.
Each entry point ends with `launch.run(main)` instead of `app.run(main)`.
"""
import contextlib
import functools
import re
import sys

from absl import app, flags, logging

from safecrs_jax import config as config_lib
from safecrs_jax.infra import errors, provenance, run_lock
from safecrs_jax.saferec import data as saferec_data
from safecrs_jax.train import checkpoint

PREEMPTED = 143
CLEAR_ERRORS = (checkpoint.CheckpointError, provenance.ProvenanceError, run_lock.LockError,
                saferec_data.SafeRecDataError, config_lib.ConfigError)
_PATH_FLAGS = ("workdir", "out")   # where a failed write most likely went


def quiet_logs():
  """orbax logs every save / restore at INFO: show warnings only, unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def fail(message):
  """Exit status 1 with `error: <message>` as the only line on stderr."""
  sys.exit(f"error: {errors.one_line(message)}")


@contextlib.contextmanager
def clear_errors():
  """The expected errors as one line on stderr and exit status 1 (no traceback)."""
  try:
    yield
  except CLEAR_ERRORS as e:
    fail(str(e))


def typed_config(config_dict, **changes):
  """The --config ConfigDict (or a Config) as the typed, checked config; `changes`:
  {dotted field: value} set on it. An unknown or mistyped field: one line `error: ...`,
  exit status 1."""
  with clear_errors():
    config = config_lib.resolve(config_dict)
    for key, value in changes.items():
      config = config_lib.override(config, key, value)
  return config


def _path_hint():
  for name in _PATH_FLAGS:
    if name in flags.FLAGS and flags.FLAGS[name].value:
      return flags.FLAGS[name].value
  return None


def _config_override_message(error, argv):
  """A misspelled --config.<path>=... override as "unknown config field <path>; ..."."""
  text = str(error)
  m = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if not name.startswith("config.") or "." not in name[len("config."):] + ".":
      continue
    path = name[len("config."):]
    if m and path.rsplit(".", 1)[-1] == m.group(2):
      head = path.rsplit(".", 1)[0] + "." if "." in path else ""
      return f"unknown config field {path}; did you mean {head}{m.group(1)}?"
    key = re.fullmatch(r"""\W*'?\\?'?(\w+)\\?'?'?\W*""", text.split("\n")[0])
    if key and path.rsplit(".", 1)[-1] == key.group(1):
      return f"unknown config field {path} (in {arg})"
  return None


def _parse_flags(argv):
  """absl's flag parsing, a bad flag / config file / override as one line."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - everything here is the command line's fault
    message = _config_override_message(e, argv)
    if message is None:
      message = _without_traceback(str(e)) if isinstance(e, flags.Error) else (
          errors.describe(e) or f"{type(e).__name__}: {e}")
    fail(message)
  for name in list(flags.FLAGS):      # a config file that failed to load fails here, not later
    value = flags.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":   # config_flags keeps the load error for later
      fail(_config_file_message(name, argv, object.__getattribute__(value, "_error")))
  return rest


def _without_traceback(text):
  """A flag error whose text embeds a traceback (a config file that raised): its first
  line and the exception line."""
  if "Traceback (most recent call last)" not in text:
    return text
  lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
  return f"{lines[0].rstrip(':')}: {lines[-1]}"


def _config_file_message(name, argv, error):
  given = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
  chain = [error]
  while chain[-1].__cause__ is not None and len(chain) < 16:
    chain.append(chain[-1].__cause__)
  if any("No such file" in str(e) for e in chain):
    return f"--{name}: config file {given.split(':', 1)[0] if given else ''} not found"
  root = chain[-1]
  return f"--{name}={given}: cannot load the config: {type(root).__name__}: {root}"


def run(main):
  """app.run(main) with every known error (infra/errors.py) as one `error:` line, exit 1."""
  @functools.wraps(main)
  def guarded(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(str(e))
    except Exception as e:  # noqa: BLE001 - known errors become one line; others re-raised
      message = errors.describe(e, _path_hint())
      if message is None:
        raise
      fail(message)
  app.run(guarded, flags_parser=_parse_flags)
