"""The training loop: one program for a laptop and every host of a TPU pod.

    trainer = Trainer(run_config, workdir)
    trainer.run()     # trains to train.steps, or stops cleanly on SIGTERM

The loop only runs the compiled step; logging, evaluation and checkpointing
are hooks called every N steps (`add_hook`). Batches are a pure function of
the step (the data pipeline's contract), the RNG lives in the state, and the
step is deterministic, so resuming from a checkpoint at step s replays steps
s+1.. exactly as an uninterrupted run would.
"""

import collections
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import yaml

from gemma_jax import config as config_lib
from gemma_jax.errors import ConfigError, TrainingStopped
from gemma_jax.train import checkpointing, evaluation
from gemma_jax.train import metrics as metrics_lib
from gemma_jax.train import build as build_lib


@dataclasses.dataclass
class Hook:
  """Calls `fn(trainer, step)` after every `every` steps (0: never) and,
  when `at_end`, once more after the last step if not just called."""
  fn: Callable[["Trainer", int], None]
  every: int
  at_end: bool = True
  last_step: int = -1


def initialize_distributed() -> None:
  """Starts jax.distributed when this is one of several processes.

  Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (any
  machine, CPU included: collectives over gloo). Otherwise a multi-host
  cluster that JAX detects itself (Cloud TPU pod slices, SLURM, Open MPI);
  GEMMA_JAX_DISTRIBUTED=1 asks for that detection where no variable shows it
  (one process per Cloud TPU VM host, as launch/tpu_pod.sh starts them).
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    num = int(env["JAX_NUM_PROCESSES"])
    if num > 1:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num,
                                 int(env.get("JAX_PROCESS_ID", "0")))
    return
  multi_host = (
      env.get("GEMMA_JAX_DISTRIBUTED") == "1"   # set by launch/tpu_pod.sh
      or "," in env.get("TPU_WORKER_HOSTNAMES", "")
      or env.get("MEGASCALE_COORDINATOR_ADDRESS")
      or int(env.get("SLURM_NTASKS", "1")) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if multi_host:
    jax.distributed.initialize()


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


def check_resume_compatible(saved: dict, cfg, describe: dict, step: int,
                            check_data: Callable) -> None:
  """ConfigError, saying what to change, if a checkpoint cannot continue."""
  saved_cfg = saved.get("config", {})
  current = config_lib.to_dict(cfg)
  if saved_cfg.get("model") != current["model"]:
    diff = sorted(k for k in current["model"]
                  if saved_cfg.get("model", {}).get(k) != current["model"][k])
    raise ConfigError(
        f"the checkpoint at step {step} was trained with a different model "
        f"(fields that differ: {', '.join(diff) or 'all'}); restore the "
        f"model section it was saved with, or use a fresh --workdir")
  for key in ("batch_size",):
    old, new = saved_cfg.get("train", {}).get(key), current["train"][key]
    if old is not None and old != new:
      raise ConfigError(
          f"train.{key} changed from {old} to {new} since the checkpoint at "
          f"step {step}: the data position depends on it; set "
          f"train.{key}={old} or use a fresh --workdir")
  check_data(saved.get("data", {}), describe, step)


class Trainer:
  """Builds everything from a RunConfig and runs the loop with hooks."""

  def __init__(self, cfg, workdir: str, log: Callable[[str], None] = print):
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
    self.parts = build_lib.build(cfg)           # mesh, data, step functions
    self.pipe = self.parts.pipe
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
    latest = self.checkpointer.latest_step()
    if latest is not None:
      saved = self.checkpointer.restore_meta(latest)
      check_resume_compatible(saved, cfg, self.pipe.describe(), latest,
                              self.parts.check_data_resume)

    # 2. State: restored onto this mesh, or created sharded on the devices.
    if latest is not None:
      restored = self.checkpointer.restore(self.parts.abstract_state(),
                                           latest)
      self.state = restored.state
      self.skipped_total = restored.meta.get("skipped_total", 0)
      self._print(f"resumed from {self.checkpointer.directory}/{latest}")
    else:
      self.state = self.parts.init_state()
    self.start_step = int(jax.device_get(self.state.step))
    self._streak = int(jax.device_get(self.state.nonfinite_in_row))
    if self.start_step > cfg.train.steps:
      raise ConfigError(
          f"the checkpoint is at step {self.start_step}, past train.steps="
          f"{cfg.train.steps}; raise --steps to continue training")

    # 3. One compile, ahead of time: the loop calls the compiled executable,
    # which cannot retrace or recompile.
    t0 = time.perf_counter()
    example = self.parts.put(self.pipe.batch(self.start_step))
    self.train_step = self.parts.compile_train_step(self.state, example)
    self.compile_seconds = time.perf_counter() - t0
    self._print(f"compiled the train step in {self.compile_seconds:.1f}s")

    # 4. Writers (process 0 only) and the default hooks.
    self.writer = metrics_lib.MetricsWriter(self.workdir, self.is_main)
    self.writer.truncate_after(self.start_step)
    self.progress = metrics_lib.ProgressLine(cfg.train.steps, self.is_main)
    self.peak_flops = metrics_lib.peak_flops_per_device(
        configured=cfg.train.peak_flops_per_device)
    if self.is_main:
      # The resolved config; `gemma-jax train DIR/config.yaml` reruns it.
      with open(os.path.join(self.workdir, "config.yaml"), "w") as f:
        yaml.safe_dump(config_lib.to_dict(cfg), f, sort_keys=False)
    self.add_hook(Trainer.log_metrics, cfg.train.log_every)
    self.add_hook(Trainer.run_eval, cfg.train.eval_every or cfg.train.steps)
    self.add_hook(Trainer.save_checkpoint, cfg.checkpoint.save_every)

  def add_hook(self, fn: Callable[["Trainer", int], None], every: int,
               at_end: bool = True) -> None:
    self.hooks.append(Hook(fn, every, at_end))

  # The loop.
  def run(self) -> dict:
    """Trains from the restored step to train.steps (or until SIGTERM)."""
    total = self.cfg.train.steps
    self._watch = metrics_lib.Stopwatch()
    self._last_log_step = self.start_step
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
      queue.append((step, self.parts.put(batch)))
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
        step, values, dt, self.parts.source_names,
        tokens_per_step=self.parts.tokens_per_step,
        flops_per_token=self.parts.flops_per_token,
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
    results = evaluation.evaluate(self.parts.eval_step, self.state.params,
                                  self.pipe, self.cfg.train.eval_batches,
                                  self.parts.put)
    self.writer.write(evaluation.eval_record(step, results), name="eval")
    text = ", ".join(f"{k} {v['loss']:.3f} (ppl {v['perplexity']:.1f})"
                     for k, v in results.items())
    self._print(f"eval step {step}: {text}")

  def save_checkpoint(self, step: int) -> None:
    """Saves (asynchronously); never a state from a non-finite streak."""
    limit = self.cfg.train.max_nonfinite_in_row
    if limit:
      in_row = int(jax.device_get(self.state.nonfinite_in_row))
      if in_row >= limit:
        return
    meta = {"config": config_lib.to_dict(self.cfg),
            "data": self.pipe.describe(),
            "skipped_total": self.skipped_total}
    self.checkpointer.save(step, self.state, meta, force=True)
