"""Runs one stage and SIGKILLs itself at a chosen point (tests/test_faults.py).

    python tests/fault_driver.py '{"stage": "sft", "workdir": ..., "config": {...},
                                   "kill": {"at": "save", "n": 4}}'

kill.at: "save" — right after the async save of step n was started (the write
is in flight); "step" — after loop step n was dispatched, before its
checkpoint; "generate" — in evaluation, when batch n is about to be generated
(batches before it were appended). No kill: run to completion.
"""
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo as demo_config  # noqa: E402
from safecrs_jax import evaluation
from safecrs_jax.evaluation import generate as gen  # noqa: E402
from safecrs_jax.train import checkpoint, gdpo, sft  # noqa: E402


def config_of(spec):
  stage = "gdpo" if spec["stage"] == "gdpo" else "sft"
  c = demo_config.get_config(f"stage={stage},size=test,relational=off")
  c.update_from_flattened_dict(spec.get("config", {}))
  return c


def _die():
  os.kill(os.getpid(), signal.SIGKILL)


def arm(kill):
  """Wraps the function where the process is to die."""
  at, n = kill["at"], int(kill["n"])
  if at == "save":
    orig = checkpoint.Checkpointer.save
    def save(self, step, *a, **k):
      started = orig(self, step, *a, **k)
      if step == n:
        _die()
      return started
    checkpoint.Checkpointer.save = save
  elif at == "step":
    for mod in (sft, gdpo):
      orig_step = mod.Run.step
      def step(self, state, s, *a, _orig=orig_step, **k):
        out = _orig(self, state, s, *a, **k)
        if s + 1 == n:
          _die()
        return out
      mod.Run.step = step
  elif at == "generate":
    calls = [0]
    orig_gen = gen.rollout.generate
    def generate(*a, **k):
      calls[0] += 1
      if calls[0] == n:
        _die()
      return orig_gen(*a, **k)
    gen.rollout.generate = generate


def main():
  spec = json.loads(sys.argv[1])
  if spec.get("kill"):
    arm(spec["kill"])
  c = config_of(spec)
  if spec["stage"] == "sft":
    sft.train(c, spec["workdir"])
  elif spec["stage"] == "gdpo":
    gdpo.train(c, spec["workdir"])
  else:
    evaluation.evaluate(c, spec["checkpoint"], workdir=spec["workdir"], progress=False)


if __name__ == "__main__":
  main()
