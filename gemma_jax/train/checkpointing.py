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

import jax
import orbax.checkpoint as ocp

from gemma_jax.errors import ConfigError
from gemma_jax.train.config import CheckpointConfig

FORMAT_VERSION = 1


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
    # The save interval is `should_save` below (save_every 0 means only at
    # the end or on SIGTERM, which orbax's interval cannot say); every save
    # is forced past orbax's own interval check.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        enable_async_checkpointing=cfg.async_save,
        create=True,
        # Leftover `*.orbax-checkpoint-tmp-*` directories of a killed save.
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))
    self._save_every = cfg.save_every

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._save_every > 0 and step % self._save_every == 0

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Starts saving `state` at `step`; returns whether a save started."""
    if step in self._manager.all_steps():
      return False
    if not force and not self.should_save(step):
      return False
    meta = {"format_version": FORMAT_VERSION, "step": step, **meta}
    return self._manager.save(
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
    (for example from `jax.eval_shape` of the state initialiser plus the
    state shardings of the current mesh), so a checkpoint saved on one mesh
    restores onto another.
    """
    step = self._step_or_latest(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(
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
      raise ConfigError(f"no checkpoint found in {self.directory}")
    return step


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or structs) with `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
