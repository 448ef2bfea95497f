"""The TrainProgram: everything a run compiles, built once from a RunConfig.

    program = TrainProgram(cfg)                      # mesh of the devices here
    state = program.init_state()                     # sharded on the devices
    train_step = program.compile_train_step()        # compiled ahead of time
    state, metrics = train_step(state, program.put(batch))

`train`, `eval`, `compile`, the benchmarks and every later feature take their
mesh, shardings, abstract shapes and compiled steps from here; nothing else
computes a sharding. The model's logical axis names become mesh axes through
the config's rules table (gemma_jax.sharding.rules).

Features (gemma_jax.features) register with `register`; a program calls the
hooks (gemma_jax.features.base.Feature) of those its config turns on, in the
order they were registered.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax.errors import ConfigError
from gemma_jax.model import Transformer
from gemma_jax.sharding import rules
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train import state as state_lib
from gemma_jax.train import step as step_lib
from gemma_jax.train.config import RunConfig
from gemma_jax.train.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class Extra:
  """Per-step state a feature keeps in TrainState.extras[name].

  init(params) -> tree: at step 0. update(tree, params, opt_state) -> tree:
  after each optimizer update (kept only when the step is). specs: its
  PartitionSpecs.
  """

  init: Callable[[Any], Any]
  update: Callable[[Any, Any, Any], Any]
  specs: Any


@dataclasses.dataclass(frozen=True)
class Variant:
  """Params other than the state's to evaluate and export (e.g. an average
  of the weights).

  name: the metrics prefix (eval_<name>/...) and export suffix
  (params_<name>); label: how logs call it; what: how export lines call it.
  """

  name: str
  label: str
  what: str
  params: Any

  @property
  def suffix(self) -> str:
    return f"_{self.name}" if self.name else ""


MAIN = "params"  # Variant.what of the state's own params


_REGISTERED: list[Any] = []  # Feature classes


def register(*features: Any) -> None:
  """Adds feature classes (gemma_jax.features.base.Feature), in order."""
  for feature in features:
    if feature not in _REGISTERED:
      _REGISTERED.append(feature)


def feature_classes(cfg: RunConfig) -> list:
  """The registered feature classes `cfg` turns on, in order; ConfigError
  naming any it turns on that is not registered."""
  missing = set(cfg.features()) - {f.name for f in _REGISTERED}
  if missing:
    raise ConfigError(
      f"the config turns on {', '.join(sorted(missing))}, which no "
      f"registered feature provides; import gemma_jax.features before "
      f"building a TrainProgram (it registers them all)"
    )
  return [f for f in _REGISTERED if f.enabled(cfg)]


def enabled_features(cfg: RunConfig) -> list:
  """One instance of every registered feature `cfg` turns on, in order."""
  return [f(cfg) for f in feature_classes(cfg)]


class TrainProgram:
  """Mesh, model, optimizer, shardings and compiled steps of one run config.

  Attributes:
    cfg: the RunConfig.
    mesh: the device mesh (axes data, fsdp, tensor).
    model: the flax Transformer.
    optimizer, schedule: from the optimizer section.
    num_sources: data sources (length of per-source metrics).
    param_specs: mesh PartitionSpecs of the params.
    unsharded: {param path: notes} of dimensions the mesh does not divide.
    state_shardings: NamedShardings of every TrainState leaf.
    batch_sharding: the NamedSharding of every batch array (rows split).
    abstract_state, abstract_batch: ShapeDtypeStructs with those shardings.
    features: the enabled features (gemma_jax.features.base.Feature).
    forward: a step.Forward; loss_fn, penalty_fn: the objective (see
      gemma_jax.train.step.train_step).
    frozen: {name: arrays} every step reads but never trains, from the
      features, on the devices; {} when the objective needs none.
      An entry may be abstract (ShapeDtypeStructs with shardings) until
      loaded: enough to lower and compile for another topology.
    eval_frozen_names: the frozen entries the eval step reads too.
    extras: {name: Extra} of features that keep per-step state.
  """

  def __init__(self, cfg: RunConfig, mesh: jax.sharding.Mesh | None = None):
    self.cfg = cfg
    self.mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    self.model = Transformer(cfg.model)
    self.num_sources = max(len(cfg.data.sources), 1)
    self.features = enabled_features(cfg)
    self.frozen: dict[str, Any] = {}
    self.eval_frozen_names: set[str] = set()
    self.optimizer, self.schedule = make_optimizer(
      cfg.optimizer, cfg.optimizer.decay_steps or cfg.train.steps
    )
    self.batch_sharding = NamedSharding(self.mesh, rules.batch_spec(cfg.mesh))
    self._check_batch_size()

    # 1. The params the state trains, their layout, and per-step extras.
    boxed = state_lib.abstract_params(cfg.model)
    for f in self.features:
      boxed = f.trainable(self, boxed)
    self.param_specs, self.unsharded = rules.mesh_specs(
      boxed, self.mesh, cfg.mesh
    )
    params = rules.values(boxed)
    for f in self.features:
      self.param_specs = f.param_specs(self, self.param_specs, params)
    opt_state = jax.eval_shape(self.optimizer.init, params)
    self.moment_specs = self._moment_specs(params)
    self.extras = {
      f.name: extra
      for f in self.features
      if (extra := f.extras(self)) is not None
    }
    self.state_shardings = rules.named(
      self.mesh,
      state_lib.TrainState(
        step=P(),
        params=self.param_specs,
        opt_state=self._opt_state_specs(self.moment_specs, opt_state),
        rng=P(),
        nonfinite_in_row=P(),
        extras={k: e.specs for k, e in self.extras.items()} or None,
      ),
    )
    shapes = jax.eval_shape(
      functools.partial(
        state_lib.init_state,
        optimizer=self.optimizer,
        extras_init=self._extras_init,
      ),
      params,
      jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    self.abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes,
      self.state_shardings,
    )
    rows, t = cfg.train.batch_size, cfg.data.seq_len
    self.abstract_batch = {
      k: jax.ShapeDtypeStruct(
        (rows,) if k == "source" else (rows, t),
        jnp.int32,
        sharding=self.batch_sharding,
      )
      for k in step_lib.BATCH_KEYS
    }

    # 2. The objective: the forward pass, the frozen inputs and extra batch
    # arrays it reads, the loss and the penalties.
    self.forward = step_lib.model_forward(self.model)
    for f in self.features:
      self.forward = f.forward(self, self.forward)
      frozen = f.frozen(self)
      self.frozen |= frozen
      if f.frozen_in_eval:
        self.eval_frozen_names |= set(frozen)
      self.abstract_batch |= f.batch_keys(self)
    self.loss_fn = step_lib.lm_loss(
      self.forward, self.num_sources, cfg.train.z_loss
    )
    for f in self.features:
      self.loss_fn = f.loss(self, self.loss_fn)
    penalties = [p for f in self.features if (p := f.penalty(self))]
    self.penalty_fn = _sum_of(penalties) if penalties else None

  # Shapes and layouts.
  def _check_batch_size(self):
    spec = self.batch_sharding.spec[0]
    shards = math.prod(self.mesh.shape[a] for a in rules.axes_of(spec))
    rows, m = self.cfg.train.batch_size, self.cfg.train.microbatches
    if rows % (shards * m):
      raise ConfigError(
        f"train.batch_size: {rows} rows do not split into "
        f"train.microbatches={m} microbatches over {shards} batch shards "
        f"(mesh axes {spec}); rows must be divisible by {shards * m}"
      )

  def _moment_specs(self, params):
    """Per-parameter state (moments, extras): like the params, plus ZeRO
    over the data axis."""
    specs = self.param_specs
    if self.cfg.mesh.shard_optimizer_over_data:
      specs = jax.tree.map(
        lambda s, x: rules.zero_spec(s, x.shape, self.mesh),
        specs,
        params,
        is_leaf=lambda x: isinstance(x, P),
      )
    return specs

  def _opt_state_specs(self, specs, opt_state):
    """Optimizer moments like `specs`; everything else replicated."""
    return optax.tree_map_params(
      self.optimizer,
      lambda _, spec: spec,
      opt_state,
      specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P),
    )

  @property
  def param_shardings(self):
    return self.state_shardings.params

  @property
  def frozen_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.frozen)

  @property
  def abstract_frozen(self):
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      self.frozen,
    )

  @property
  def eval_frozen(self) -> dict:
    return {k: v for k, v in self.frozen.items() if k in self.eval_frozen_names}

  def _extras_init(self, params):
    if not self.extras:
      return None
    return {k: e.init(params) for k, e in self.extras.items()}

  def _extras_update(self, extras, params, opt_state):
    return {
      k: e.update(extras[k], params, opt_state) for k, e in self.extras.items()
    }

  @property
  def abstract_eval_batch(self) -> dict:
    return {k: self.abstract_batch[k] for k in step_lib.BATCH_KEYS}

  def context(self):
    """Binds the model's logical constraints to this mesh (for tracing)."""
    return rules.sharding_context(self.mesh, self.cfg.mesh)

  def put(self, batch: dict) -> dict:
    """Process-local numpy rows -> global arrays sharded over the batch."""
    return {
      k: jax.make_array_from_process_local_data(self.batch_sharding, v)
      for k, v in batch.items()
    }

  # State.
  def init_state(self, seed: int | None = None, params=None):
    """A step-0 TrainState created in its sharded layout: random params from
    `seed` (default train.seed), or the given `params` (e.g. restored with
    `param_shardings` for continual pretraining; donated)."""
    seed = self.cfg.train.seed if seed is None else seed
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    with self.context():
      if params is None:
        params = self._init_params(init_key)
      return self._init_state(params, state_key)

  @functools.cached_property
  def _init_params(self):
    init = state_lib.init_params
    for f in self.features:
      init = f.init_params(init)
    return jax.jit(
      functools.partial(init, self.cfg.model),
      out_shardings=self.param_shardings,
    )

  @functools.cached_property
  def _init_state(self):
    return jax.jit(
      functools.partial(
        state_lib.init_state,
        optimizer=self.optimizer,
        extras_init=self._extras_init,
      ),
      in_shardings=(self.param_shardings, None),
      out_shardings=self.state_shardings,
      donate_argnums=0,
    )

  # Steps.
  @functools.cached_property
  def _train_step(self):
    fn = functools.partial(
      step_lib.train_step,
      loss_fn=self.loss_fn,
      optimizer=self.optimizer,
      microbatches=self.cfg.train.microbatches,
      penalty_fn=self.penalty_fn,
      extras_fn=self._extras_update if self.extras else None,
    )
    replicated = NamedSharding(self.mesh, P())
    return jax.jit(
      fn,
      in_shardings=(
        self.state_shardings,
        self.batch_sharding,
        self.frozen_shardings,
      ),
      out_shardings=(self.state_shardings, replicated),
      donate_argnums=0,
    )

  @functools.cached_property
  def _eval_step(self):
    fn = functools.partial(
      step_lib.eval_step,
      forward=self.forward,
      num_sources=self.num_sources,
      microbatches=self.cfg.train.microbatches,
    )
    return jax.jit(
      fn,
      in_shardings=(
        self.param_shardings,
        self.batch_sharding,
        jax.tree.map(lambda x: x.sharding, self.eval_frozen),
      ),
      out_shardings=NamedSharding(self.mesh, P()),
    )

  def lower_train_step(self) -> jax.stages.Lowered:
    with self.context():
      return self._train_step.lower(
        self.abstract_state, self.abstract_batch, self.abstract_frozen
      )

  def compile_train_step(self):
    """(state, batch) -> (state, metrics), compiled once; the state is
    donated, the frozen arrays passed along. metrics as in
    gemma_jax.train.step.train_step."""
    unloaded = [
      k
      for k, v in self.frozen.items()
      if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(v))
    ]
    if unloaded:
      raise ValueError(
        f"frozen inputs {unloaded} are abstract; load them "
        f"before compiling the step to run it"
      )
    compiled = self.lower_train_step().compile()
    frozen = self.frozen
    return lambda state, batch: compiled(state, batch, frozen)

  def train_step_jaxpr(self):
    """The traced train step (to count FLOPs of every loop iteration)."""
    with self.context():
      return jax.make_jaxpr(self._train_step)(
        self.abstract_state, self.abstract_batch, self.abstract_frozen
      )

  @functools.cached_property
  def _compiled_eval_step(self):
    with self.context():
      frozen = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        self.eval_frozen,
      )
      return self._eval_step.lower(
        self.abstract_state.params, self.abstract_eval_batch, frozen
      ).compile()

  def eval_step(self, params, batch):
    """Held-out sums of (params, batch), compiled once (see
    gemma_jax.train.step.eval_step); extra batch keys are ignored."""
    batch = {k: batch[k] for k in step_lib.BATCH_KEYS}
    return self._compiled_eval_step(params, batch, self.eval_frozen)

  def variants(self, state) -> list:
    """Params besides the state's to evaluate and export (the features'
    gemma_jax.features.base.Variant)."""
    return [v for f in self.features for v in f.variants(self, state)]

  def full_params(self, params):
    """The model's whole param tree from the state's params."""
    for f in self.features:
      params = f.full_params(self, params)
    return params


def _sum_of(penalties):
  """One penalty_fn from several: values added, terms merged."""
  if len(penalties) == 1:
    return penalties[0]

  def fn(params, frozen):
    total, terms = 0.0, {}
    for p in penalties:
      value, more = p(params, frozen)
      total, terms = total + value, terms | more
    return total, terms

  return fn
