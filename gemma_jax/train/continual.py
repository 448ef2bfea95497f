"""Continual pretraining: where a run starts, and EWC to keep what it knew.

Start (`checkpoint.init_from`): a native, Hugging Face or official Flax
checkpoint, or a gemma_jax run directory (its latest checkpoint), restored
straight into the params' shardings: no random init, no second copy. The
optimizer state is fresh, so the learning rate re-warms and re-decays from
step 0; `checkpoint.init_optimizer` keeps a run's AdamW moments (and Adam's
own step count) while the schedule still restarts.

EWC (`continual:`): the step's loss gains

    penalty = ewc_lambda / 2 * sum_i F_i (theta_i - anchor_i)^2

F (a `gemma-jax fisher` output, normalised as continual.fisher_normalization
says) and the anchor (default: checkpoint.init_from) live in the train
step's frozen inputs, program.frozen["ewc"] = {"fisher", "anchor"}, sharded
exactly like the params, never donated, float32 or bfloat16. Without a
Fisher, F = 1 (L2-SP). Checkpoints record them by path and fingerprint, and
a resume refuses a changed Fisher or anchor.
"""

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_jax.checkpoint import fisher as fisher_store
from gemma_jax.checkpoint import formats, layout
from gemma_jax.checkpoint.fingerprint import fingerprint
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.train import state as state_lib

KEY = "ewc"


# The penalty.
def penalty(params, ewc: dict, ewc_lambda: float):
  """ewc_lambda / 2 * sum F (params - anchor)^2, float32; F = 1 when `ewc`
  has no "fisher" (L2-SP)."""
  def term(p, a, f=None):
    d = jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))
    return jnp.sum(d if f is None else f.astype(jnp.float32) * d)
  trees = [params, ewc["anchor"]] + ([ewc["fisher"]] if "fisher" in ewc
                                     else [])
  return 0.5 * ewc_lambda * sum(jax.tree.leaves(jax.tree.map(term, *trees)))


def penalty_fn(ewc_lambda: float):
  """A TrainProgram penalty_fn: (params, frozen) -> (penalty, {"ewc": ..})."""
  def fn(params, frozen):
    value = penalty(params, frozen[KEY], ewc_lambda)
    return value, {KEY: value}
  return fn


def install(program) -> None:
  """Sets the EWC penalty and the abstract F and anchor (program.frozen
  ["ewc"], ShapeDtypeStructs) when continual.ewc_lambda > 0, so that the
  step lowers and compiles (also ahead of time) before they are loaded by
  `initial_state` or `resume`."""
  c = program.cfg.continual
  if not c.enabled:
    return
  program.penalty_fn = penalty_fn(c.ewc_lambda)
  program.train_only_frozen.add(KEY)   # evaluation never needs F or anchor
  dtype = jnp.dtype(c.dtype)
  like = lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
  params = program.abstract_state.params
  program.frozen[KEY] = {"anchor": jax.tree.map(like, params)}
  if c.fisher:
    program.frozen[KEY]["fisher"] = jax.tree.map(like, params)


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
  return formats.load(path, program.cfg.model, fmt=fmt, dtype=dtype,
                      shardings=program.param_shardings)


def _latest_run_step(path):
  from gemma_jax.train.checkpointing import Checkpointer
  from gemma_jax.train.config import CheckpointConfig
  ckpt = Checkpointer(str(epath.Path(path) / "checkpoints"),
                      CheckpointConfig(async_save=False))
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
  want, found = (layout.param_shapes(program.cfg.model),
                 layout.param_shapes(stored))
  for p, shape in want.items():
    if found.get(p) != shape:
      raise CheckpointError(f"{path} trained another model: parameter {p} "
                            f"is {found.get(p)} there and {shape} here")


def _run_params(path, program, dtype):
  """Params only, from a run's latest checkpoint (orbax partial restore)."""
  ckpt, step, saved = _latest_run_step(path)
  ckpt.close()
  _check_run_model(path, saved, program)
  state_dir = epath.Path(path).absolute() / "checkpoints" / str(step) / "state"
  item = {"params": program.abstract_state.params}
  args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(
      sharding=s.sharding, global_shape=s.shape, dtype=dtype), item)
  with ocp.PyTreeCheckpointer() as c:
    return c.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))["params"]


def restart_schedule(opt_state):
  """The optimizer state with its learning-rate schedule back at step 0;
  the moments and Adam's bias-correction count are kept."""
  def reset(s):
    if isinstance(s, optax.InjectStatefulHyperparamsState):
      return s._replace(count=jnp.zeros_like(s.count),
                        hyperparams_states=jax.tree.map(
                            jnp.zeros_like, s.hyperparams_states))
    return s
  return jax.tree.map(reset, opt_state, is_leaf=lambda s: isinstance(
      s, optax.InjectStatefulHyperparamsState))


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
        step=jnp.zeros((), jnp.int32), params=state.params,
        opt_state=restart_schedule(state.opt_state), rng=key,
        nonfinite_in_row=jnp.zeros((), jnp.int32))
  replicated = NamedSharding(program.mesh, P())
  return jax.jit(restart, in_shardings=(program.state_shardings, replicated),
                 out_shardings=program.state_shardings,
                 donate_argnums=0)(restored, key)


# Fisher and anchor on the devices.
def _replicated_jit(program, fn):
  return jax.jit(fn, out_shardings=NamedSharding(program.mesh, P()))


def check_fisher_values(program, fisher, source: str) -> None:
  """CheckpointError naming the first leaf with NaN, inf or negative
  entries (counted on the devices)."""
  def counts(tree):   # float32: an int32 count may overflow at 27B
    count = lambda b: jnp.sum(b, dtype=jnp.float32)
    return {p: (count(jnp.isnan(x)), count(jnp.isinf(x)), count(x < 0))
            for p, x in layout.flatten(tree)}
  found = jax.device_get(_replicated_jit(program, counts)(fisher))
  for p in layout.param_shapes(program.cfg.model):
    nan, inf, neg = (int(v) for v in found[p])
    if nan or inf or neg:
      raise CheckpointError(
          f"{source}: parameter {p} has {nan} NaN, {inf} infinite and {neg} "
          f"negative Fisher entries; a Fisher is finite and >= 0, so it is "
          f"refused (estimate it again with gemma-jax fisher)")


def prepare_fisher(program, fisher, source: str):
  """Checked, normalised (continual.fisher_normalization) and cast F, in
  the params' shardings; `fisher` (float32) is consumed."""
  c = program.cfg.continual
  check_fisher_values(program, fisher, source)
  if c.fisher_normalization == "mean":
    scale = _replicated_jit(program, lambda t: sum(
        jnp.sum(x) for x in jax.tree.leaves(t)) / sum(
            x.size for x in jax.tree.leaves(t)))(fisher)
  elif c.fisher_normalization == "max":
    scale = _replicated_jit(program, lambda t: jnp.max(jnp.stack(
        [jnp.max(x) for x in jax.tree.leaves(t)])))(fisher)
  else:
    scale = jnp.float32(1.0)
  if float(scale) <= 0:
    raise CheckpointError(f"{source}: every Fisher entry is 0, so it cannot "
                          f"be normalised by its {c.fisher_normalization}")
  dtype = jnp.dtype(c.dtype)
  return jax.jit(lambda t, s: jax.tree.map(lambda x: (x / s).astype(dtype), t),
                 out_shardings=program.param_shardings,
                 donate_argnums=0)(fisher, scale)


def _anchor_path(cfg) -> tuple[str, str]:
  c = cfg.continual
  if c.anchor:
    return c.anchor, c.anchor_format
  return cfg.checkpoint.init_from, cfg.checkpoint.init_format


def describe(cfg) -> dict:
  """What the EWC term holds on to, as checkpoints record it ({} when EWC
  is off): paths, fingerprints and how F is used."""
  c = cfg.continual
  if not c.enabled:
    return {}
  path, fmt = _anchor_path(cfg)
  out = {"anchor": {"path": str(path), "format": fmt,
                    "fingerprint": fingerprint_of(path, "continual.anchor")},
         "dtype": c.dtype, "fisher": None}
  if c.fisher:
    out["fisher"] = {
        "path": str(c.fisher),
        "fingerprint": fingerprint_of(c.fisher, "continual.fisher"),
        "normalization": c.fisher_normalization}
  return out


def fingerprint_of(path, key: str = "checkpoint") -> str:
  """The fingerprint (gemma_jax.checkpoint.fingerprint) of a checkpoint
  directory; of a run directory, that of its latest checkpoint."""
  if not epath.Path(path).exists():
    raise ConfigError(f"{key}: {path} does not exist")
  if is_run_dir(path):   # what a run holds is its latest checkpoint
    latest = max((int(p.name) for p in (epath.Path(path) / "checkpoints"
                                        ).iterdir() if p.name.isdigit()),
                 default=None)
    if latest is not None:
      return fingerprint(epath.Path(path) / "checkpoints" / str(latest))
  return fingerprint(path)


def check_resume(saved: dict | None, current: dict, step: int) -> None:
  """ConfigError, saying what changed, if the Fisher or anchor differ from
  those the checkpoint at `step` was trained with. (ewc_lambda may change;
  EWC may be switched on or off.)"""
  if not saved or not current:
    return
  for part in ("fisher", "anchor"):
    old, new = saved.get(part), current.get(part)
    if old == new:
      continue
    if old is None or new is None:
      raise ConfigError(
          f"continual.{part}: the run was trained up to step {step} "
          f"{'with' if old else 'without'} a {part} and is now configured "
          f"{'with' if new else 'without'} one; restore the config or use a "
          f"fresh --workdir")
    for key in ("fingerprint", "normalization"):
      if key in old and old.get(key) != new.get(key):
        raise ConfigError(
            f"continual.{part}: {key} changed since the checkpoint at step "
            f"{step} ({old['path']}: {old[key]} -> {new['path']}: "
            f"{new[key]}); restore the {part} it was trained with or use a "
            f"fresh --workdir")
  if saved.get("dtype") != current.get("dtype"):
    raise ConfigError(f"continual.dtype changed since the checkpoint at step "
                      f"{step} ({saved.get('dtype')} -> "
                      f"{current.get('dtype')}); restore it")


def load_ewc(program, initial_params=None) -> None:
  """Fills program.frozen["ewc"] with F and the anchor. When the anchor is
  checkpoint.init_from and `initial_params` (just loaded from there) are
  given, the anchor is a device copy of them instead of a second read."""
  cfg = program.cfg
  c = cfg.continual
  if not c.enabled:
    return
  dtype = jnp.dtype(c.dtype)
  path, fmt = _anchor_path(cfg)
  if initial_params is not None and path == cfg.checkpoint.init_from:
    anchor = jax.jit(lambda t: jax.tree.map(
        lambda x: jnp.copy(x).astype(dtype), t),
                     out_shardings=program.param_shardings)(initial_params)
  else:
    anchor = load_params(path, fmt, program, dtype)
  ewc = {"anchor": anchor}
  if c.fisher:
    raw = fisher_store.load(c.fisher, cfg.model, program.param_shardings)
    ewc["fisher"] = prepare_fisher(program, raw, f"continual.fisher {c.fisher}")
  program.frozen[KEY] = ewc


# Entry points for the trainer.
def initial_state(program):
  """(step-0 TrainState, EWC description) of a fresh run: random params, or
  checkpoint.init_from restored into the param shardings; F and the anchor
  loaded."""
  cfg = program.cfg
  ewc = describe(cfg)   # fails on a missing Fisher or anchor, before loading
  ck = cfg.checkpoint
  if not ck.init_from:
    load_ewc(program)
    return program.init_state(), ewc
  if ck.init_optimizer:
    if not is_run_dir(ck.init_from):
      raise ConfigError(f"checkpoint.init_optimizer: {ck.init_from} is not a "
                        f"gemma_jax run directory (no checkpoints/)")
    state = _continued_state(program, ck.init_from)
    load_ewc(program, state.params)
    return state, ewc
  params = load_params(ck.init_from, ck.init_format, program)
  load_ewc(program, params)
  return program.init_state(params=params), ewc


def resume(program, saved_meta: dict, step: int) -> dict:
  """The EWC description of a resumed run, after refusing a changed Fisher
  or anchor; F and the anchor loaded."""
  ewc = describe(program.cfg)
  check_resume(saved_meta.get("continual"), ewc, step)
  load_ewc(program)
  return ewc

