"""What both training stages share: the run's skeleton and the step timer.

    class Run(stage.Stage):              # sft.Run, gdpo.Run
      name = "sft"
      def __init__(self, config, workdir):
        super().__init__(config, workdir)     # workdir, mesh, data dir
        ...                                   # data, model_cfg, tokenizer, tx, mix
        data = self.restore(abstract, self.stage_fingerprint(init, ...), init_fn)
      def start(self, books): ...             # banner, hooks(step, state)
      def step(self, state, step): ...        # the train_loop.run_loop protocol
      def log(self, step, outs): ...
      def data_position(self, step): ...

    summary = Run(config, workdir).run()       # loops to total_steps (or stop_at)

A Stage keeps `summary` (built by the subclass; `run` adds final_step,
preempted and itself) and `notify` (console notices: print, the progress bar's
writer while looping).
"""
import time

import jax

from safecrs_jax import models
from safecrs_jax.data import assets
from safecrs_jax.infra import chips, provenance, storage
from safecrs_jax.infra import sharding as shd
from safecrs_jax.train import loop
from safecrs_jax.train import state as ts


class StepTimer:
  """Wall-clock laps over loop steps, and the model FLOPs utilisation they reach."""

  def __init__(self):
    self.restart()

  def restart(self):
    """Starts timing anew (and after work that must not count, e.g. validation)."""
    self.start = self.mark = time.perf_counter()

  def lap(self):
    """Seconds since the previous lap (or the restart)."""
    now = time.perf_counter()
    seconds, self.mark = now - self.mark, now
    return seconds

  def total(self):
    """Seconds from the restart to the last lap."""
    return self.mark - self.start

  @staticmethod
  def mfu(model_flops, seconds):
    """{"perf/mfu": utilisation} on a chip of known peak (chips.mfu), else {}."""
    util = chips.mfu(model_flops, seconds)
    return {} if util is None else {"perf/mfu": util}


class Stage:
  """A training stage's run: directory, mesh, restored state, the loop (module docstring).

  Subclasses set `name`, and before `restore` the model_cfg, tokenizer, tx and
  mix (None when the relational mix is off) it reads.
  """
  name = ""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, storage.resolve(workdir)
    self.notify = print
    self.mesh, self.rules = shd.mesh_from_config(config)
    self.data_dir = assets.resolve_data_dir(config)

  def stage_fingerprint(self, init, **extra):
    """train_loop.stage_fingerprint of this stage's data, tokenizer, `init` and `extra`.

    The relational mix's settings are added when the mix is on.
    """
    return loop.stage_fingerprint(
        self.config, self.name, self.model_cfg, data=provenance.data_fingerprint(self.data_dir),
        tokenizer=provenance.tokenizer_hash(self.tokenizer), init=init, **extra,
        **({"relational_mix": self.mix.settings} if self.mix else {}))

  def restore(self, abstract, fingerprint, init_fn):
    """Sets the sharded state: the latest checkpoint's, or init_fn()'s.

    abstract: the state's eval_shape; init_fn() builds it in self.state_shardings
    (set before it is called). Also sets the fingerprint, checkpointer and root
    key. Returns the checkpoint's saved data position (None when starting).
    """
    self.state_shardings = ts.shardings(abstract, models.param_logical_axes(self.model_cfg),
                                        self.mesh, self.rules)
    self.abstract_state = ts.with_shardings(abstract, self.state_shardings)
    self.fingerprint = fingerprint
    self.ckpt = loop.open_checkpointer(self.config, self.workdir)
    self.root_key = jax.random.key(int(self.config.seed))
    self.state, data = loop.restore_or_init(
        self.ckpt, self.abstract_state, fingerprint, init_fn,
        overwrite=bool(self.config.checkpoint.overwrite))
    return data

  def start(self, books):
    """Called before the first step, inside the books; returns hooks(step, state)."""
    del books
    return []

  def run(self, *, hooks=(), stop_at=None):
    """Loops from start_step to total_steps (train_loop.run_loop); returns the summary.

    hooks: hook(step, state) after every step, after the stage's own. stop_at:
    leave after this step with a checkpoint. The summary gains final_step,
    preempted and run (this Stage, holding the final state).
    """
    with loop.Books(self.workdir, self.config.log, self.total_steps, self.start_step,
                    self.name, run_config=self.config) as books:
      self.notify = books.progress.write
      hooks = list(self.start(books)) + list(hooks)
      self.state, step, preempted = loop.run_loop(
          self, self.state, self.start_step, books, log_every=self.config.log.every,
          hooks=hooks, stop_at=stop_at)
    self.notify = print
    self.summary.update(final_step=step, preempted=preempted, run=self)
    return self.summary
