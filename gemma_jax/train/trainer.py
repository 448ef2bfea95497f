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
from gemma_jax.checkpoint import preflight
from gemma_jax.data import build_pipeline
from gemma_jax.errors import ConfigError, TrainingStopped
from gemma_jax.model.config import EXECUTION_FIELDS
from gemma_jax.train import (
  checkpointing,
  continual,
  distillation,
  evaluation,
  flops,
  health,
  lease,
  lora,
)
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
  """Fails early, with the path, if the workdir cannot hold a run (on
  gs://: within seconds if Cloud Storage cannot be reached)."""
  if not fileio.is_local(workdir):
    fileio.check_remote(workdir, "--workdir")
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(
      f"--workdir {workdir}: cannot create it ({e.strerror});"
      f" choose a writable directory"
    ) from None
  if not os.access(workdir, os.R_OK | os.W_OK | os.X_OK):
    raise ConfigError(
      f"--workdir {workdir} is not readable and writable by "
      f"this user; choose another directory or fix its "
      f"permissions"
    )


def check_same_model(saved: dict, cfg, step: int) -> None:
  """ConfigError, saying what to change, if a checkpoint holds another
  model. (The data stream's checks are the pipeline's `check_resume`.)"""
  saved_model = saved.get("config", {}).get("model", {})
  current = config_lib.to_dict(cfg)["model"]
  diff = sorted(
    k
    for k in current
    if k not in EXECUTION_FIELDS and saved_model.get(k) != current[k]
  )
  if diff:
    raise ConfigError(
      f"the checkpoint at step {step} was trained with a different model "
      f"(fields that differ: {', '.join(diff) or 'all'}); restore the "
      f"model section it was saved with, or use a fresh --workdir"
    )


def check_init_from(cfg) -> None:
  """ConfigError unless a native checkpoint.init_from holds the configured
  model's parameter shapes.

  Compared on the stored config, before anything is read or compiled:
  params of another size would fail much later, with an unrelated error.
  (Other formats are checked tensor by tensor as they are read.)
  """
  from gemma_jax.checkpoint import formats, layout, native, quantized

  path, fmt = cfg.checkpoint.init_from, cfg.checkpoint.init_format
  if quantized.is_quantized(path):  # a QLoRA base: checked as it loads
    return
  if fmt == "run" or (fmt == "auto" and continual.is_run_dir(path)):
    return
  if (formats.detect(path) if fmt == "auto" else fmt) != "native":
    return
  stored = native.load_config(path)
  if layout.param_shapes(cfg.model) == layout.param_shapes(stored):
    return
  diff = [
    f"{k} {getattr(stored, k)!r} there, {getattr(cfg.model, k)!r} here"
    for k in layout.SHAPE_FIELDS
    if getattr(stored, k) != getattr(cfg.model, k)
  ]
  if diff:
    raise ConfigError(
      f"checkpoint.init_from: {path} holds another model ({diff[0]}); set "
      f"the model section to the one it was saved with"
    )


def _has_checkpoints(workdir: str) -> bool:
  fileio.check_remote(workdir, "--workdir")
  path = epath.Path(workdir) / "checkpoints"
  return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


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
    preflight.check_run_inputs(cfg, not _has_checkpoints(self.workdir))
    self.program = TrainProgram(cfg, mesh)
    self.pipe = build_pipeline(
      cfg.data,
      global_batch=cfg.train.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      vocab_size=cfg.model.vocab_size,
    )
    if cfg.checkpoint.init_from and not _has_checkpoints(self.workdir):
      check_init_from(cfg)
    check_workdir(self.workdir)
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
      self.close()
      raise

  def _setup(self):
    cfg = self.cfg
    # distill: the teacher loaded, or its dump checked and read per batch.
    distillation.attach(self.program, self.pipe, cfg.train.steps)
    # 2. State: restored onto this mesh, or created sharded on the devices.
    # LoRA: the frozen base first (the state holds only the adapters).
    self.lora_base = (
      lora.install_base(
        self.program, cfg.checkpoint.init_from, cfg.checkpoint.init_format
      )
      if cfg.model.lora is not None
      else None
    )
    if self.from_step is not None:
      self._discard_checkpoints_after(self.from_step)
    self.restored_step, restored = self._restore_newest_intact()
    if restored is not None:
      self._check_resumable(self.restored_step)
      # EWC: refuses a changed Fisher or anchor, then loads them.
      self.continual = continual.resume(
        self.program, restored.meta, self.restored_step
      )
      self.state = restored.state
      self.skipped_total = restored.meta.get("skipped_total", 0)
      self._print(
        f"resumed from {self.checkpointer.directory}/{self.restored_step}"
      )
    else:
      # Random, or checkpoint.init_from straight into the sharded layout;
      # the EWC Fisher and anchor (gemma_jax.train.continual).
      self.state, self.continual = continual.initial_state(self.program)
      if not health.params_finite(self.state.params):
        raise ConfigError(
          f"checkpoint.init_from: "
          f"{cfg.checkpoint.init_from} holds non-finite "
          f"params (NaN or inf); start from another export"
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
    ][-health.RECENT_LOGS :]
    self.progress = metrics_lib.ProgressLine(cfg.train.steps, self.is_main)
    self.peak_flops = hardware.peak_flops_per_device(
      jax.devices()[0], cfg.train.peak_flops_per_device
    )
    self.flops_per_token = flops.model_flops_per_token(
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
    except Exception as e:
      if distributed.is_peer_failure(e):
        # No JAX teardown, no final save: its barriers wait for the lost
        # process. The last complete checkpoint is where a rerun resumes.
        distributed.stop_for_lost_peer(
          distributed.lost_message(
            "another process",
            f"after step {step}: " + " ".join(str(e).split())[:160],
          )
        )
      raise
    finally:
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
      -health.RECENT_LOGS :
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
        f"{self._newest_good_advice()}"
      )

  def run_eval(self, step: int) -> None:
    if not self.cfg.train.eval_batches:
      return
    results = evaluation.evaluate(
      self.program, self.state.params, self.pipe, self.cfg.train.eval_batches
    )
    record = evaluation.eval_record(step, results)
    text = ", ".join(
      f"{k} {v['loss']:.3f} (ppl {v['perplexity']:.1f})"
      for k, v in results.items()
    )
    if self.state.ema is not None:
      ema = evaluation.evaluate(
        self.program,
        self.program.ema_params(self.state),
        self.pipe,
        self.cfg.train.eval_batches,
      )
      record |= {
        k.replace("eval/", "eval_ema/", 1): v
        for k, v in evaluation.eval_record(step, ema).items()
        if k != "step"
      }
      text += "; EMA: " + ", ".join(
        f"{k} {v['loss']:.3f}" for k, v in ema.items()
      )
    self.writer.write(record, name="eval")
    self._print(f"eval step {step}: {text}")

  def save_checkpoint(self, step: int) -> None:
    """Saves (asynchronously), with the evidence of whether the state is
    good (gemma_jax/train/health.py). Never a state with non-finite params
    or whose last step was skipped, and not again the step just restored
    (its state is unchanged)."""
    if step == self.restored_step:
      return
    in_row = int(jax.device_get(self.state.nonfinite_in_row))
    finite = health.params_finite(self.state.params)
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
    good = health.judge(
      finite,
      in_row,
      self._probe_loss(step),
      self._recent_losses,
      self.cfg.model.vocab_size,
    )
    meta = {
      "config": config_lib.to_dict(self.cfg),
      "data": self.pipe.describe(),
      "continual": self.continual,
      "skipped_total": self.skipped_total,
      "good": good,
    }
    if self.lora_base is not None:
      meta["lora_base"] = self.lora_base
    self._check_lease("checkpoint", force=True, everywhere=True)
    # Every record up to this step is stored before the checkpoint is (on
    # gs:// metrics are flushed, not appended: see metrics.MetricsWriter).
    self.writer.flush()
    self.checkpointer.save(step, self.state, meta)
    self._last_saved = (step, good)
    if not good["good"]:
      self._warn(f"checkpoint {step} is not good: {health.why_not(good)}")

  def export_params(self, step: int) -> None:
    """The final params in gemma_jax's native format, WORKDIR/params, and
    their EMA (in the params' dtype) to WORKDIR/params_ema; never
    non-finite ones."""
    path = os.path.join(self.workdir, "params")
    if not health.params_finite(self.state.params):
      self._warn(
        f"not exporting the params of step {step} to {path}: they "
        f"are not finite"
      )
      return
    self._check_lease("params export", force=True, everywhere=True)
    self._export(self.state.params, "", step)
    saved = self._last_saved
    if saved is not None and saved[0] == step and not saved[1]["good"]:
      self._warn(
        f"the exported params (step {step}) are not good: "
        f"{health.why_not(saved[1])}"
      )
    if self.state.ema is not None:
      ema = self.program.ema_params(self.state)
      if not health.params_finite(ema):
        self._warn(f"not exporting the EMA at step {step}: it is not finite")
        return
      self._export(ema, "_ema", step)

  def _export(self, params, suffix: str, step: int) -> None:
    """WORKDIR/params<suffix>; with LoRA also WORKDIR/adapter<suffix>
    (`params` are the adapters then, merged into the base)."""
    from gemma_jax.checkpoint import native

    what = "EMA of the params" if suffix else "params"
    if self.lora_base is not None:
      adapter, path = lora.export(
        self.program, params, self.workdir, self.lora_base, suffix
      )
      self._print(
        f"adapter{' EMA' if suffix else ''} saved to {adapter}, "
        f"merged {what} exported to {path} (step {step})"
      )
      return
    path = os.path.join(self.workdir, "params" + suffix)
    native.save(path, params, self.cfg.model, force=True)
    self._print(
      f"{what} exported to {path}"
      if suffix
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
    params = self.state.params
    if self.lora_base is not None:
      params = lora.full_params(self.program, params)
    with self.program.mesh:
      outs = sampler.generate(
        params, cfg.model, prompts, cfg.train.sample_tokens
      )
    for text, out in zip(cfg.train.sample_prompts, outs):
      self._print(f"sample: {text!r} -> {tok.decode(out)!r}")

  # Reliability: the workdir lease, damaged checkpoints, --from-step,
  # warnings (see gemma_jax/train/lease.py and health.py).
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

  def close(self) -> None:
    """Waits for saves, closes the writers, gives the workdir back (once;
    later calls do nothing)."""
    if getattr(self, "_closed", False):
      return
    self._closed = True
    try:
      # Absent when __init__ failed before creating it.
      checkpointer = getattr(self, "checkpointer", None)
      if checkpointer is not None:
        checkpointer.close()
      if getattr(self, "writer", None) is not None:
        self.writer.close()
    finally:
      self._restore_signal_handlers()
      if getattr(self, "_forget_lease_hook", None) is not None:
        self._forget_lease_hook()
      if self.lease is not None:
        self.lease.release()
        self.lease = None

  def _restore_newest_intact(self):
    """(step, Restored) of the newest intact checkpoint, or (None, None);
    a damaged one is moved to WORKDIR/checkpoints.damaged/<step> with a
    warning naming the file, and the one before it is used."""

    def check_meta(saved, step):
      check_same_model(saved, self.cfg, step)
      if self.lora_base is not None:  # adapters trained on another base
        lora.check_base(saved.get("lora_base"), self.lora_base, step)
      self.pipe.check_resume(saved.get("data", {}), step)

    damaged_dir = (
      os.path.join(self.workdir, checkpointing.DAMAGED_DIR)
      if self.is_main
      else None
    )
    return checkpointing.restore_newest_intact(
      self.checkpointer,
      self.program.abstract_state,
      check_meta,
      damaged_dir,
      self._warn,
    )

  def _check_resumable(self, step: int) -> None:
    """Refuses to continue from a checkpoint recorded as not good, unless
    --from-step names it."""
    if self.checkpointer.is_good(step) or self.from_step == step:
      return
    why = health.why_not(self.checkpointer.good(step) or {})
    raise TrainingStopped(
      f"the latest checkpoint ({step}) is not good ({why}); "
      f"{self._newest_good_advice(resume_word='resume')} (or "
      f"--from-step {step} to continue from it anyway)"
    )

  def _newest_good_advice(self, resume_word: str = "rerun") -> str:
    self.checkpointer.wait()
    good = self.checkpointer.newest_good_step()
    fix = (
      "lower optimizer.learning_rate, add warmup or clip gradients "
      "(optimizer.grad_clip_norm)"
    )
    if good is None:
      return (
        f"no checkpoint is good: {fix}, then {resume_word} with "
        f"--from-step 0 to start over (checkpoints are moved to "
        f"WORKDIR/{checkpointing.DISCARDED_DIR}, not deleted)"
      )
    return (
      f"the newest good checkpoint is step {good}: {fix}, then "
      f"{resume_word} with --from-step {good} (later checkpoints are "
      f"moved to WORKDIR/{checkpointing.DISCARDED_DIR}, not deleted)"
    )

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
    batch: a run's data may end at its last step, e.g. a distillation dump
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
