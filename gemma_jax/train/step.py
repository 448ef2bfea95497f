"""The sharded train and eval steps: pure jitted functions over a TrainState.

    mesh = make_mesh(cfg.mesh)
    state = init_train_state(cfg, mesh, seed)          # sharded on device
    train_step = make_train_step(cfg, mesh, num_sources)
    state, metrics = train_step(state, batch)           # no host sync

A batch is a dict of int32 arrays: inputs, targets, segment_ids, positions,
loss_mask [B, T] and source [B], rows split over the mesh by `batch_sharding`.
The loss is the mean cross-entropy over target tokens with loss_mask 1 in the
whole global batch (all microbatches), plus an optional z-loss
z * mean(logsumexp^2). Gradients are accumulated over `train.microbatches`
with a scan, clipped by global norm, and applied by AdamW; a step whose loss
or gradients are not finite is skipped (state kept, counter raised).
"""

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_jax.config import RunConfig
from gemma_jax.errors import ConfigError
from gemma_jax.model import Transformer
from gemma_jax.sharding import rules as rules_lib
from gemma_jax.train.config import TrainConfig
from gemma_jax.train.optimizer import make_optimizer, schedule_count

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask",
              "source")


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # int32 [], updates attempted so far
  params: Any
  opt_state: Any
  rng: jax.Array                # uint32 [2], raw PRNG key
  nonfinite_in_row: jax.Array   # int32 [], consecutive skipped steps


def _total_steps(cfg: RunConfig) -> int:
  return cfg.optimizer.decay_steps or cfg.train.steps


def _boxed_params(cfg: RunConfig):
  """Abstract params with their logical-axis boxes (no memory used)."""
  return _boxed_model_params(cfg.model)


@functools.lru_cache(maxsize=16)
def _boxed_model_params(model_cfg):
  model = Transformer(model_cfg)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda r, t: model.init(r, t)["params"],
                        jax.ShapeDtypeStruct((2,), jnp.uint32), tokens)


def param_specs(cfg: RunConfig, mesh):
  """(mesh PartitionSpecs of the params, {path: unsharded notes})."""
  return rules_lib.mesh_specs(_boxed_params(cfg), mesh, cfg.mesh)


def _state_specs(cfg: RunConfig, mesh):
  pspecs, _ = param_specs(cfg, mesh)
  tx, _ = make_optimizer(cfg.optimizer, _total_steps(cfg))
  shapes = rules_lib.values(_boxed_params(cfg))
  opt_shapes = jax.eval_shape(tx.init, shapes)
  if cfg.mesh.shard_optimizer_over_data:
    ospecs = jax.tree.map(lambda s, x: rules_lib.zero_spec(s, x.shape, mesh),
                          pspecs, shapes, is_leaf=lambda x: isinstance(x, P))
  else:
    ospecs = pspecs
  opt_specs = optax.tree_map_params(
      tx, lambda _, spec: spec, opt_shapes, ospecs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P))
  return TrainState(step=P(), params=pspecs, opt_state=opt_specs, rng=P(),
                    nonfinite_in_row=P())


def state_shardings(cfg: RunConfig, mesh) -> TrainState:
  """NamedShardings of every leaf of the TrainState (e.g. for restoring)."""
  return rules_lib.named(mesh, _state_specs(cfg, mesh))


def batch_sharding(cfg: RunConfig, mesh) -> NamedSharding:
  """Sharding of every batch array: rows over the 'act_batch' mesh axes."""
  return NamedSharding(mesh, rules_lib.batch_spec(cfg.mesh))


def _as_key(rng) -> jax.Array:
  if isinstance(rng, int):
    return jax.random.PRNGKey(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def _init_fn(cfg: RunConfig):
  model = Transformer(cfg.model)
  tx, _ = make_optimizer(cfg.optimizer, _total_steps(cfg))

  def init(key):
    init_key, state_key = jax.random.split(key)
    params = nn.unbox(model.init(init_key, jnp.zeros((1, 8), jnp.int32))
                      ["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_key,
                      nonfinite_in_row=jnp.zeros((), jnp.int32))
  return init


@functools.lru_cache(maxsize=8)
def _jitted_init(model_cfg, opt_cfg, total_steps, mesh_cfg, mesh):
  # Only these parts of the run config shape the state: one compile each.
  cfg = RunConfig(model=model_cfg, optimizer=opt_cfg, mesh=mesh_cfg,
                  train=TrainConfig(steps=total_steps))
  return jax.jit(_init_fn(cfg), out_shardings=state_shardings(cfg, mesh))


def init_train_state(cfg: RunConfig, mesh, rng) -> TrainState:
  """A fresh TrainState, created directly in its sharded layout."""
  init = _jitted_init(cfg.model, cfg.optimizer, _total_steps(cfg), cfg.mesh,
                      mesh)
  with rules_lib.sharding_context(mesh, cfg.mesh):
    return init(_as_key(rng))


def abstract_train_state(cfg: RunConfig, mesh) -> TrainState:
  """TrainState of jax.ShapeDtypeStructs carrying their shardings."""
  shapes = jax.eval_shape(_init_fn(cfg),
                          jax.ShapeDtypeStruct((2,), jnp.uint32))
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, state_shardings(cfg, mesh))


def abstract_batch(cfg: RunConfig, mesh) -> dict:
  """A global batch of ShapeDtypeStructs (train.batch_size x data.seq_len)."""
  sharding = batch_sharding(cfg, mesh)
  rows, t = cfg.train.batch_size, cfg.data.seq_len
  return {k: jax.ShapeDtypeStruct((rows,) if k == "source" else (rows, t),
                                  jnp.int32, sharding=sharding)
          for k in BATCH_KEYS}


def _check_batch(cfg: RunConfig, mesh, batch):
  rows = batch["inputs"].shape[0]
  spec = rules_lib.batch_spec(cfg.mesh)[0]
  shards = math.prod(mesh.shape[a] for a in rules_lib.axes_of(spec))
  m = cfg.train.microbatches
  if rows % (shards * m):
    raise ConfigError(
        f"train.batch_size: {rows} rows do not split into "
        f"train.microbatches={m} microbatches over {shards} batch shards "
        f"(mesh axes {spec}); rows must be divisible by {shards * m}")
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks keys {missing}; has {sorted(batch)}")


def _microbatches(batch, m: int):
  """[B, ...] -> [m, B/m, ...]; microbatch j takes rows j, j+m, ... so that
  every device keeps its own rows (no data movement)."""
  def split(x):
    x = x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)
    names = (None, "act_batch") + (None,) * (x.ndim - 2)
    return nn.with_logical_constraint(x, names)
  return jax.tree.map(split, batch)


def _token_losses(model, params, mb, z_loss: float):
  """Per-token cross-entropy and z-loss terms, float32 [B, T]."""
  logits = model.apply({"params": params}, mb["inputs"], mb["positions"],
                       mb["segment_ids"]).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  # One-hot contraction keeps a vocab-sharded logits tensor sharded.
  onehot = jax.nn.one_hot(mb["targets"], logits.shape[-1], dtype=logits.dtype)
  ce = lse - jnp.einsum("btv,btv->bt", logits, onehot)
  mask = mb["loss_mask"].astype(jnp.float32)
  return ce * mask, z_loss * jnp.square(lse) * mask


def _sums(cfg: RunConfig, params, batch, num_sources: int, grads: bool):
  """Loss sums over the batch, and gradients of (ce + z) / tokens."""
  model = Transformer(cfg.model)
  m = cfg.train.microbatches
  tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
  denom = jnp.maximum(tokens, 1.0)

  def loss_fn(p, mb):
    ce, z = _token_losses(model, p, mb, cfg.train.z_loss)
    row_ce = ce.sum(axis=1)
    aux = dict(ce=row_ce.sum(), z=z.sum(),
               source_loss_sum=jnp.zeros(num_sources).at[mb["source"]].add(
                   row_ce),
               source_tokens=jnp.zeros(num_sources).at[mb["source"]].add(
                   mb["loss_mask"].astype(jnp.float32).sum(axis=1)))
    return (row_ce.sum() + z.sum()) / denom, aux

  def one(mb):
    if grads:
      (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
      return aux, jax.tree.map(lambda x: x.astype(jnp.float32), g)
    return loss_fn(params, mb)[1], None

  if m == 1:
    return one(batch), tokens

  def body(carry, mb):
    aux, g = one(mb)
    return jax.tree.map(jnp.add, carry, (aux, g)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, jax.tree.map(
      lambda x: x[0], _microbatches(batch, m))))
  total, _ = jax.lax.scan(body, zeros, _microbatches(batch, m))
  return total, tokens


def _train_step(cfg: RunConfig, tx, schedule, num_sources, state, batch):
  (aux, grads), tokens = _sums(cfg, state.params, batch, num_sources, True)
  grad_norm = optax.tree.norm(grads)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(aux["ce"] + aux["z"])
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      rng=state.rng,
      nonfinite_in_row=jnp.where(finite, 0, state.nonfinite_in_row + 1))
  denom = jnp.maximum(tokens, 1.0)
  metrics = dict(loss=aux["ce"] / denom, z_loss=aux["z"] / denom,
                 grad_norm=grad_norm,
                 learning_rate=schedule(schedule_count(state.opt_state)),
                 tokens=tokens.astype(jnp.int32),
                 skipped=(~finite).astype(jnp.int32),
                 nonfinite_in_row=new_state.nonfinite_in_row,
                 source_loss_sum=aux["source_loss_sum"],
                 source_tokens=aux["source_tokens"])
  return new_state, metrics


class _MeshBound:
  """A jitted function whose tracing happens inside the sharding context."""

  def __init__(self, jitted, mesh, mesh_cfg, check):
    self._jitted, self._mesh, self._cfg, self._check = (jitted, mesh,
                                                        mesh_cfg, check)

  def __call__(self, *args):
    self._check(args[-1])
    with rules_lib.sharding_context(self._mesh, self._cfg):
      return self._jitted(*args)

  def lower(self, *args):
    self._check(args[-1])
    with rules_lib.sharding_context(self._mesh, self._cfg):
      return self._jitted.lower(*args)

  def jaxpr(self, *args):
    """The traced program (e.g. to count FLOPs of every loop iteration)."""
    with rules_lib.sharding_context(self._mesh, self._cfg):
      return jax.make_jaxpr(self._jitted)(*args)


def make_train_step(cfg: RunConfig, mesh, num_sources: int = 1):
  """(state, batch) -> (state, metrics); jitted, state donated.

  metrics (device scalars unless noted): loss, z_loss, grad_norm,
  learning_rate, tokens, skipped, nonfinite_in_row, source_loss_sum
  [num_sources], source_tokens [num_sources].
  """
  tx, schedule = make_optimizer(cfg.optimizer, _total_steps(cfg))
  state_sh = state_shardings(cfg, mesh)
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(
      lambda state, batch: _train_step(cfg, tx, schedule, num_sources,
                                       state, batch),
      in_shardings=(state_sh, batch_sharding(cfg, mesh)),
      out_shardings=(state_sh, replicated), donate_argnums=0)
  return _MeshBound(jitted, mesh, cfg.mesh,
                    lambda b: _check_batch(cfg, mesh, b))


def make_eval_step(cfg: RunConfig, mesh, num_sources: int = 1):
  """(params, batch) -> dict(loss_sum, tokens, source_loss_sum,
  source_tokens); loss_sum is the cross-entropy (no z-loss) summed over
  target tokens."""
  def step(params, batch):
    (aux, _), tokens = _sums(cfg, params, batch, num_sources, False)
    return dict(loss_sum=aux["ce"], tokens=tokens,
                source_loss_sum=aux["source_loss_sum"],
                source_tokens=aux["source_tokens"])

  jitted = jax.jit(step, in_shardings=(state_shardings(cfg, mesh).params,
                                       batch_sharding(cfg, mesh)),
                   out_shardings=NamedSharding(mesh, P()))
  return _MeshBound(jitted, mesh, cfg.mesh,
                    lambda b: _check_batch(cfg, mesh, b))


def device_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Process-local numpy rows -> global jax arrays laid out by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}
