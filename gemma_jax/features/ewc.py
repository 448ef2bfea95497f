"""EWC for continual pretraining: a penalty that keeps what the model knew.

(Where a continual run starts, `checkpoint.init_from`, is the core's:
gemma_jax.train.start.)

EWC (`continual:`): the step's loss gains

    penalty = ewc_lambda / 2 * sum_i F_i (theta_i - anchor_i)^2

F (a `gemma-jax fisher` output, normalised as continual.fisher_normalization
says) and the anchor (default: checkpoint.init_from) live in the train
step's frozen inputs, program.frozen["ewc"] = {"fisher", "anchor"}, sharded
exactly like the params, never donated, float32 or bfloat16. Without a
Fisher, F = 1 (L2-SP). Checkpoints record them by path and fingerprint, and
a resume refuses a changed Fisher or anchor.

With LoRA (model.lora) the penalty applies to what is trained: the
adapters move each target weight by dW = (alpha / r) A B from the frozen
base, which is the anchor, so

    penalty = ewc_lambda / 2 * sum_targets sum F_W dW^2

with F_W the Fisher of the adapted weights (only those are kept on the
devices) and no anchor copy at all; without a Fisher it is computed from
two [r, r] Gram matrices per layer, never forming dW.
"""

import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax.checkpoint import fisher as fisher_store
from gemma_jax.checkpoint import layout, preflight
from gemma_jax.checkpoint.fingerprint import fingerprint
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.features import lora as lora_feature
from gemma_jax.features.base import Feature
from gemma_jax.model import lora as lora_lib
from gemma_jax.model import quant as quant_lib
from gemma_jax.train.start import is_run_dir, load_params

KEY = "ewc"


# The penalty.
def penalty(params, ewc: dict, ewc_lambda: float):
  """ewc_lambda / 2 * sum F (params - anchor)^2, float32; F = 1 when `ewc`
  has no "fisher" (L2-SP)."""

  def term(p, a, f=None):
    d = jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))
    return jnp.sum(d if f is None else f.astype(jnp.float32) * d)

  trees = [params, ewc["anchor"]] + ([ewc["fisher"]] if "fisher" in ewc else [])
  return 0.5 * ewc_lambda * sum(jax.tree.leaves(jax.tree.map(term, *trees)))


def penalty_fn(ewc_lambda: float):
  """A TrainProgram penalty_fn: (params, frozen) -> (penalty, {"ewc": ..})."""

  def fn(params, frozen):
    value = penalty(params, frozen[KEY], ewc_lambda)
    return value, {KEY: value}

  return fn


# The penalty of LoRA: on the weight change of the adapters.
def _adapted_weights(model_cfg) -> dict[str, list[str]]:
  """{weight path: [targets]} of the weights the adapters change."""
  out: dict[str, list[str]] = {}
  for target in model_cfg.lora.targets:
    out.setdefault(f"{lora_lib.PROJECTIONS[target].module}/w", []).append(
      target
    )
  return out


def lora_penalty(adapters, ewc: dict, ewc_lambda: float, model_cfg):
  """ewc_lambda / 2 * sum F_W dW^2 over the adapted weights, float32
  (dW = lora.delta; F = 1 when `ewc` has no "fisher")."""
  lora = model_cfg.lora
  total = jnp.float32(0.0)
  for path, targets in _adapted_weights(model_cfg).items():
    module = path.rsplit("/", 1)[0]
    node = quant_lib.get_path(adapters, module)
    for target in targets:
      a, b = node[f"lora_{target}_a"], node[f"lora_{target}_b"]
      if "fisher" not in ewc:
        total += lora_lib.delta_sq_norm(a, b, lora.scale)
        continue
      f = quant_lib.get_path(ewc["fisher"], path)
      slot = lora_lib.PROJECTIONS[target].slot
      f = f if slot is None else f[:, slot]
      d = lora_lib.delta(a, b, target, lora.scale)
      total += jnp.sum(f.astype(jnp.float32) * jnp.square(d))
  return 0.5 * ewc_lambda * total


def _lora_frozen(program, c) -> dict:
  """The abstract F of the adapted weights (no anchor: it is the base)."""
  # (gemma_jax.train.config refuses an anchor other than the base.)
  if not c.fisher:
    return {}
  flat = dict(layout.flatten(program.frozen[lora_feature.BASE]))
  dtype = jnp.dtype(c.dtype)
  return {
    "fisher": layout.unflatten(
      {
        p: jax.ShapeDtypeStruct(flat[p].shape, dtype, sharding=flat[p].sharding)
        for p in _adapted_weights(program.cfg.model)
      }
    )
  }


def _load_lora_ewc(program) -> None:
  """F of the adapted weights (checked and normalised over the whole
  Fisher, as without LoRA) into program.frozen["ewc"]."""
  cfg = program.cfg
  c = cfg.continual
  if not c.fisher:
    program.frozen[KEY] = {}
    return
  base_cfg = lora_lib.merged_config(cfg.model)
  shardings = jax.tree.map(
    lambda x: x.sharding,
    lora_feature.float_base(program.frozen[lora_feature.BASE], cfg.model),
  )
  raw = fisher_store.load(c.fisher, base_cfg, shardings)
  fisher = dict(
    layout.flatten(
      prepare_fisher(program, raw, f"continual.fisher {c.fisher}", shardings)
    )
  )
  program.frozen[KEY] = {
    "fisher": layout.unflatten(
      {p: fisher[p] for p in _adapted_weights(cfg.model)}
    )
  }


# Fisher and anchor on the devices.
def _replicated_jit(program, fn):
  return jax.jit(fn, out_shardings=NamedSharding(program.mesh, P()))


def check_fisher_values(program, fisher, source: str) -> None:
  """CheckpointError naming the first leaf with NaN, inf or negative
  entries (counted on the devices)."""

  def counts(tree):  # float32: an int32 count may overflow at 27B
    count = lambda b: jnp.sum(b, dtype=jnp.float32)
    return {
      p: (count(jnp.isnan(x)), count(jnp.isinf(x)), count(x < 0))
      for p, x in layout.flatten(tree)
    }

  found = jax.device_get(_replicated_jit(program, counts)(fisher))
  for p in layout.param_shapes(program.cfg.model):
    nan, inf, neg = (int(v) for v in found[p])
    if nan or inf or neg:
      raise CheckpointError(
        f"{source}: parameter {p} has {nan} NaN, {inf} infinite and {neg} "
        f"negative Fisher entries; a Fisher is finite and >= 0, so it is "
        f"refused (estimate it again with gemma-jax fisher)"
      )


def prepare_fisher(program, fisher, source: str, shardings=None):
  """Checked, normalised (continual.fisher_normalization) and cast F, in
  `shardings` (default: the params'); `fisher` (float32) is consumed."""
  c = program.cfg.continual
  check_fisher_values(program, fisher, source)
  if c.fisher_normalization == "mean":
    scale = _replicated_jit(
      program,
      lambda t: (
        sum(jnp.sum(x) for x in jax.tree.leaves(t))
        / sum(x.size for x in jax.tree.leaves(t))
      ),
    )(fisher)
  elif c.fisher_normalization == "max":
    scale = _replicated_jit(
      program,
      lambda t: jnp.max(jnp.stack([jnp.max(x) for x in jax.tree.leaves(t)])),
    )(fisher)
  else:
    scale = jnp.float32(1.0)
  if float(scale) <= 0:
    raise CheckpointError(
      f"{source}: every Fisher entry is 0, so it cannot "
      f"be normalised by its {c.fisher_normalization}"
    )
  dtype = jnp.dtype(c.dtype)
  return jax.jit(
    lambda t, s: jax.tree.map(lambda x: (x / s).astype(dtype), t),
    out_shardings=shardings or program.param_shardings,
    donate_argnums=0,
  )(fisher, scale)


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
  out = {
    "anchor": {
      "path": str(path),
      "format": fmt,
      "fingerprint": fingerprint_of(path, "continual.anchor"),
    },
    "dtype": c.dtype,
    "fisher": None,
  }
  if c.fisher:
    out["fisher"] = {
      "path": str(c.fisher),
      "fingerprint": fingerprint_of(c.fisher, "continual.fisher"),
      "normalization": c.fisher_normalization,
    }
  return out


def fingerprint_of(path, key: str = "checkpoint") -> str:
  """The fingerprint (gemma_jax.checkpoint.fingerprint) of a checkpoint
  directory; of a run directory, that of its latest checkpoint."""
  if not epath.Path(path).exists():
    raise ConfigError(f"{key}: {path} does not exist")
  if is_run_dir(path):  # what a run holds is its latest checkpoint
    latest = max(
      (
        int(p.name)
        for p in (epath.Path(path) / "checkpoints").iterdir()
        if p.name.isdigit()
      ),
      default=None,
    )
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
        f"fresh --workdir"
      )
    for key in ("fingerprint", "normalization"):
      if key in old and old.get(key) != new.get(key):
        raise ConfigError(
          f"continual.{part}: {key} changed since the checkpoint at step "
          f"{step} ({old['path']}: {old[key]} -> {new['path']}: "
          f"{new[key]}); restore the {part} it was trained with or use a "
          f"fresh --workdir"
        )
  if saved.get("dtype") != current.get("dtype"):
    raise ConfigError(
      f"continual.dtype changed since the checkpoint at step "
      f"{step} ({saved.get('dtype')} -> "
      f"{current.get('dtype')}); restore it"
    )


def load_ewc(program, initial_params=None) -> None:
  """Fills program.frozen["ewc"] with F and the anchor. When the anchor is
  checkpoint.init_from and `initial_params` (just loaded from there) are
  given, the anchor is a device copy of them instead of a second read."""
  cfg = program.cfg
  c = cfg.continual
  if not c.enabled:
    return
  if cfg.model.lora is not None:
    _load_lora_ewc(program)
    return
  dtype = jnp.dtype(c.dtype)
  path, fmt = _anchor_path(cfg)
  if initial_params is not None and path == cfg.checkpoint.init_from:
    anchor = jax.jit(
      lambda t: jax.tree.map(lambda x: jnp.copy(x).astype(dtype), t),
      out_shardings=program.param_shardings,
    )(initial_params)
  else:
    anchor = load_params(path, fmt, program, dtype)
  ewc = {"anchor": anchor}
  if c.fisher:
    raw = fisher_store.load(c.fisher, cfg.model, program.param_shardings)
    ewc["fisher"] = prepare_fisher(program, raw, f"continual.fisher {c.fisher}")
  program.frozen[KEY] = ewc


class EWC(Feature):
  """The EWC penalty (continual.ewc_lambda > 0): F and the anchor are
  frozen inputs, abstract until loaded, so that the step lowers and
  compiles (also ahead of time) before they are; evaluation never reads
  them. With LoRA: F of the adapted weights only, on the adapters' change.
  Checkpoints record them (`describe`) and a resume refuses changed ones.

  Its three `lora` branches (frozen, penalty, load_ewc) stay: LoRA's
  trainable filter and forward view would give a general penalty on
  (base + A B) - anchor, which needs a full-size anchor copy and forms
  every adapted W + A B per step; on the adapters the anchor is the frozen
  base itself and the penalty needs only the change A B (Gram matrices
  without a Fisher), which only this module knows how to compute.
  """

  name = "ewc"

  def __init__(self, cfg):
    super().__init__(cfg)
    self.description: dict = {}

  def frozen(self, program) -> dict:
    c = self.cfg.continual
    if self.cfg.model.lora is not None:
      return {KEY: _lora_frozen(program, c)}
    dtype = jnp.dtype(c.dtype)
    like = lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    params = program.abstract_state.params
    ewc = {"anchor": jax.tree.map(like, params)}
    if c.fisher:
      ewc["fisher"] = jax.tree.map(like, params)
    return {KEY: ewc}

  def penalty(self, program):
    c, model_cfg = self.cfg.continual, self.cfg.model
    if model_cfg.lora is None:
      return penalty_fn(c.ewc_lambda)

    def fn(params, frozen):
      value = lora_penalty(params, frozen[KEY], c.ewc_lambda, model_cfg)
      return value, {KEY: value}

    return fn

  @classmethod
  def check_inputs(cls, cfg, fresh: bool) -> None:
    c, ck = cfg.continual, cfg.checkpoint
    if c.anchor and c.anchor != ck.init_from:  # init_from: the core's
      preflight.check_params_source(
        c.anchor, cfg.model, c.anchor_format, "continual.anchor"
      )
    if c.fisher:
      preflight.check_fisher(c.fisher, cfg.model, "continual.fisher")

  def prepare(self, program, pipe) -> None:
    # Fails on a missing Fisher or anchor, before anything is loaded.
    self.description = describe(self.cfg)

  def load(self, program, params) -> None:
    load_ewc(program, params)

  def resume(self, program, meta: dict, step: int) -> None:
    check_resume(meta.get("continual"), self.description, step)
    load_ewc(program)

  def metadata(self) -> dict:
    return {"continual": self.description}
