"""One run per work directory: `<workdir>/.lock` names its holder (pid, host, time).

    with run_lock.hold(workdir):
      ...   # train or evaluate

A second run on the same directory stops with `LockError` naming the holder.
A lock whose holder is dead (same host, pid gone or reused) is taken over
with a notice; a lock held from another host is never taken over (the message
says which file to delete once that run is known to be gone). On multi-host
runs only process 0 takes the lock: it is per run, not per process.
"""
import contextlib
import json
import os
import socket
import time

import jax

from safecrs_jax.infra import storage

LOCK = ".lock"


class LockError(RuntimeError):
  """Another run holds the work directory."""


def _start_time(pid):
  """Kernel start time of process `pid` (Linux /proc), to tell a reused pid apart; or None."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def pid_alive(pid):
  """Whether process `pid` of this host exists (one of another user's counts as alive)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _alive(holder):
  pid = int(holder.get("pid", -1))
  if not pid_alive(pid):
    return False
  started = holder.get("start")
  return started is None or _start_time(pid) in (None, started)


def _me():
  return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
          "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(holder):
  return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('time')}")


def acquire(workdir):
  """Takes <workdir>/.lock (process 0 only); returns its path, or None on other processes."""
  if jax.process_index() != 0:
    return None
  storage.makedirs(workdir)
  path = os.path.join(storage.resolve(workdir), LOCK)
  if storage.is_remote(path):
    return _acquire_remote(workdir, path)
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      holder = _read(path)
      if holder is None:        # being written right now, or torn by a crash
        time.sleep(0.2)
        holder = _read(path) or {"host": socket.gethostname(), "pid": -1}
      if holder.get("host") != socket.gethostname():
        raise LockError(f"{workdir} is in use by {_describe(holder)} (lock {path}); wait for "
                        "it, or delete the lock once that run is known to be gone") from None
      if _alive(holder):
        raise LockError(f"{workdir} is in use by {_describe(holder)} (lock {path}); wait for "
                        "it to finish or use another --workdir") from None
      print(f"{workdir}: taking over the stale lock of {_describe(holder)} (not running)",
            flush=True)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_me(), f)
    except BaseException:       # e.g. a full disk: leave no empty lock behind
      with contextlib.suppress(OSError):
        os.remove(path)
      raise
    return path
  raise LockError(f"could not take the lock {path}")


def _acquire_remote(workdir, path):
  """Best-effort lock on an object store (no O_EXCL there).

  A lock object holding owner and time is written unless one exists, then read
  back: two starts within the same instant can both win. A lock left by a run on
  another host cannot be checked for liveness: it is an error until deleted.
  """
  holder = _read(path)
  if holder is not None and (holder.get("host") != socket.gethostname() or _alive(holder)):
    raise LockError(f"{workdir} is in use by {_describe(holder)} (lock {path}); wait for it, "
                    "or delete the lock once that run is known to be gone")
  me = _me()
  storage.write_atomic(path, json.dumps(me))
  if _read(path) != me:
    raise LockError(f"{workdir}: another run took the lock {path} at the same time")
  return path


def _read(path):
  try:
    with storage.open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def release(path):
  """Removes the lock if this process still holds it."""
  if path is None:
    return
  holder = _read(path)
  if holder and holder.get("pid") == os.getpid():
    with contextlib.suppress(FileNotFoundError):
      storage.remove(path)


@contextlib.contextmanager
def hold(workdir):
  """The lock of `workdir` for the duration of the block."""
  path = acquire(workdir)
  try:
    yield path
  finally:
    release(path)
