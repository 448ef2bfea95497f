"""The training loop: one program for a laptop and every host of a TPU pod.

    trainer = Trainer(run_config, workdir)
    trainer.run()     # trains to train.steps, or stops cleanly on SIGTERM

The loop only runs the compiled step; logging, evaluation, checkpointing,
the params export and the samples are hooks called every N steps or at the
end (`add_hook`). Batches are a pure function of the step (the data
pipeline's contract), the RNG lives in the state, and the step is
deterministic, so resuming from a checkpoint at step s replays steps s+1..
exactly as an uninterrupted run would.
"""

import collections
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax

from gemma_jax import fileio, hardware
from gemma_jax.data import build_pipeline
from gemma_jax.errors import ConfigError, TrainingStopped
from gemma_jax.train import checkpointing, continual, evaluation, flops
from gemma_jax.train import config as config_lib
from gemma_jax.train import metrics as metrics_lib
from gemma_jax.train.program import TrainProgram


@dataclasses.dataclass
class Hook:
  """Calls `fn(trainer, step)` after every `every` steps (0: never) and,
  when `at_end`, once more after the last step if not just called."""
  fn: Callable[["Trainer", int], None]
  every: int
  at_end: bool = True
  last_step: int = -1


def check_workdir(workdir: str) -> None:
  """Fails early, with the path, if the workdir cannot hold a run."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir}: cannot create it ({e.strerror});"
                      f" choose a writable directory") from None
  if not os.access(workdir, os.R_OK | os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir} is not readable and writable by "
                      f"this user; choose another directory or fix its "
                      f"permissions")


def check_same_model(saved: dict, cfg, step: int) -> None:
  """ConfigError, saying what to change, if a checkpoint holds another
  model. (The data stream's checks are the pipeline's `check_resume`.)"""
  saved_model = saved.get("config", {}).get("model", {})
  current = config_lib.to_dict(cfg)["model"]
  if saved_model != current:
    diff = sorted(k for k in current if saved_model.get(k) != current[k])
    raise ConfigError(
        f"the checkpoint at step {step} was trained with a different model "
        f"(fields that differ: {', '.join(diff) or 'all'}); restore the "
        f"model section it was saved with, or use a fresh --workdir")


class Trainer:
  """Builds everything from a RunConfig and runs the loop with hooks."""

  def __init__(self, cfg, workdir: str, log: Callable[[str], None] = print,
               mesh: jax.sharding.Mesh | None = None):
    self.cfg = cfg
    self.workdir = os.path.abspath(workdir)
    self.is_main = jax.process_index() == 0
    self._print = log if self.is_main else (lambda *_: None)
    self.hooks: list[Hook] = []
    self.stop_requested = False
    self.skipped_total = 0
    self._pending = []          # device metrics since the last log

    # 1. Inputs that can be wrong are checked before anything heavy.
    check_workdir(self.workdir)
    self.program = TrainProgram(cfg, mesh)
    self.pipe = build_pipeline(
        cfg.data, global_batch=cfg.train.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        vocab_size=cfg.model.vocab_size)
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(self.workdir, "checkpoints"), cfg.checkpoint)
    self._install_sigterm_handler()
    try:
      self._setup()
    except BaseException:
      self.checkpointer.close()
      self._restore_signal_handlers()
      raise

  def _setup(self):
    cfg = self.cfg
    # 2. State: restored onto this mesh, or created sharded on the devices.
    self.restored_step = self.checkpointer.latest_step()
    if self.restored_step is not None:
      saved = self.checkpointer.restore_meta(self.restored_step)
      check_same_model(saved, cfg, self.restored_step)
      self.pipe.check_resume(saved.get("data", {}), self.restored_step)
      # EWC: refuses a changed Fisher or anchor, then loads them.
      self.continual = continual.resume(self.program, saved,
                                        self.restored_step)
      restored = self.checkpointer.restore(self.program.abstract_state,
                                           self.restored_step)
      self.state = restored.state
      self.skipped_total = restored.meta.get("skipped_total", 0)
      self._print(f"resumed from {self.checkpointer.directory}/"
                  f"{self.restored_step}")
    else:
      # Random, or checkpoint.init_from straight into the sharded layout;
      # the EWC Fisher and anchor (gemma_jax.train.continual).
      self.state, self.continual = continual.initial_state(self.program)
    self.start_step = int(jax.device_get(self.state.step))
    self._streak = int(jax.device_get(self.state.nonfinite_in_row))
    if self.start_step > cfg.train.steps:
      raise ConfigError(
          f"the checkpoint is at step {self.start_step}, past train.steps="
          f"{cfg.train.steps}; raise --steps to continue training")

    # 3. One compile, ahead of time: the loop calls the compiled executable,
    # which cannot retrace or recompile.
    t0 = time.perf_counter()
    self.train_step = self.program.compile_train_step()
    self.compile_seconds = time.perf_counter() - t0
    self._print(f"compiled the train step in {self.compile_seconds:.1f}s")

    # 4. Writers (process 0 only) and the default hooks.
    self.writer = metrics_lib.MetricsWriter(self.workdir, self.is_main)
    self.writer.truncate_after(self.start_step)
    self.progress = metrics_lib.ProgressLine(cfg.train.steps, self.is_main)
    self.peak_flops = hardware.peak_flops_per_device(
        jax.devices()[0], cfg.train.peak_flops_per_device)
    self.flops_per_token = flops.model_flops_per_token(cfg.model,
                                                       cfg.data.seq_len)
    if self.is_main:
      # The resolved config; `gemma-jax train DIR/config.yaml` reruns it.
      fileio.atomic_write(os.path.join(self.workdir, "config.yaml"),
                          config_lib.to_yaml(cfg))
    self.add_hook(Trainer.log_metrics, cfg.train.log_every)
    self.add_hook(Trainer.run_eval, cfg.train.eval_every or cfg.train.steps)
    self.add_hook(Trainer.save_checkpoint, cfg.checkpoint.save_every)
    if cfg.checkpoint.export_params:
      self.add_hook(Trainer.export_params, 0)
    if cfg.train.sample_prompts:
      self.add_hook(Trainer.print_samples, 0)

  def add_hook(self, fn: Callable[["Trainer", int], None], every: int,
               at_end: bool = True) -> None:
    self.hooks.append(Hook(fn, every, at_end))

  # The loop.
  def run(self) -> dict:
    """Trains from the restored step to train.steps (or until SIGTERM)."""
    total = self.cfg.train.steps
    self._watch = metrics_lib.Stopwatch()
    step = self.start_step
    batches = self._device_batches(self.start_step, total)
    try:
      for step_index, batch in batches:
        self.state, step_metrics = self.train_step(self.state, batch)
        self._pending.append(step_metrics)
        step = step_index + 1
        self._run_hooks(step, final=False)
        if self._preempted(step):
          self._print(f"stopping at step {step} on SIGTERM (saved; rerun the "
                      f"same command to resume)")
          self._run_hooks(step, final=True, only=(Trainer.log_metrics,
                                                  Trainer.save_checkpoint))
          break
      else:
        if step > self.start_step or step == total:
          self._run_hooks(step, final=True)
    finally:
      batches.close()
      self.checkpointer.close()
      self.writer.close()
      self._restore_signal_handlers()
    return {"step": step, "preempted": self.stop_requested,
            "skipped_total": self.skipped_total}

  def _run_hooks(self, step: int, final: bool, only=None) -> None:
    for hook in self.hooks:
      if only is not None and hook.fn not in only:
        continue
      due = hook.every > 0 and step % hook.every == 0
      if (due or (final and hook.at_end)) and hook.last_step != step:
        hook.last_step = step
        hook.fn(self, step)

  def _device_batches(self, start: int, end: int) -> Iterator:
    """(step, batch on devices), `train.prefetch` batches ahead."""
    queue = collections.deque()
    if start >= end:
      return
    for step, batch in self.pipe.iterate(start):
      queue.append((step, self.program.put(batch)))
      if len(queue) > self.cfg.train.prefetch:
        yield queue.popleft()
      if step + 1 >= end:
        break
    while queue:
      yield queue.popleft()

  # Preemption: SIGTERM (or a first Ctrl-C) finishes the step, saves and
  # exits 0; a second Ctrl-C interrupts at once.
  def _install_sigterm_handler(self):
    def handler(signum, frame):
      del frame
      self.stop_requested = True
      if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signals = [signal.SIGINT]
    if jax.process_count() == 1:
      # With several processes jax.distributed's preemption notifier owns
      # SIGTERM and `_preempted` asks it, so that all stop at one step.
      signals.append(signal.SIGTERM)
    self._old_handlers = {s: signal.signal(s, handler) for s in signals}

  def _restore_signal_handlers(self):
    for s, old in self._old_handlers.items():
      signal.signal(s, old)
    self._old_handlers = {}

  def _preempted(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      # Every process reaches the same answer at the same step.
      self.stop_requested = multihost_utils.reached_preemption_sync_point(
          step)
    return self.stop_requested

  # Default hooks.
  def log_metrics(self, step: int) -> None:
    """One host sync: writes the mean metrics of the steps since the last
    log, and stops if too many steps in a row were non-finite."""
    if not self._pending:
      return
    values = jax.device_get(self._pending)
    self._pending = []
    dt = self._watch.lap()
    n = len(values)
    record = metrics_lib.train_record(
        step, values, dt, self.pipe.source_names,
        tokens_per_step=self.cfg.train.batch_size * self.cfg.data.seq_len,
        flops_per_token=self.flops_per_token,
        num_devices=jax.device_count(), peak=self.peak_flops)
    self.skipped_total += record["skipped"]
    record["skipped_total"] = self.skipped_total
    record["elapsed_s"] = self._watch.elapsed()
    self.writer.write(record)
    self.progress.update(step, record["loss"], record["tokens_per_sec"],
                         n / dt if dt > 0 else 0.0)
    # The longest streak of skipped (non-finite) steps in this interval.
    longest = 0
    for v in values:
      self._streak = self._streak + 1 if v["skipped"] else 0
      longest = max(longest, self._streak)
    limit = self.cfg.train.max_nonfinite_in_row
    if limit and longest >= limit:
      raise TrainingStopped(
          f"{longest} steps in a row up to step {step} had a non-finite loss "
          f"or gradient; their updates were skipped and the last checkpoint "
          f"({self.checkpointer.latest_step()}) is the last good state. Lower "
          f"optimizer.learning_rate, add warmup or clip gradients "
          f"(optimizer.grad_clip_norm), then rerun to resume.")

  def run_eval(self, step: int) -> None:
    if not self.cfg.train.eval_batches:
      return
    results = evaluation.evaluate(self.program, self.state.params, self.pipe,
                                  self.cfg.train.eval_batches)
    self.writer.write(evaluation.eval_record(step, results), name="eval")
    text = ", ".join(f"{k} {v['loss']:.3f} (ppl {v['perplexity']:.1f})"
                     for k, v in results.items())
    self._print(f"eval step {step}: {text}")

  def save_checkpoint(self, step: int) -> None:
    """Saves (asynchronously); never a state from a non-finite streak, and
    not again the step just restored (its state is unchanged)."""
    if step == self.restored_step:
      return
    limit = self.cfg.train.max_nonfinite_in_row
    if limit:
      in_row = int(jax.device_get(self.state.nonfinite_in_row))
      if in_row >= limit:
        return
    meta = {"config": config_lib.to_dict(self.cfg),
            "data": self.pipe.describe(),
            "continual": self.continual,
            "skipped_total": self.skipped_total}
    self.checkpointer.save(step, self.state, meta)

  def export_params(self, step: int) -> None:
    """The final params in gemma_jax's native format, WORKDIR/params."""
    from gemma_jax.checkpoint import native
    path = os.path.join(self.workdir, "params")
    native.save(path, self.state.params, self.cfg.model, force=True)
    self._print(f"params exported to {path} (step {step})")

  def print_samples(self, step: int) -> None:
    """Greedy continuations of train.sample_prompts with the final params."""
    from gemma_jax.model import sampler
    cfg = self.cfg
    tok = self.pipe.tokenizer
    prompts = [tok.encode(p, add_bos=True).tolist()
               for p in cfg.train.sample_prompts]
    with self.program.mesh:
      outs = sampler.generate(self.state.params, cfg.model, prompts,
                              cfg.train.sample_tokens)
    for text, out in zip(cfg.train.sample_prompts, outs):
      self._print(f"sample: {text!r} -> {tok.decode(out)!r}")
