"""The start of a run: where its state comes from, in one straight path.

    state, restored_step, meta = start.begin(program, pipe, checkpointer)

0. Before it (the Trainer, before the program is built and the workdir is
   touched): `check_inputs` (every checkpoint the run will read, each
   feature's among them), `check_workdir`, and `check_init_from` when the
   run has no checkpoint yet.
1. Each feature's `prepare`: the checks and frozen inputs that need no state
   (gemma_jax.features: LoRA's base, a teacher or a dump, the EWC sources).
2. Resume (`restore`): the newest intact checkpoint, refused if it holds
   another model or data stream, if a feature refuses it, or if it is not
   good (unless --from-step names it); each feature's `resume` checks its
   metadata and loads what it needs.
3. Else a fresh state: `checkpoint.init_from` in any format (native, Hugging
   Face, official Flax, or a gemma_jax run directory: its latest checkpoint;
   with `checkpoint.init_optimizer` also its AdamW moments) restored straight
   into the params' shardings, or the random init of `train.seed`; a
   feature that takes init_from as its own input (LoRA's base) leaves the
   params random. Then each feature's `load` (EWC: the Fisher and anchor,
   the anchor a device copy of the initial params where it is init_from).

The optimizer state of a fresh run is fresh, so the learning rate re-warms
and re-decays from step 0; `checkpoint.init_optimizer` keeps a run's
moments (and Adam's own step count) while the schedule still restarts.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax import fileio
from gemma_jax.checkpoint import formats, layout, preflight
from gemma_jax.errors import CheckpointError, ConfigError, TrainingStopped
from gemma_jax.model.config import EXECUTION_FIELDS, ModelConfig
from gemma_jax.train import checkpointing
from gemma_jax.train import config as config_lib
from gemma_jax.train import program as program_lib
from gemma_jax.train import state as state_lib


def begin(
  program, pipe, checkpointer, from_step=None, damaged_dir=None, warn=None
):
  """(state, restored step or None, restored metadata or None).

  Resumes from `checkpointer`'s newest intact checkpoint (`restore`), else
  starts fresh (`initial_state`); every feature's hooks on the way.
  """
  for f in program.features:
    f.prepare(program, pipe)
  step, restored = restore(
    program, pipe, checkpointer, from_step, damaged_dir, warn
  )
  if restored is not None:
    for f in program.features:
      f.resume(program, restored.meta, step)
    return restored.state, step, restored.meta
  state = initial_state(program)
  for f in program.features:
    f.load(program, state.params)
  if not state_lib.params_finite(state.params):
    raise ConfigError(
      f"checkpoint.init_from: {program.cfg.checkpoint.init_from} holds "
      f"non-finite params (NaN or inf); start from another export"
    )
  return state, None, None


def restore(program, pipe, checkpointer, from_step, damaged_dir, warn):
  """(step, Restored) of the newest intact checkpoint, or (None, None); a
  damaged one is moved to `damaged_dir`/<step> with a warning naming the
  file, and the one before it is used. Refuses one of another model or
  data stream, one a feature refuses, and one recorded as not good unless
  --from-step (`from_step`) names it."""

  def check_meta(saved, step):
    check_same_model(saved, program.cfg, step)
    for f in program.features:
      f.check_checkpoint(saved, step)
    pipe.check_resume(saved.get("data", {}), step)

  step, restored = checkpointing.restore_newest_intact(
    checkpointer, program.abstract_state, check_meta, damaged_dir, warn
  )
  if restored is None or checkpointer.is_good(step) or from_step == step:
    return step, restored
  why = state_lib.why_not(checkpointer.good(step) or {})
  advice = checkpointing.newest_good_advice(checkpointer, resume_word="resume")
  raise TrainingStopped(
    f"the latest checkpoint ({step}) is not good ({why}); {advice} (or "
    f"--from-step {step} to continue from it anyway)"
  )


def initial_state(program):
  """The step-0 TrainState of a fresh run: random params, or
  checkpoint.init_from restored into the param shardings."""
  ck = program.cfg.checkpoint
  if not ck.init_from or any(f.uses_init_from() for f in program.features):
    return program.init_state()
  if ck.init_optimizer:
    if not is_run_dir(ck.init_from):
      raise ConfigError(
        f"checkpoint.init_optimizer: {ck.init_from} is not a "
        f"gemma_jax run directory (no checkpoints/)"
      )
    return _continued_state(program, ck.init_from)
  params = load_params(ck.init_from, ck.init_format, program)
  return program.init_state(params=params)


def check_inputs(cfg, fresh: bool) -> None:
  """Every checkpoint a run of RunConfig `cfg` reads, checked before
  anything is built or compiled (gemma_jax.checkpoint.preflight: format,
  completeness, shapes, reachable storage; one-line errors): a fresh run's
  checkpoint.init_from, then each feature's inputs (its `check_inputs`).
  `fresh`: the workdir has no checkpoint yet."""
  ck = cfg.checkpoint
  if ck.init_from and fresh:
    preflight.check_params_source(
      ck.init_from, cfg.model, ck.init_format, "checkpoint.init_from"
    )
  for feature in program_lib.feature_classes(cfg):
    feature.check_inputs(cfg, fresh)


def check_init_from(cfg) -> None:
  """ConfigError unless a native checkpoint.init_from holds the configured
  model's parameter shapes.

  Compared on the stored config, before anything is read or compiled:
  params of another size would fail much later, with an unrelated error.
  (Other formats are checked tensor by tensor as they are read; so is a
  quantized checkpoint, which only a frozen base can be.)
  """
  from gemma_jax.checkpoint import native, quantized

  path, fmt = cfg.checkpoint.init_from, cfg.checkpoint.init_format
  if quantized.is_quantized(path):
    return
  if fmt == "run" or (fmt == "auto" and is_run_dir(path)):
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
  # A field the checkpoint does not name is newer than it: the checkpoint's
  # model had the field's default (e.g. qk_norm, added for Gemma 3).
  defaults = {
    f.name: f.default
    for f in dataclasses.fields(ModelConfig)
    if f.default is not dataclasses.MISSING
  }
  diff = sorted(
    k
    for k in current
    if k not in EXECUTION_FIELDS
    and saved_model.get(k, defaults.get(k)) != current[k]
  )
  if diff:
    raise ConfigError(
      f"the checkpoint at step {step} was trained with a different model "
      f"(fields that differ: {', '.join(diff) or 'all'}); restore the "
      f"model section it was saved with, or use a fresh --workdir"
    )


def has_checkpoints(workdir: str) -> bool:
  fileio.check_remote(workdir, "--workdir")
  path = epath.Path(workdir) / "checkpoints"
  return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


# Loading params from any source.
def is_run_dir(path) -> bool:
  return (epath.Path(path) / "checkpoints").is_dir()


def load_params(path: str, fmt: str, program, dtype=None):
  """Params of the program's model from `path` (format `fmt` or "auto"),
  placed in program.param_shardings, in `dtype` (default: the model's
  param_dtype)."""
  dtype = dtype or jnp.dtype(program.cfg.model.param_dtype)
  if fmt == "run" or (fmt == "auto" and is_run_dir(path)):
    return _run_params(path, program, dtype)
  return formats.load(
    path,
    program.cfg.model,
    fmt=fmt,
    dtype=dtype,
    shardings=program.param_shardings,
  )


def _latest_run_step(path):
  from gemma_jax.train.checkpointing import Checkpointer
  from gemma_jax.train.config import CheckpointConfig

  ckpt = Checkpointer(
    str(epath.Path(path) / "checkpoints"), CheckpointConfig(async_save=False)
  )
  try:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointError(f"{path}: the run has no checkpoint yet")
    return ckpt, step, ckpt.restore_meta(step)
  except BaseException:
    ckpt.close()
    raise


def _check_run_model(path, saved: dict, program) -> None:
  from gemma_jax.train.config import model_config_from_dict

  stored = model_config_from_dict(saved.get("config", {}).get("model", {}))
  want, found = (
    layout.param_shapes(program.cfg.model),
    layout.param_shapes(stored),
  )
  for p, shape in want.items():
    if found.get(p) != shape:
      raise CheckpointError(
        f"{path} trained another model: parameter {p} "
        f"is {found.get(p)} there and {shape} here"
      )


def _run_params(path, program, dtype):
  """Params only, from a run's latest checkpoint (orbax partial restore)."""
  ckpt, step, saved = _latest_run_step(path)
  ckpt.close()
  _check_run_model(path, saved, program)
  state_dir = epath.Path(path).absolute() / "checkpoints" / str(step) / "state"
  item = {"params": program.abstract_state.params}
  args = jax.tree.map(
    lambda s: ocp.ArrayRestoreArgs(
      sharding=s.sharding, global_shape=s.shape, dtype=dtype
    ),
    item,
  )
  with ocp.PyTreeCheckpointer() as c:
    return c.restore(
      state_dir,
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True
      ),
    )["params"]


def restart_schedule(opt_state):
  """The optimizer state with its learning-rate schedule back at step 0;
  the moments and Adam's bias-correction count are kept."""

  def reset(s):
    if isinstance(s, optax.InjectStatefulHyperparamsState):
      return s._replace(
        count=jnp.zeros_like(s.count),
        hyperparams_states=jax.tree.map(jnp.zeros_like, s.hyperparams_states),
      )
    return s

  return jax.tree.map(
    reset,
    opt_state,
    is_leaf=lambda s: isinstance(s, optax.InjectStatefulHyperparamsState),
  )


def _continued_state(program, path):
  """Step 0 from a run's latest checkpoint with its optimizer moments."""
  ckpt, step, saved = _latest_run_step(path)
  try:
    _check_run_model(path, saved, program)
    restored = ckpt.restore(program.abstract_state, step).state
  finally:
    ckpt.close()
  key = jax.random.split(jax.random.PRNGKey(program.cfg.train.seed))[1]

  def restart(state, key):
    return state_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=state.params,
      opt_state=restart_schedule(state.opt_state),
      rng=key,
      nonfinite_in_row=jnp.zeros((), jnp.int32),
    )

  replicated = NamedSharding(program.mesh, P())
  return jax.jit(
    restart,
    in_shardings=(program.state_shardings, replicated),
    out_shardings=program.state_shardings,
    donate_argnums=0,
  )(restored, key)
