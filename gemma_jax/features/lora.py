"""Training low-rank adapters: the state holds the adapters, the base is frozen.

With `model.lora` set, the `LoRA` feature makes the TrainState's params only
the adapters (so the optimizer state and every training checkpoint hold
only them), and the base weights live in `program.frozen["base"]`, sharded
like the parameters they are, read by the forward pass (a view of
step.Forward, so the fused chunked loss stays) and never donated or
differentiated. With `model.quant.weights: int` the frozen base is held as
integers plus scales (QLoRA). The adapters' term itself is computed inside
the model's Einsum (gemma_jax.model.lora.adapter_delta): x A B costs far
less than forming W + A B per step.

    info = install_base(program, init_from)  # LoRA.prepare, before compiling
    export(program, adapters, workdir)       # adapter + merged params

The base comes from `checkpoint.init_from` (a native checkpoint, or a
quantized one for QLoRA; a float base is quantized on the devices when the
config holds integer weights), or is the random init of `train.seed`.
Training checkpoints record the base's path and fingerprint; resuming onto
another base is refused (`check_base`).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.checkpoint import adapter as adapter_ckpt
from gemma_jax.checkpoint import formats, layout, native, preflight, quantized
from gemma_jax.errors import ConfigError
from gemma_jax.features.base import Feature
from gemma_jax.model import lora as lora_lib
from gemma_jax.model import quant as quant_lib
from gemma_jax.sharding import rules
from gemma_jax.train import state as state_lib
from gemma_jax.train import step as step_lib

BASE = "base"
ADAPTER_DIR = "adapter"


def split_base(program, boxed):
  """(boxed adapters, abstract base with shardings) of the model's boxed
  abstract params."""
  adapters, base = lora_lib.split(boxed)
  specs, _ = rules.mesh_specs(base, program.mesh, program.cfg.mesh)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    rules.values(base),
    rules.named(program.mesh, specs),
  )
  return adapters, abstract


def adapter_specs(specs, adapters, mesh):
  """Adapter PartitionSpecs, also split over `fsdp` like the base weights.

  An adapter's rank axis is replicated, so a B [L, r, out] whose out axes
  map to `tensor` only (q, k, v, gate, up) would be replicated over `fsdp`,
  where the weight it adapts splits its `embed` axis. Like that weight it
  is split over fsdp instead, on its largest dimension fsdp divides (never
  the rank: it is too small). The optimizer moments then add `data` as for
  every parameter."""
  return jax.tree.map(
    lambda s, x: rules.zero_spec(s, x.shape, mesh, ("fsdp",)),
    specs,
    adapters,
    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
  )


def view(model):
  """A step.Forward view: (adapters, frozen, batch) -> (base + adapters,
  rngs).

  Dropout (lora.dropout > 0) draws from `batch["rng"]` (per-row keys of the
  step, gemma_jax.train.step) when present; evaluation has none and runs
  without dropout.
  """
  dropout = model.config.lora.dropout > 0

  def fn(params, frozen, batch):
    rngs = {}
    if dropout and "rng" in batch:
      rngs["dropout"] = batch["rng"][0]
    base = jax.tree.map(_from_container, frozen[BASE])
    return lora_lib.combine(base, params), rngs

  return fn


def forward(model):
  """forward(adapters, frozen, batch) -> logits of base + adapters."""
  return step_lib.Forward(model).with_view(view(model))


def full_params(program, adapters):
  """The model's whole tree: the frozen base with `adapters`."""
  return lora_lib.combine(program.frozen[BASE], adapters)


def init_adapters(init_params):
  """Wraps init_params(model_cfg, key) to return the adapters only (the
  base's init is dead code and compiled away)."""
  return lambda *args: lora_lib.split(init_params(*args))[0]


# The base.
def float_base(abstract, model_cfg):
  """The base as a float checkpoint stores it (scales gone, weights in
  param_dtype), with the same shardings."""
  if model_cfg.quant is None or model_cfg.quant.weights != "int":
    return abstract
  leaves = quant_lib.quantized_leaves(model_cfg)
  scales = {scale for _, scale in leaves.values()}
  flat = dict(layout.flatten(abstract))
  dtype = jnp.dtype(model_cfg.param_dtype)
  return layout.unflatten(
    {
      p: (
        jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        if p in leaves
        else x
      )
      for p, x in flat.items()
      if p not in scales
    }
  )


def _load_float(path, fmt, abstract, model_cfg):
  """The float base from a native, Hugging Face or official Flax
  checkpoint, straight into the shardings of `abstract`."""
  fmt = formats.detect(path) if fmt == "auto" else fmt
  if fmt == "native":
    stored = native.load_config(path)
    want = {p: tuple(x.shape) for p, x in layout.flatten(abstract)}
    have = layout.param_shapes(stored)
    for p, shape in want.items():
      if have.get(p) != shape:
        raise ConfigError(
          f"checkpoint.init_from {path}: the base does not fit model "
          f"{model_cfg.name}: {p} is {have.get(p)} there, the model needs "
          f"{shape}"
        )
  dtypes = {x.dtype for x in jax.tree.leaves(abstract)}
  return formats.load(
    path,
    lora_lib.merged_config(model_cfg),
    fmt=fmt,
    dtype=dtypes.pop() if len(dtypes) == 1 else None,
    shardings=jax.tree.map(lambda x: x.sharding, abstract),
  )


def install_base(program, init_from: str | None, fmt: str = "auto") -> dict:
  """Puts the base weights (`init_from` in checkpoint format `fmt`, see
  gemma_jax.checkpoint.formats; or a quantized one) on the devices into
  program.frozen["base"]; returns the facts a checkpoint records:
  {"path", "fingerprint"}."""
  cfg = program.cfg.model
  if init_from and (
    fmt == "run"
    or (fmt == "auto" and os.path.isdir(os.path.join(init_from, "checkpoints")))
  ):
    raise ConfigError(
      f"checkpoint.init_from {init_from}: a run directory cannot be the "
      f"base of LoRA (its state may hold adapters, not weights); point it "
      f"at the run's export, {os.path.join(init_from, 'params')}"
    )
  abstract = program.frozen[BASE]
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  held_int = cfg.quant is not None and cfg.quant.weights == "int"
  if init_from and quantized.is_quantized(init_from):
    stored = quantized.load_config(init_from)
    if stored.quant != cfg.quant:
      raise ConfigError(
        f"checkpoint.init_from {init_from} is quantized with "
        f"{stored.quant}, the model config says {cfg.quant}"
      )
    base, _ = quantized.load(init_from, shardings=shardings)
  elif init_from:
    float_abstract = float_base(abstract, cfg) if held_int else abstract
    base = _load_float(init_from, fmt, float_abstract, cfg)
    if held_int:  # QLoRA from a float base: quantized on the devices
      base = jax.jit(
        functools.partial(quant_lib.quantize_params, model_cfg=cfg),
        out_shardings=shardings,
      )(base)
  else:
    seed = program.cfg.train.seed
    init_key, _ = jax.random.split(jax.random.PRNGKey(seed))
    init = lambda key: lora_lib.split(state_lib.init_params(cfg, key))[1]
    if held_int:
      init = lambda key: quant_lib.quantize_params(
        lora_lib.split(state_lib.init_params(lora_lib.merged_config(cfg), key))[
          1
        ],
        cfg,
      )
    with program.context():
      base = jax.jit(init, out_shardings=shardings)(init_key)
  if program.mesh.devices.flat[0].platform != "tpu" and any(
    x.dtype == jnp.int4 for x in jax.tree.leaves(base)
  ):
    base = jax.jit(
      lambda t: jax.tree.map(_to_container, t), out_shardings=shardings
    )(base)
  program.frozen[BASE] = base
  return {
    "path": os.path.abspath(init_from) if init_from else None,
    "fingerprint": fingerprint(base),
  }


# jax 0.10.2 on CPU holds int4 arrays unpacked while an ahead-of-time
# compiled step requires them packed (its layout check refuses them), so off
# TPU (checked on CPU; GPU untested) an int4 base is held in int8 and cast
# back inside the step. TPU holds int4: half a byte per weight.
def _to_container(x):
  return x.astype(jnp.int8) if x.dtype == jnp.int4 else x


def _from_container(x):
  return x.astype(jnp.int4) if x.dtype == jnp.int8 else x


@jax.jit
def _moments(tree):
  return jax.tree.map(
    lambda x: jnp.stack(
      [
        jnp.sum(x.astype(jnp.float32)),
        jnp.sum(jnp.square(x.astype(jnp.float32))),
      ]
    ),
    tree,
  )


def fingerprint(base) -> dict[str, list[float]]:
  """{leaf path: [sum, sum of squares]}: cheap, and equal (to rounding)
  for the same weights on any mesh."""
  moments = jax.device_get(_moments(base))
  return {
    p: [float(v) for v in np.asarray(m)] for p, m in layout.flatten(moments)
  }


def check_base(saved: dict | None, current: dict, step: int) -> None:
  """ConfigError if a checkpoint's adapters were trained on another base
  than the one installed now (by fingerprint; a moved copy is the same)."""
  if not saved:
    return
  old, new = saved.get("fingerprint", {}), current["fingerprint"]
  for path in sorted(set(old) | set(new)):
    a, b = old.get(path), new.get(path)
    same = (
      a is not None
      and b is not None
      and all(
        math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6) for x, y in zip(a, b)
      )
    )
    if not same:
      raise ConfigError(
        f"the checkpoint at step {step} trained its adapters on base "
        f"{saved.get('path') or '(random init)'}, and this run's base "
        f"{current['path'] or '(random init)'} differs at {path}; set "
        f"checkpoint.init_from to the base it was trained on, or use a "
        f"fresh --workdir"
      )


def export(
  program, adapters, workdir: str, base_info: dict, suffix: str = ""
) -> tuple[str, str]:
  """Writes WORKDIR/adapter<suffix> (adapters only) and
  WORKDIR/params<suffix> (merged into the base, a plain native
  checkpoint); returns both paths. (suffix "_ema": the adapters' EMA.)"""
  cfg = program.cfg.model
  adapter_path = os.path.join(workdir, ADAPTER_DIR + suffix)
  adapter_ckpt.save(adapter_path, adapters, cfg, base_info, force=True)
  base = program.frozen[BASE]
  merge = functools.partial(lora_lib.merge_params, model_cfg=cfg)
  with program.context():
    merged = jax.jit(merge)(base, adapters)
  params_path = os.path.join(workdir, "params" + suffix)
  native.save(params_path, merged, lora_lib.merged_config(cfg), force=True)
  return adapter_path, params_path


class LoRA(Feature):
  """model.lora: trains the adapters over a frozen base (see above)."""

  name = "lora"
  frozen_in_eval = True  # the eval step's forward reads the base too

  def __init__(self, cfg):
    super().__init__(cfg)
    self.base_info: dict | None = None  # path and fingerprint, once loaded
    self._abstract_base = None

  def trainable(self, program, boxed):
    adapters, self._abstract_base = split_base(program, boxed)
    return adapters

  def param_specs(self, program, specs, params):
    return adapter_specs(specs, params, program.mesh)

  def init_params(self, init):
    return init_adapters(init)

  def forward(self, program, forward):
    return forward.with_view(view(program.model))

  def frozen(self, program) -> dict:
    return {BASE: self._abstract_base}

  @classmethod
  def check_inputs(cls, cfg, fresh: bool) -> None:
    # The base is read at every start, a resumed one too (the core checks
    # a fresh run's init_from).
    ck = cfg.checkpoint
    if ck.init_from and not fresh:
      preflight.check_params_source(
        ck.init_from, cfg.model, ck.init_format, "checkpoint.init_from"
      )

  def prepare(self, program, pipe) -> None:
    ck = self.cfg.checkpoint
    self.base_info = install_base(program, ck.init_from, ck.init_format)

  def uses_init_from(self) -> bool:
    return True  # the frozen base; the adapters start fresh

  def check_checkpoint(self, meta: dict, step: int) -> None:
    # Adapters trained on another base cannot continue on this one.
    assert self.base_info is not None, "prepare installs the base first"
    check_base(meta.get("lora_base"), self.base_info, step)

  def metadata(self) -> dict:
    return {"lora_base": self.base_info}

  def export(self, program, params, workdir, variant, step):
    adapter, path = export(
      program, params, workdir, self.base_info, variant.suffix
    )
    label = f" {variant.label}" if variant.label else ""
    return (
      f"adapter{label} saved to {adapter}, merged {variant.what} exported "
      f"to {path} (step {step})"
    )

  def full_params(self, program, params):
    return full_params(program, params)
