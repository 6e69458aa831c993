"""safecrs_jax: SafeCRS (Safe-SFT + Safe-GDPO) on SafeRec, in JAX/Flax.

Submodules are imported lazily so that `import safecrs_jax.saferec` does not
pull in the model stack (and the other way round).
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "models", "sharding", "tokens", "saferec", "optim", "checkpoint", "sft",
    "rollout", "gdpo", "evaluation", "metrics_log", "lora", "assets", "train_state", "demo",
)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
