"""Resolves the config sentinels to real directories, building them once.

    data.dir == "mini"        -> SafeRec-mini generated with seed data.mini_seed
    tokenizer.path == "local" -> byte-level BPE trained on that data's train split,
                                 cached under a hash of the training texts' content
    tokenizer.path == ""      -> the tokenizer next to model.hf_dir

Built assets live in a cache folder (data.cache_dir, else $SAFECRS_CACHE, else
~/.cache/safecrs_jax). Each is built into a temporary sibling folder and
renamed into place, so concurrent or crashed builds never leave half an asset:
a finished folder is complete by construction; a failed build (an exception,
or a tokenizer asked for an empty split) is never cached, and its temporary
folder is removed (on an exception or Ctrl-C at once, after a kill by the next
build on the same host). Shared by SFT,
GDPO and evaluation.
"""
import glob
import hashlib
import os
import shutil
import socket
import tempfile

from safecrs_jax import saferec
from safecrs_jax.data import tokens
from safecrs_jax.infra import run_lock, storage
from safecrs_jax.saferec import mini

# Bump when the tokenizer recipe changes so old caches are not reused. The
# SafeRec-mini key is a hash of the saferec sources (see _mini_version), so a
# changed generator never serves a stale cached dataset.
_TOKENIZER_VERSION = "v2"
MINI = "mini"
LOCAL_TOKENIZER = "local"
DEFAULT_LOCAL_VOCAB = 2048


def cache_root(config=None):
  """The cache folder for built assets."""
  explicit = config.data.cache_dir if config is not None else ""
  root = explicit or os.environ.get("SAFECRS_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "safecrs_jax")
  os.makedirs(root, exist_ok=True)
  return os.path.abspath(root)


def build_once(final_dir, build_fn):
  """Runs build_fn(tmp_dir) and renames tmp_dir to final_dir, unless it exists.

  If another process finishes first, its result is kept and ours discarded.
  """
  final_dir = os.path.abspath(final_dir)
  if os.path.isdir(final_dir):
    return final_dir
  parent = os.path.dirname(final_dir)
  os.makedirs(parent, exist_ok=True)
  _sweep_stale(final_dir)
  # The temp folder names its host and process: a build killed outright (SIGKILL, or SIGTERM
  # outside a training loop: no `finally` runs) is removed by the next build on that host.
  tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(final_dir)}.tmp-{_HOST}-{os.getpid()}-",
                         dir=parent)
  try:
    build_fn(tmp)
    try:
      os.rename(tmp, final_dir)
    except OSError:
      if not os.path.isdir(final_dir):  # not a lost race: a real failure
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return final_dir


_HOST = socket.gethostname().replace("-", "_") or "host"


def _sweep_stale(final_dir):
  """Removes temp folders of `final_dir` left by dead processes of this host."""
  prefix = f"{os.path.basename(final_dir)}.tmp-{_HOST}-"
  for path in glob.glob(os.path.join(glob.escape(os.path.dirname(final_dir)), prefix + "*")):
    pid = os.path.basename(path)[len(prefix):].split("-")[0]
    if pid.isdigit() and not run_lock.pid_alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)


def _mini_version():
  """Short hash of every saferec source file (the generator and what it imports)."""
  h = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(os.path.dirname(saferec.__file__), "*.py"))):
    with open(path, "rb") as f:
      h.update(os.path.basename(path).encode() + b"\0" + f.read())
  return h.hexdigest()[:10]


def mini_dir(seed=0, root=None):
  """SafeRec-mini (released layout) generated with `seed`, built once."""
  root = root or cache_root()
  final = os.path.join(root, f"saferec_mini_{_mini_version()}_seed{int(seed)}")
  return build_once(final, lambda tmp: mini.generate(tmp, seed=int(seed)))


def resolve_data_dir(config):
  """config.data.dir with the "mini" sentinel resolved to a built directory."""
  d = config.data.dir
  if d == MINI:
    return mini_dir(config.data.mini_seed, cache_root(config))
  if not d or not storage.isdir(d):
    raise FileNotFoundError(f"data.dir {d!r} does not exist (use 'mini' for SafeRec-mini)")
  return storage.resolve(d)


def texts_key(texts):
  """Short sha256 of the training texts (their content and order): the tokenizer cache key."""
  h = hashlib.sha256()
  for t in texts:
    h.update(t.encode("utf-8", "surrogatepass") + b"\0")
  return h.hexdigest()[:16]


def local_tokenizer_dir(rows_fn, vocab_size=DEFAULT_LOCAL_VOCAB, root=None, what="train split"):
  """The locally trained tokenizer for the texts of rows_fn(), built once per content."""
  root = root or cache_root()
  texts = list(tokens.rows_texts(rows_fn()))
  if not texts:
    raise ValueError(f"cannot train the local tokenizer: the {what} has no rows")
  final = os.path.join(root, f"tokenizer_{_TOKENIZER_VERSION}_{texts_key(texts)}"
                             f"_v{int(vocab_size)}")
  return build_once(final, lambda tmp: tokens.build_local_tokenizer(
      texts, tmp, vocab_size=int(vocab_size)))


def resolve_tokenizer_path(config, data_dir=None):
  """config.tokenizer.path with "" (model dir) and "local" (demo BPE) resolved."""
  path = config.tokenizer.path
  if path == LOCAL_TOKENIZER:
    data_dir = data_dir or resolve_data_dir(config)
    strict = config.data.strict
    return local_tokenizer_dir(
        lambda: saferec.load_split(data_dir, "train", stage="sft", strict=strict),
        config.tokenizer.local_vocab_size, cache_root(config),
        what=f"train split of {data_dir}")
  if not path:
    path = config.model.hf_dir
    if not path:
      raise ValueError("tokenizer.path is empty and model.hf_dir is not set: "
                       "nothing to load the tokenizer from")
  if not storage.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  return storage.resolve(path)
