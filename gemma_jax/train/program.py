"""The TrainProgram: everything a run compiles, built once from a RunConfig.

    program = TrainProgram(cfg)                      # mesh of the devices here
    state = program.init_state()                     # sharded on the devices
    train_step = program.compile_train_step()        # compiled ahead of time
    state, metrics = train_step(state, program.put(batch))

`train`, `eval`, `compile`, the benchmarks and every later feature take their
mesh, shardings, abstract shapes and compiled steps from here; nothing else
computes a sharding. The model's logical axis names become mesh axes through
the config's rules table (gemma_jax.sharding.rules).
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_jax.errors import ConfigError
from gemma_jax.model import Transformer
from gemma_jax.sharding import rules
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train import continual, distillation
from gemma_jax.train import state as state_lib
from gemma_jax.train import step as step_lib
from gemma_jax.train.config import RunConfig
from gemma_jax.train.optimizer import make_optimizer


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
    forward: (params, frozen, batch) -> logits; loss_fn, penalty_fn: the
      objective (see gemma_jax.train.step.train_step).
    frozen: arrays every step reads but never trains (a teacher, a Fisher
      and its anchor), on the devices; {} when the objective needs none.
      An entry may be abstract (ShapeDtypeStructs with shardings) until
      loaded: enough to lower and compile for another topology.
    train_only_frozen: names of frozen entries only the objective reads
      (the eval step does without them, e.g. a teacher).
  """

  def __init__(self, cfg: RunConfig, mesh: jax.sharding.Mesh | None = None):
    self.cfg = cfg
    self.mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    self.model = Transformer(cfg.model)
    self.num_sources = max(len(cfg.data.sources), 1)
    self.forward = step_lib.model_forward(self.model)
    self.loss_fn = step_lib.lm_loss(self.forward, self.num_sources,
                                    cfg.train.z_loss)
    self.penalty_fn = None
    self.frozen = {}
    self.train_only_frozen = set()
    self.optimizer, self.schedule = make_optimizer(
        cfg.optimizer, cfg.optimizer.decay_steps or cfg.train.steps)
    self.batch_sharding = NamedSharding(self.mesh,
                                        rules.batch_spec(cfg.mesh))
    self._check_batch_size()

    boxed = state_lib.abstract_params(cfg.model)
    self.param_specs, self.unsharded = rules.mesh_specs(boxed, self.mesh,
                                                        cfg.mesh)
    params = rules.values(boxed)
    opt_state = jax.eval_shape(self.optimizer.init, params)
    moment_specs = self._moment_specs(params)
    self.ema = cfg.train.ema_decay > 0
    self.state_shardings = rules.named(self.mesh, state_lib.TrainState(
        step=P(), params=self.param_specs,
        opt_state=self._opt_state_specs(moment_specs, opt_state), rng=P(),
        nonfinite_in_row=P(), ema=moment_specs if self.ema else None))
    shapes = jax.eval_shape(
        functools.partial(state_lib.init_state, optimizer=self.optimizer,
                          ema=self.ema),
        params, jax.ShapeDtypeStruct((2,), jnp.uint32))
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes, self.state_shardings)
    rows, t = cfg.train.batch_size, cfg.data.seq_len
    self.abstract_batch = {
        k: jax.ShapeDtypeStruct((rows,) if k == "source" else (rows, t),
                                jnp.int32, sharding=self.batch_sharding)
        for k in step_lib.BATCH_KEYS}
    # distill: the teacher (frozen), its loss, and a dump's batch keys.
    distillation.install(self)
    # EWC (continual.ewc_lambda > 0): the penalty, and the Fisher and anchor
    # as abstract frozen inputs until the trainer loads them.
    continual.install(self)

  # Shapes and layouts.
  def _check_batch_size(self):
    spec = self.batch_sharding.spec[0]
    shards = math.prod(self.mesh.shape[a] for a in rules.axes_of(spec))
    rows, m = self.cfg.train.batch_size, self.cfg.train.microbatches
    if rows % (shards * m):
      raise ConfigError(
          f"train.batch_size: {rows} rows do not split into "
          f"train.microbatches={m} microbatches over {shards} batch shards "
          f"(mesh axes {spec}); rows must be divisible by {shards * m}")

  def _moment_specs(self, params):
    """Per-parameter state (moments, the EMA): like the params, plus ZeRO
    over the data axis."""
    specs = self.param_specs
    if self.cfg.mesh.shard_optimizer_over_data:
      specs = jax.tree.map(
          lambda s, x: rules.zero_spec(s, x.shape, self.mesh), specs, params,
          is_leaf=lambda x: isinstance(x, P))
    return specs

  def _opt_state_specs(self, specs, opt_state):
    """Optimizer moments like `specs`; everything else replicated."""
    return optax.tree_map_params(
        self.optimizer, lambda _, spec: spec, opt_state, specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P))

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
        self.frozen)

  @property
  def eval_frozen(self) -> dict:
    return {k: v for k, v in self.frozen.items()
            if k not in self.train_only_frozen}

  @property
  def abstract_eval_batch(self) -> dict:
    return {k: self.abstract_batch[k] for k in step_lib.BATCH_KEYS}

  def context(self):
    """Binds the model's logical constraints to this mesh (for tracing)."""
    return rules.sharding_context(self.mesh, self.cfg.mesh)

  def put(self, batch: dict) -> dict:
    """Process-local numpy rows -> global arrays sharded over the batch."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()}

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
    return jax.jit(functools.partial(state_lib.init_params, self.cfg.model),
                   out_shardings=self.param_shardings)

  @functools.cached_property
  def _init_state(self):
    return jax.jit(
        functools.partial(state_lib.init_state, optimizer=self.optimizer,
                          ema=self.ema),
        in_shardings=(self.param_shardings, None),
        out_shardings=self.state_shardings, donate_argnums=0)

  # Steps.
  @functools.cached_property
  def _train_step(self):
    fn = functools.partial(
        step_lib.train_step, loss_fn=self.loss_fn, optimizer=self.optimizer,
        microbatches=self.cfg.train.microbatches, penalty_fn=self.penalty_fn,
        ema_decay=self.cfg.train.ema_decay,
        ema_debias=self.cfg.train.ema_debias)
    replicated = NamedSharding(self.mesh, P())
    return jax.jit(
        fn, in_shardings=(self.state_shardings, self.batch_sharding,
                          self.frozen_shardings),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)

  @functools.cached_property
  def _eval_step(self):
    fn = functools.partial(step_lib.eval_step, forward=self.forward,
                           num_sources=self.num_sources,
                           microbatches=self.cfg.train.microbatches)
    return jax.jit(fn, in_shardings=(
        self.param_shardings, self.batch_sharding,
        jax.tree.map(lambda x: x.sharding, self.eval_frozen)),
                   out_shardings=NamedSharding(self.mesh, P()))

  def lower_train_step(self) -> jax.stages.Lowered:
    with self.context():
      return self._train_step.lower(self.abstract_state, self.abstract_batch,
                                    self.abstract_frozen)

  def compile_train_step(self):
    """(state, batch) -> (state, metrics), compiled once; the state is
    donated, the frozen arrays passed along. metrics as in
    gemma_jax.train.step.train_step."""
    unloaded = [k for k, v in self.frozen.items()
                if any(isinstance(x, jax.ShapeDtypeStruct)
                       for x in jax.tree.leaves(v))]
    if unloaded:
      raise ValueError(f"frozen inputs {unloaded} are abstract; load them "
                       f"before compiling the step to run it")
    compiled = self.lower_train_step().compile()
    frozen = self.frozen
    return lambda state, batch: compiled(state, batch, frozen)

  def train_step_jaxpr(self):
    """The traced train step (to count FLOPs of every loop iteration)."""
    with self.context():
      return jax.make_jaxpr(self._train_step)(
          self.abstract_state, self.abstract_batch, self.abstract_frozen)

  @functools.cached_property
  def _compiled_eval_step(self):
    with self.context():
      frozen = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                         sharding=x.sharding),
          self.eval_frozen)
      return self._eval_step.lower(self.abstract_state.params,
                                   self.abstract_eval_batch,
                                   frozen).compile()

  def eval_step(self, params, batch):
    """Held-out sums of (params, batch), compiled once (see
    gemma_jax.train.step.eval_step); extra batch keys are ignored."""
    batch = {k: batch[k] for k in step_lib.BATCH_KEYS}
    return self._compiled_eval_step(params, batch, self.eval_frozen)

  @functools.cached_property
  def _ema_params(self):
    dtypes = jax.tree.map(lambda x: x.dtype, self.abstract_state.params)
    return jax.jit(lambda ema: jax.tree.map(lambda e, d: e.astype(d), ema,
                                            dtypes),
                   out_shardings=self.param_shardings)

  def ema_params(self, state):
    """The state's EMA as params: their dtype and sharding (to evaluate or
    export it)."""
    return self._ema_params(state.ema)
