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
import contextlib
import dataclasses
import datetime
import os
import signal
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

import jax
from etils import epath

from gemma_jax import distributed, fileio, hardware
from gemma_jax.checkpoint import lease
from gemma_jax.data import pipeline_for
from gemma_jax.errors import ConfigError, TrainingStopped
from gemma_jax.sharding.data_shards import data_shard
from gemma_jax.train import checkpointing, start
from gemma_jax.train import config as config_lib
from gemma_jax.train import metrics as metrics_lib
from gemma_jax.train import state as state_lib
from gemma_jax.train.program import MAIN, TrainProgram, Variant


@dataclasses.dataclass
class Hook:
  """Calls `fn(trainer, step)` after every `every` steps (0: never) and,
  when `at_end`, once more after the last step if not just called."""

  fn: Callable[["Trainer", int], None]
  every: int
  at_end: bool = True
  last_step: int = -1


class Trainer:
  """Builds everything from a RunConfig and runs the loop with hooks."""

  def __init__(
    self,
    cfg,
    workdir: str,
    log: Callable[[str], None] = print,
    mesh: jax.sharding.Mesh | None = None,
    from_step: int | None = None,
  ):
    """`from_step`: resume from this checkpoint step (0: from scratch);
    later checkpoints are moved to WORKDIR/checkpoints.discarded/."""
    self.cfg = cfg
    self.workdir = fileio.absolute(workdir)
    self.is_main = jax.process_index() == 0
    self._print = log if self.is_main else (lambda *_: None)
    self.hooks: list[Hook] = []
    self.stop_requested = False
    self.skipped_total = 0
    self._pending: list[dict] = []  # device metrics since the last log
    self._recent_losses: list[float] = []  # for the divergence rule
    # (step, good record) of the newest checkpoint this run saved
    self._last_saved: tuple[int, dict] | None = None
    self.from_step = from_step

    # 1. Inputs that can be wrong are checked before anything heavy, and
    # before the workdir is touched; the workdir is ours (its lease) before
    # anything is written into it.
    fresh = not start.has_checkpoints(self.workdir)
    start.check_inputs(cfg, fresh)
    self.program = TrainProgram(cfg, mesh)
    self.pipe = pipeline_for(
      cfg, *data_shard(self.program.batch_sharding, cfg.train.batch_size)
    )
    if cfg.checkpoint.init_from and fresh:
      start.check_init_from(cfg)
    start.check_workdir(self.workdir)
    self.lease = self._take_lease()
    self._old_handlers: dict[int, Any] = {}
    try:
      checkpoints = os.path.join(self.workdir, "checkpoints")
      if self.is_main:
        fileio.check_writable_directory(checkpoints, "checkpoint directory")
      self.checkpointer = checkpointing.Checkpointer(
        checkpoints, cfg.checkpoint
      )
      self._install_sigterm_handler()
      self._setup()
    except BaseException:
      self.close(failing=True)
      raise

  def _setup(self):
    cfg = self.cfg
    # 2. State: restored onto this mesh, or created sharded on the devices
    # (gemma_jax.train.start: also every feature's inputs and checks).
    if self.from_step is not None:
      self._discard_checkpoints_after(self.from_step)
    self.state, self.restored_step, meta = start.begin(
      self.program,
      self.pipe,
      self.checkpointer,
      from_step=self.from_step,
      damaged_dir=(
        os.path.join(self.workdir, checkpointing.DAMAGED_DIR)
        if self.is_main
        else None
      ),
      warn=self._warn,
    )
    if meta is not None:
      self.skipped_total = meta.get("skipped_total", 0)
      self._print(
        f"resumed from {self.checkpointer.directory}/{self.restored_step}"
      )
    self.start_step = int(jax.device_get(self.state.step))
    self._streak = int(jax.device_get(self.state.nonfinite_in_row))
    if self.start_step > cfg.train.steps:
      raise ConfigError(
        f"the checkpoint is at step {self.start_step}, past train.steps="
        f"{cfg.train.steps}; raise --steps to continue training"
      )
    self._warn_if_nothing_to_train()

    # 3. One compile, ahead of time: the loop calls the compiled executable,
    # which cannot retrace or recompile.
    t0 = time.perf_counter()
    self.train_step = self.program.compile_train_step()
    self.compile_seconds = time.perf_counter() - t0
    self._print(f"compiled the train step in {self.compile_seconds:.1f}s")

    # 4. Writers (process 0 only) and the default hooks.
    self.writer = metrics_lib.MetricsWriter(
      self.workdir, self.is_main, guard=self._check_lease
    )
    self.writer.truncate_after(self.start_step)
    self._recent_losses = [
      r["loss"]
      for r in metrics_lib.read_jsonl(
        os.path.join(self.workdir, "metrics.jsonl")
      )
      if r.get("loss") is not None
    ][-state_lib.RECENT_LOGS :]
    self.progress = metrics_lib.ProgressLine(cfg.train.steps, self.is_main)
    self.peak_flops = hardware.peak_flops_per_device(
      jax.devices()[0], cfg.train.peak_flops_per_device
    )
    self.flops_per_token = metrics_lib.model_flops_per_token(
      cfg.model, cfg.data.seq_len
    )
    if self.is_main:
      # The resolved config; `gemma-jax train DIR/config.yaml` reruns it.
      self._check_lease("config.yaml", force=True)
      fileio.atomic_write(
        os.path.join(self.workdir, "config.yaml"), config_lib.to_yaml(cfg)
      )
    self.add_hook(Trainer.log_metrics, cfg.train.log_every)
    self.add_hook(Trainer.run_eval, cfg.train.eval_every or cfg.train.steps)
    self.add_hook(Trainer.save_checkpoint, cfg.checkpoint.save_every)
    if cfg.checkpoint.export_params:
      self.add_hook(Trainer.export_params, 0)
    if cfg.train.sample_prompts:
      self.add_hook(Trainer.print_samples, 0)
    for f in self.program.features:
      for every, fn in f.hooks(self.program):
        self.add_hook(fn, every)

  def add_hook(
    self, fn: Callable[["Trainer", int], None], every: int, at_end: bool = True
  ) -> None:
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
        self.checkpointer.check()  # a failed background save, at once
        self._run_hooks(step, final=False)
        if self._preempted(step):
          self._run_hooks(
            step,
            final=True,
            only=(Trainer.log_metrics, Trainer.save_checkpoint),
          )
          self._print(
            f"stopping at step {step} on SIGTERM ("
            + (
              "saved"
              if self._saved_step(step)
              else "not saved: its last step was skipped as non-finite"
            )
            + "; rerun the same command to resume)"
          )
          break
      else:
        if step > self.start_step or step == total:
          self._run_hooks(step, final=True)
    except BaseException as e:
      if isinstance(e, Exception) and distributed.is_peer_failure(e):
        # No JAX teardown, no final save: its barriers wait for the lost
        # process. The last complete checkpoint is where a rerun resumes.
        distributed.stop_for_lost_peer(
          distributed.lost_message(
            "another process",
            f"after step {step}: " + " ".join(str(e).split())[:160],
          )
        )
      with contextlib.suppress(Exception):  # the error in flight is reported
        batches.close()
      self.close(failing=True)
      raise
    batches.close()
    self.close()
    return {
      "step": step,
      "preempted": self.stop_requested,
      "skipped_total": self.skipped_total,
    }

  def _run_hooks(self, step: int, final: bool, only=None) -> None:
    for hook in self.hooks:
      if only is not None and hook.fn not in only:
        continue
      due = hook.every > 0 and step % hook.every == 0
      if (due or (final and hook.at_end)) and hook.last_step != step:
        hook.last_step = step
        hook.fn(self, step)

  def _device_batches(self, start: int, end: int) -> Generator:
    """(step, batch on devices), `train.prefetch` batches ahead."""
    queue: collections.deque = collections.deque()
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
      self.stop_requested = multihost_utils.reached_preemption_sync_point(step)
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
      step,
      values,
      dt,
      self.pipe.source_names,
      tokens_per_step=self.cfg.train.batch_size * self.cfg.data.seq_len,
      flops_per_token=self.flops_per_token,
      num_devices=jax.device_count(),
      peak=self.peak_flops,
    )
    self.skipped_total += record["skipped"]
    record["skipped_total"] = self.skipped_total
    self._recent_losses = [*self._recent_losses, record["loss"]][
      -state_lib.RECENT_LOGS :
    ]
    record["elapsed_s"] = self._watch.elapsed()
    self.writer.write(record)
    self.progress.update(
      step, record["loss"], record["tokens_per_sec"], n / dt if dt > 0 else 0.0
    )
    # The longest streak of skipped (non-finite) steps in this interval.
    longest = 0
    for v in values:
      self._streak = self._streak + 1 if v["skipped"] else 0
      longest = max(longest, self._streak)
    limit = self.cfg.train.max_nonfinite_in_row
    if limit and longest >= limit:
      raise TrainingStopped(
        f"{longest} steps in a row up to step {step} had a non-finite "
        f"loss, gradient or update and were skipped; "
        f"{checkpointing.newest_good_advice(self.checkpointer)}"
      )

  def run_eval(self, step: int) -> None:
    if not self.cfg.train.eval_batches:
      return
    results = metrics_lib.evaluate(
      self.program, self.state.params, self.pipe, self.cfg.train.eval_batches
    )
    record = metrics_lib.eval_record(step, results)
    text = ", ".join(
      f"{k} {v['loss']:.3f} (ppl {v['perplexity']:.1f})"
      for k, v in results.items()
    )
    for variant in self.program.variants(self.state):
      more = metrics_lib.evaluate(
        self.program, variant.params, self.pipe, self.cfg.train.eval_batches
      )
      record |= {
        k.replace("eval/", f"eval_{variant.name}/", 1): v
        for k, v in metrics_lib.eval_record(step, more).items()
        if k != "step"
      }
      text += f"; {variant.label}: " + ", ".join(
        f"{k} {v['loss']:.3f}" for k, v in more.items()
      )
    self.writer.write(record, name="eval")
    self._print(f"eval step {step}: {text}")

  def save_checkpoint(self, step: int) -> None:
    """Saves (asynchronously), with the evidence of whether the state is
    good (gemma_jax.train.state). Never a state with non-finite params
    or whose last step was skipped, and not again the step just restored
    (its state is unchanged)."""
    if step == self.restored_step:
      return
    in_row = int(jax.device_get(self.state.nonfinite_in_row))
    finite = state_lib.params_finite(self.state.params)
    if in_row or not finite:
      self._warn(
        f"not saving a checkpoint at step {step}: "
        + (
          "its params are not finite"
          if not finite
          else f"the last {in_row} steps were skipped as non-finite"
        )
      )
      return
    good = state_lib.judge(
      finite,
      in_row,
      self._probe_loss(step),
      self._recent_losses,
      self.cfg.model.vocab_size,
    )
    meta = {
      "config": config_lib.to_dict(self.cfg),
      "data": self.pipe.describe(),
      "skipped_total": self.skipped_total,
      "good": good,
    }
    for f in self.program.features:
      meta |= f.metadata()
    self._check_lease("checkpoint", force=True, everywhere=True)
    # Every record up to this step is stored before the checkpoint is (on
    # gs:// metrics are flushed, not appended: see metrics.MetricsWriter).
    self.writer.flush()
    self.checkpointer.save(step, self.state, meta)
    self._last_saved = (step, good)
    if not good["good"]:
      self._warn(f"checkpoint {step} is not good: {state_lib.why_not(good)}")

  def export_params(self, step: int) -> None:
    """The final params in gemma_jax's native format, WORKDIR/params, and
    the features' variants (gemma_jax.train.program.Variant) to
    WORKDIR/params_<name>; never non-finite ones."""
    path = os.path.join(self.workdir, "params")
    if not state_lib.params_finite(self.state.params):
      self._warn(
        f"not exporting the params of step {step} to {path}: they "
        f"are not finite"
      )
      return
    self._check_lease("params export", force=True, everywhere=True)
    self._export(Variant("", "", MAIN, self.state.params), step)
    saved = self._last_saved
    if saved is not None and saved[0] == step and not saved[1]["good"]:
      self._warn(
        f"the exported params (step {step}) are not good: "
        f"{state_lib.why_not(saved[1])}"
      )
    for variant in self.program.variants(self.state):
      if not state_lib.params_finite(variant.params):
        self._warn(
          f"not exporting the {variant.label} at step {step}: it is not finite"
        )
        continue
      self._export(variant, step)

  def _export(self, variant: Variant, step: int) -> None:
    """WORKDIR/params<suffix>, or what a feature writes instead."""
    from gemma_jax.checkpoint import native

    for f in self.program.features:
      line = f.export(self.program, variant.params, self.workdir, variant, step)
      if line is not None:
        self._print(line)
        return
    path = os.path.join(self.workdir, "params" + variant.suffix)
    native.save(path, variant.params, self.cfg.model, force=True)
    self._print(
      f"{variant.what} exported to {path}"
      if variant.suffix
      else f"params exported to {path} (step {step})"
    )

  def print_samples(self, step: int) -> None:
    """Greedy continuations of train.sample_prompts with the final params."""
    from gemma_jax.model import sampler

    cfg = self.cfg
    tok = self.pipe.tokenizer
    prompts = [
      tok.encode(p, add_bos=True).tolist() for p in cfg.train.sample_prompts
    ]
    params = self.program.full_params(self.state.params)
    with self.program.mesh:
      outs = sampler.generate(
        params, cfg.model, prompts, cfg.train.sample_tokens
      )
    for text, out in zip(cfg.train.sample_prompts, outs):
      self._print(f"sample: {text!r} -> {tok.decode(out)!r}")

  # Reliability: the workdir lease, damaged checkpoints, --from-step,
  # warnings (see gemma_jax/checkpoint/lease.py and gemma_jax/train/state.py).
  def _warn(self, message: str) -> None:
    if self.is_main:
      print(f"gemma-jax: warning: {message}", file=sys.stderr, flush=True)

  def _take_lease(self):
    """Process 0 takes the workdir's lease; every process learns whether
    it did, so that all stop together when another trainer holds it."""
    held, error = None, None
    if self.is_main:
      held = lease.WorkdirLease(self.workdir, warn=self._warn)
      try:
        held.acquire()
      except lease.WorkdirBusy as e:
        held, error = None, e
    if jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils

      ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not ok and error is None:
        raise lease.WorkdirBusy(
          f"--workdir {self.workdir} is in use by "
          f"another trainer (see process 0)"
        )
    if error is not None:
      raise error
    if held is not None:
      # A lost peer ends this process (gemma_jax/distributed.py): give the
      # workdir back first, so that the restarted run need not wait for
      # the lease to go stale.
      self._forget_lease_hook = distributed.on_peer_lost(held.release)
    return held

  def _check_lease(
    self, what: str, force: bool = False, everywhere: bool = False
  ) -> None:
    """LeaseLost before a write if another trainer took the workdir over;
    `everywhere`: every process stops (a collective; call it on all)."""
    lost = None
    if self.lease is not None:
      try:
        self.lease.check(what, force=force)
      except lease.LeaseLost as e:
        lost = e
    if everywhere and jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils

      ok = multihost_utils.broadcast_one_to_all(np.int32(lost is None))
      if not ok and lost is None:
        raise lease.LeaseLost(
          f"not writing the {what}: process 0 lost the lease on {self.workdir}"
        )
    if lost is not None:
      raise lost

  def close(self, failing: bool = False) -> None:
    """Waits for saves, closes the writers, gives the workdir back (once;
    later calls do nothing). Each part runs even when one before it fails.

    `failing`: closing after an error, which is the one reported. Only a
    background save that failed unreported is raised over it: it began
    first and it is what loses work. The writers' errors are not (a full
    disk fails the metrics' flush after it failed the save)."""
    if getattr(self, "_closed", False):
      return
    self._closed = True
    errors = []
    try:
      # Absent when __init__ failed before creating them.
      for part in ("checkpointer", "writer"):
        if getattr(self, part, None) is not None:
          try:
            getattr(self, part).close()
          except Exception as e:
            if part == "checkpointer" or not failing:
              errors.append(e)
      if errors:
        raise errors[0]
    finally:
      self._restore_signal_handlers()
      if getattr(self, "_forget_lease_hook", None) is not None:
        self._forget_lease_hook()
      if self.lease is not None:
        self.lease.release()
        self.lease = None

  def _discard_checkpoints_after(self, step: int) -> None:
    """--from-step: moves checkpoints after `step` (all for 0) and copies
    of the metrics to WORKDIR/checkpoints.discarded/<time>/."""
    steps = self.checkpointer.all_steps()
    if step < 0 or (step and step not in steps):
      raise ConfigError(
        f"--from-step {step}: no checkpoint at that step in "
        f"{self.checkpointer.directory} (steps: "
        f"{', '.join(map(str, steps)) or 'none'}; 0 starts over)"
      )
    later = [s for s in steps if s > step]
    if not later or not self.is_main:
      return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = os.path.join(self.workdir, checkpointing.DISCARDED_DIR, stamp)
    self._check_lease("discarded checkpoints", force=True)
    for s in later:
      self.checkpointer.set_aside(s, folder)
    for name in ("metrics.jsonl", "eval.jsonl"):
      path = os.path.join(self.workdir, name)
      if epath.Path(path).exists():
        fileio.copy_file(path, os.path.join(folder, name))
    self._print(
      f"--from-step {step}: moved checkpoints "
      f"{', '.join(map(str, later))} to {folder}"
    )

  def _probe_loss(self, step: int) -> float | None:
    """Loss of the current params on the last batch they trained on: the
    evidence that the state being saved is not diverging. (Not the next
    batch: a run's data may end at its last step, e.g. extra batch arrays
    written for exactly `train.steps` batches.)"""
    sums = jax.device_get(
      self.program.eval_step(
        self.state.params, self.program.put(self.pipe.batch(max(step - 1, 0)))
      )
    )
    tokens = float(sums["tokens"])
    return float(sums["loss_sum"]) / tokens if tokens else None

  def _saved_step(self, step: int) -> bool:
    """Whether a checkpoint of `step` exists or is being written."""
    return step == self.restored_step or (
      self._last_saved is not None and self._last_saved[0] == step
    )

  def _warn_if_nothing_to_train(self) -> None:
    cfg = self.cfg
    if cfg.train.steps == 0:
      self._warn(
        "train.steps is 0: nothing is trained; the initial params "
        "are saved and exported unchanged"
      )
    elif self.start_step == cfg.train.steps:
      self._warn(
        f"the checkpoint is already at train.steps={cfg.train.steps}"
        f": nothing to train; raise --steps to continue"
      )
    if cfg.optimizer.learning_rate == 0:
      self._warn("optimizer.learning_rate is 0: the params will not change")
