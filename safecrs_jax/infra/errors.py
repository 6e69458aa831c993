"""Known errors as one line: what every entry point prints instead of a traceback.

`describe(error, path_hint)` is the line (without the `error: ` prefix) for an
error the user can act on, or None for anything else (a bug: let its traceback
show). Known are:
  - every exception class this project defines (modules `safecrs_jax.*`,
    `configs.*`, `launch.*`): they are raised with a message written for the
    user (a damaged checkpoint, a row off the schema, an unknown config field);
  - a missing file or directory (FileNotFoundError, NotADirectoryError);
  - a full disk or a read-only / unwritable work directory, found anywhere in the
    chain of causes (orbax wraps the OSError of a failed write several times, or
    keeps only its text): "no space left on device writing <path>".
"""
import errno
import re

_PROJECT_MODULES = ("safecrs_jax.", "configs.", "launch.")
_NO_SPACE = re.compile(r"No space left on device|\[Errno 28\]|ENOSPC|RESOURCE_EXHAUSTED: .*space")
_READ_ONLY = re.compile(r"Read-only file system|\[Errno 30\]")
_FILENAME = re.compile(r"""(?:\[Errno \d+\] [^:'"]*: |path |file )['"]?(/[^'"\s,;)]+)""")


def _chain(error, limit=64):
  """The error, its causes / contexts and the members of exception groups (each once)."""
  seen, todo = [], [error]
  while todo and len(seen) < limit:
    e = todo.pop(0)
    if e is None or any(e is s for s in seen):
      continue
    seen.append(e)
    todo += [e.__cause__, e.__context__] + list(getattr(e, "exceptions", None) or ())
  return seen


def _os_error(chain, number, pattern):
  """(found, path) for an OSError with errno `number` in the chain, or its text."""
  for e in chain:
    if isinstance(e, OSError) and e.errno == number:
      return True, e.filename
  for e in chain:
    text = str(e)
    if pattern.search(text):
      m = _FILENAME.search(text)
      return True, m.group(1) if m else None
  return False, None


def one_line(text):
  """A message on one line (its lines joined with '; ')."""
  lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
  return "; ".join(lines)


def describe(error, path_hint=None):
  """The one-line message of a known error (module docstring), else None."""
  chain = _chain(error)
  found, path = _os_error(chain, errno.ENOSPC, _NO_SPACE)
  if found:
    return f"no space left on device writing {path or path_hint or 'the output'}"
  found, path = _os_error(chain, errno.EROFS, _READ_ONLY)
  if found:
    return f"cannot write {path or path_hint or 'the output'}: read-only file system"
  if isinstance(error, PermissionError) or (
      isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM)):
    return f"cannot access {error.filename or path_hint}: permission denied"
  if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
    if error.filename and error.strerror:
      return f"{error.strerror.lower()}: {error.filename}"
    return one_line(error)
  if type(error).__module__.startswith(_PROJECT_MODULES):
    return one_line(error) or type(error).__name__
  return None
