"""The interface between the training core and an optional feature.

A feature (LoRA, distillation, EWC, the EMA of the weights) is a subclass of
`Feature` that overrides the hooks it needs; every hook's default does
nothing. The core (gemma_jax.train: TrainProgram, train_step, Trainer and
the start of a run) calls the hooks of the features a run config turns on,
in the fixed order they were registered (gemma_jax/features/__init__.py),
and names none of them. One instance per TrainProgram holds what the
feature learns about the run (e.g. LoRA's base fingerprint).

The hooks, in the order a run meets them:

  building the program (TrainProgram.__init__)
    trainable(program, boxed)   which parameters the state holds and trains
    param_specs(program, specs, params)   their mesh specs
    init_params(init)           how fresh trainable params are made
    forward(program, forward)   what the model sees (a step.Forward view)
    frozen(program)             arrays the steps read but never train
    batch_keys(program)         extra batch arrays
    loss(program, loss_fn)      the objective
    penalty(program)            a term on the params added once per step
    extras(program)             per-step state beside the params (Extra)
  before the program is built (gemma_jax.train.start.check_inputs)
    check_inputs(cfg, fresh)    the files it will read, checked (a class
                                method: no instance, nothing compiled yet)
  the start of a run (gemma_jax.train.start)
    prepare(program, pipe)      checks and loads that need no state
    uses_init_from()            checkpoint.init_from is its input
    load(program, params)       after a fresh start (params: the initial)
    check_checkpoint(meta, step)  refuse a checkpoint (while restoring)
    resume(program, meta, step)   after a restore
  the run
    hooks(program)              (every, fn(trainer, step)) the loop calls
    metadata()                  what checkpoints record
    variants(program, state)    other params to evaluate and export
    export(program, params, workdir, variant, step)
    full_params(program, params)  the model's whole tree
"""

from typing import Any

from gemma_jax.train.program import MAIN, Extra, Variant

__all__ = ["MAIN", "Extra", "Feature", "Variant"]


class Feature:
  """A feature: override the hooks you need (see the module docstring)."""

  name = ""  # as RunConfig.features() names it

  def __init__(self, cfg):
    self.cfg = cfg

  @classmethod
  def enabled(cls, cfg) -> bool:
    return cls.name in cfg.features()

  # Building the program.
  def trainable(self, program, boxed):
    """The boxed abstract params the state trains (default: all)."""
    del program
    return boxed

  def param_specs(self, program, specs, params):
    del program, params
    return specs

  def init_params(self, init):
    """Wraps init(model_cfg, key) -> fresh trainable params."""
    return init

  def forward(self, program, forward):
    """A step.Forward (e.g. `forward.with_view(...)`); keeps its fused
    loss path."""
    del program
    return forward

  def frozen(self, program) -> dict[str, Any]:
    """{name: abstract arrays with shardings} the train step reads but
    never trains; the eval step gets them when `frozen_in_eval`."""
    del program
    return {}

  frozen_in_eval = False

  def batch_keys(self, program) -> dict[str, Any]:
    """{key: ShapeDtypeStruct} batch arrays beyond step.BATCH_KEYS."""
    del program
    return {}

  def loss(self, program, loss_fn):
    """The objective, from the one before (see step.lm_loss)."""
    del program
    return loss_fn

  def penalty(self, program):
    """(params, frozen) -> (penalty, {term: value}), or None."""
    del program
    return None

  def extras(self, program) -> Extra | None:
    del program
    return None

  # Before the program is built.
  @classmethod
  def check_inputs(cls, cfg, fresh: bool) -> None:
    """Checks the checkpoints this feature will read (format, completeness,
    shapes: gemma_jax.checkpoint.preflight), before anything is built or
    compiled; one-line errors. `fresh`: the run has no checkpoint yet."""
    del cfg, fresh

  # The start of a run.
  def prepare(self, program, pipe) -> None:
    """Checks and loads before the state exists (fail early)."""

  def uses_init_from(self) -> bool:
    """True if checkpoint.init_from is this feature's input rather than
    the initial params."""
    return False

  def load(self, program, params) -> None:
    """After a fresh start from `params` (on the devices)."""

  def check_checkpoint(self, meta: dict, step: int) -> None:
    """ConfigError if the checkpoint at `step` cannot continue here."""

  def resume(self, program, meta: dict, step: int) -> None:
    """After restoring the checkpoint at `step` (its metadata `meta`)."""

  # The run.
  def hooks(self, program) -> list:
    """[(every, fn(trainer, step))]: called after every `every` steps (0:
    only) and at the end, as the trainer's own hooks (Trainer.add_hook)."""
    del program
    return []

  def metadata(self) -> dict:
    """Entries for every checkpoint's metadata."""
    return {}

  def variants(self, program, state) -> list[Variant]:
    del program, state
    return []

  def export(self, program, params, workdir: str, variant: Variant, step):
    """Writes `variant` (with `params`) itself and returns the line to
    print, or None to leave it to the core (a native checkpoint)."""
    del program, params, workdir, variant, step
    return None

  def full_params(self, program, params):
    """The model's whole param tree from the trainable `params`."""
    del program
    return params
