"""Training checkpoints: orbax CheckpointManager over (state, meta).

Each checkpoint directory `DIR/checkpoints/<step>/` holds two items:

  state  the TrainState pytree (params, optimizer state, step, RNG, the
         non-finite counter), saved sharded by every process;
  meta   JSON: the resolved run config, the data pipeline's `describe()`
         (its sources, stages and tokenizer fingerprint) and the step.

The data position needs no state of its own: batches are a pure function of
the step. Orbax writes each step into a temporary directory and renames it
when every process has finished, so a process killed in the middle of a save
leaves the previous checkpoint intact; older steps are deleted only after a
newer one is complete.
"""

import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp

from gemma_jax.errors import CheckpointError
from gemma_jax.train.config import CheckpointConfig

FORMAT_VERSION = 2   # 2: the learning rate is an injected hyperparameter


@dataclasses.dataclass(frozen=True)
class Restored:
  state: Any
  meta: dict


class Checkpointer:
  """Saves and restores training state under `directory`.

  Saves are asynchronous when `cfg.async_save`: `save` returns once the
  arrays are copied off the devices and training continues while orbax
  writes them. Call `close()` (or `wait()`) before exiting.
  """

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(directory)
    # When to save is the trainer's (a hook every checkpoint.save_every
    # steps, and at the end or on SIGTERM); every save is forced past
    # orbax's own interval check.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save,
        create=True,
        # Leftover `*.orbax-checkpoint-tmp-*` directories of a killed save.
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving `state` at `step`; a step saved before is an error
    (never silently kept or overwritten)."""
    if step in self._manager.all_steps():
      raise CheckpointError(f"checkpoint {self.directory}/{step} already "
                            "exists; not overwriting it")
    meta = {"format_version": FORMAT_VERSION, "step": step, **meta}
    self._manager.save(
        step, force=True,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)))

  def restore_meta(self, step: int | None = None) -> dict:
    step = self._step_or_latest(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def restore(self, abstract_state, step: int | None = None) -> Restored:
    """Restores onto the shardings of `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings
    (`TrainProgram.abstract_state`), so a checkpoint saved on one mesh
    restores onto another.
    """
    step = self._step_or_latest(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} does not match the configured "
          f"model/optimizer state ({type(e).__name__}: {str(e)[:300]}); use "
          f"the config it was trained with, or a fresh --workdir") from None
    return Restored(state=restored.state, meta=restored.meta)

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def _step_or_latest(self, step):
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    return step

