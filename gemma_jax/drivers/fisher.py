"""The diagonal empirical Fisher of a checkpoint: where its knowledge sits.

    program = FisherProgram(train_program, Estimator("per_example"))
    fisher, info = estimate(program, params, batches, num_steps)

A unit's log-likelihood log p(x) is the sum of the log-probabilities of its
target tokens (loss_mask 1): a whole row of a data source, or the gold
answer of a task example given its prompt. Two estimators:

  per_example   F_i = 1/N sum_n (d log p(x_n) / d theta_i)^2
                one unit = one row; the empirical Fisher proper.
  batch_mean    F_i = 1/G sum_g (d mean_{n in g} log p(x_n) / d theta_i)^2
                one unit = a group of `batch_size` rows (the last group may
                be short); what the published EWC recipe computed (groups of
                4 MMLU answers).

The two differ in scale: the mean of b nearly independent gradients has
about 1/b of the second moment of one (when the mean gradient is small
next to their spread), so batch_mean is about b times smaller than
per_example and an ewc_lambda tuned for one does not transfer to the other
(docs/continual.md).

Per-unit gradients come from jax.vmap of jax.grad over `rows_per_vmap` units
per device at a time (memory: that many whole gradient trees, float32 or
bfloat16), accumulated
as sums of squares in float32 in a tree sharded like the params, by one
jitted step that each batch of units goes through. The vmapped dimension is
split over the mesh's batch axes (vmap's spmd_axis_name); inside a unit the
model's batch dimension is not split.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Iterable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax.checkpoint import layout
from gemma_jax.errors import ConfigError
from gemma_jax.sharding import rules
from gemma_jax.train import step as step_lib

UNIT_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Estimator:
  name: Literal["per_example", "batch_mean"] = "per_example"
  batch_size: int = 1  # rows per squared mean gradient (batch_mean)

  def __post_init__(self):
    if self.name not in ("per_example", "batch_mean"):
      raise ConfigError(
        f"--estimator: {self.name!r} is not one of 'per_example', 'batch_mean'"
      )
    if self.batch_size < 1:
      raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
    if self.name == "per_example" and self.batch_size != 1:
      raise ConfigError(
        "--batch-size is for the batch_mean estimator; "
        "per_example squares one row's gradient"
      )

  @property
  def rows_per_unit(self) -> int:
    return self.batch_size


def unit_loglik(forward):
  """loglik(params, unit) of a unit {key: [R, T]}: the mean over its real
  rows (rows with a target) of each row's summed target log-probability;
  0 for an all-padding unit."""

  def loglik(params, unit):
    ce, _ = step_lib.token_losses(forward(params, {}, unit), unit, 0.0)
    real = (unit["loss_mask"].sum(axis=1) > 0).astype(jnp.float32)
    return -ce.sum() / jnp.maximum(real.sum(), 1.0)

  return loglik


def squared_grad_sums(
  loglik,
  params,
  units,
  acc,
  *,
  chunks: int,
  unit_spec: P,
  spmd_axes,
  grad_dtype=jnp.float32,
  acc_shardings=None,
):
  """(acc + sum over units of the squared gradient, float32 params-shaped;
  sum of log-likelihoods; real units) for units {key: [U, R, T]}.

  Units are taken `U / chunks` at a time (one vmap), chunk j holding units
  j, j + chunks, ... so that every device keeps its own units. Gradients are
  taken with respect to a `grad_dtype` copy of the params (so they are
  held in that dtype) and squared in float32. `acc_shardings` (the
  params') keeps the running sums sharded inside the loop.
  """
  keep = (
    (lambda t: jax.lax.with_sharding_constraint(t, acc_shardings))
    if acc_shardings is not None
    else (lambda t: t)
  )
  params = jax.tree.map(lambda x: x.astype(grad_dtype), params)
  grad_fn = jax.vmap(
    jax.value_and_grad(loglik),
    in_axes=(None, 0),
    spmd_axis_name=spmd_axes or None,
  )

  def split(x):
    x = x.reshape((x.shape[0] // chunks, chunks) + x.shape[1:])
    return jax.lax.with_sharding_constraint(
      x.swapaxes(0, 1), P(None, *unit_spec)
    )

  def body(carry, unit_chunk):
    acc, ll, n = carry
    values, grads = grad_fn(params, unit_chunk)
    acc = keep(
      jax.tree.map(
        lambda a, g: a + jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0),
        acc,
        grads,
      )
    )
    real = (unit_chunk["loss_mask"].sum(axis=(1, 2)) > 0).sum()
    return (acc, ll + values.sum(), n + real), None

  init = (keep(acc), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  (acc, ll, n), _ = jax.lax.scan(body, init, jax.tree.map(split, units))
  return acc, ll, n


class FisherProgram:
  """The jitted accumulation step of one run config's model and mesh.

  A step takes `units_per_step` units (global), `rows_per_vmap` per device
  per vmap; units are [U, R, T] arrays split over the mesh's batch axes.
  Each device holds `rows_per_vmap` whole gradients of one unit in
  `grad_dtype` (float32; bfloat16 halves that memory and rounds each
  gradient to 8 bits of mantissa before it is squared in float32).
  """

  def __init__(
    self,
    program,
    estimator: Estimator,
    units_per_step: int | None = None,
    rows_per_vmap: int = 1,
    grad_dtype: str = "float32",
  ):
    if rows_per_vmap < 1:
      raise ConfigError(f"--rows-per-vmap must be >= 1, got {rows_per_vmap}")
    self.mesh = program.mesh
    self.estimator = estimator
    self.grad_dtype = jnp.dtype(grad_dtype)
    self.param_shardings = program.param_shardings
    entry = program.batch_sharding.spec[0]
    self.batch_axes = rules.axes_of(entry)
    shards = math.prod(self.mesh.shape[a] for a in self.batch_axes)
    per_vmap = shards * rows_per_vmap
    self.units_per_step = units_per_step or per_vmap
    if self.units_per_step % per_vmap:
      raise ConfigError(
        f"--units-per-step {self.units_per_step} must be a multiple of "
        f"{per_vmap} ({shards} batch shards x --rows-per-vmap "
        f"{rows_per_vmap})"
      )
    self.chunks = self.units_per_step // per_vmap
    self.unit_spec = P(entry)
    self.unit_sharding = NamedSharding(self.mesh, self.unit_spec)
    # Inside a unit the batch dimension is whole: the vmapped unit
    # dimension is the one split over the batch axes.
    cfg = program.cfg.mesh
    self._mesh_cfg = dataclasses.replace(
      cfg, rules=tuple((n, () if n == "act_batch" else a) for n, a in cfg.rules)
    )
    self._loglik = unit_loglik(step_lib.model_forward(program.model))

  def context(self):
    return rules.sharding_context(self.mesh, self._mesh_cfg)

  def put(self, units: dict) -> dict:
    """Process-local numpy units [U/P, R, T] -> global arrays."""
    return {
      k: jax.make_array_from_process_local_data(self.unit_sharding, units[k])
      for k in UNIT_KEYS
    }

  @functools.cached_property
  def zeros(self):
    """params -> a float32 tree of zeros of their shapes and shardings."""
    return jax.jit(
      lambda params: jax.tree.map(
        lambda x: jnp.zeros(x.shape, jnp.float32), params
      ),
      out_shardings=self.param_shardings,
    )

  @functools.cached_property
  def _step(self):
    def step(acc, params, units):
      return squared_grad_sums(
        self._loglik,
        params,
        units,
        acc,
        chunks=self.chunks,
        unit_spec=self.unit_spec,
        spmd_axes=self.batch_axes,
        grad_dtype=self.grad_dtype,
        acc_shardings=self.param_shardings,
      )

    replicated = NamedSharding(self.mesh, P())
    return jax.jit(
      step,
      out_shardings=(self.param_shardings, replicated, replicated),
      donate_argnums=0,
    )

  def step(self, acc, params, units):
    """(acc + sum of squared unit gradients, sum of log p, real units)."""
    with self.context():
      return self._step(acc, params, self.put(units))

  def lower(self, abstract_params, seq_len: int) -> jax.stages.Lowered:
    """The step lowered for abstract params (e.g. on a TPU topology's
    devices, to read its memory before booking the pod)."""
    acc = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
      abstract_params,
    )
    units = {
      k: jax.ShapeDtypeStruct(
        (self.units_per_step, self.estimator.rows_per_unit, seq_len),
        jnp.int32,
        sharding=self.unit_sharding,
      )
      for k in UNIT_KEYS
    }
    with self.context():
      return self._step.lower(acc, abstract_params, units)

  @functools.cached_property
  def divide(self):
    return jax.jit(
      lambda acc, n: jax.tree.map(lambda a: a / n, acc),
      out_shardings=self.param_shardings,
      donate_argnums=0,
    )


def estimate(
  fprog: FisherProgram,
  params,
  batches: Iterable[dict],
  num_steps: int,
  log_every: int = 0,
  progress=None,
):
  """(F, info) from the batches of units (see fisher_data.unit_batches).

  info: units (real units seen, the divisor), seconds, mean_loglik (per
  unit). `progress` is a metrics.ProgressLine (None: no progress lines),
  updated every `log_every` steps (0: about 20 times).
  """
  every = log_every or max(1, num_steps // 20)
  acc = fprog.zeros(params)
  lls, ns = [], []
  start = last = time.perf_counter()
  rows = fprog.units_per_step * fprog.estimator.rows_per_unit
  for k, units in enumerate(batches):
    acc, ll, n = fprog.step(acc, params, units)
    lls.append(ll)
    ns.append(n)
    done = k + 1
    if progress is not None and (done % every == 0 or done == num_steps):
      now = time.perf_counter()
      seen = int(sum(jax.device_get(ns)))
      rate = min(every, done) / max(now - last, 1e-9)
      progress.update(
        done,
        -float(sum(jax.device_get(lls))) / max(seen, 1),
        rate * rows * units["inputs"].shape[-1],
        rate,
        extra=f"{seen} units",
      )
      last = now
  jax.block_until_ready(acc)
  seconds = time.perf_counter() - start
  total = int(sum(jax.device_get(ns)))
  if total == 0:
    raise ConfigError(
      "the Fisher data holds no target tokens; give more sequences or examples"
    )
  fisher = fprog.divide(acc, jnp.float32(total))
  info = {
    "units": total,
    "seconds": seconds,
    "mean_loglik": float(sum(jax.device_get(lls))) / total,
  }
  return fisher, info


# Summary statistics: small replicated results of global reductions, so
# that every process can read them.
def _replicated(fn):
  @functools.cache
  def compiled(mesh):
    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))

  return lambda tree, *args: compiled(jax.tree.leaves(tree)[0].sharding.mesh)(
    tree, *args
  )


@_replicated
def _leaf_means(fisher):
  """{path: mean} of non-layer leaves, {path: [L] means} of layer leaves."""
  flat = dict(layout.flatten(fisher))
  return {
    p: (
      x.mean(axis=tuple(range(1, x.ndim)))
      if p.startswith("layers/")
      else x.mean()
    )
    for p, x in flat.items()
  }


@_replicated
def _count_and_mass(fisher, threshold):
  """Per leaf (and layer: int32 counts of one leaf may overflow): entries
  >= and > threshold, and the mass of those > threshold."""

  def one(x):
    axes = tuple(range(1, x.ndim)) if x.ndim > 1 else None
    count = lambda b: jnp.sum(b, axis=axes, dtype=jnp.int32)
    return (
      count(x >= threshold),
      count(x > threshold),
      jnp.sum(jnp.where(x > threshold, x, 0.0), axis=axes),
      jnp.sum(x, axis=axes),
    )

  return [one(x) for x in jax.tree.leaves(fisher)]


def _totals(fisher, threshold):
  """(count >=, count >, mass >, total mass) as Python numbers."""
  parts = jax.device_get(_count_and_mass(fisher, np.float32(threshold)))
  ge, gt, mass, total = (
    sum(np.asarray(p[i], np.float64).sum() for p in parts) for i in range(4)
  )
  return int(ge), int(gt), float(mass), float(total)


def top_share(fisher, fraction: float = 0.01) -> float:
  """Share of the total mass held by the largest `fraction` of entries.

  Exact: the k-th largest value is found by bisection on the bit pattern
  of non-negative float32s (ordered like the numbers), each probe one
  global reduction over the sharded tree; ties at the threshold count once
  per entry up to k.
  """
  entries = sum(x.size for x in jax.tree.leaves(fisher))
  k = max(1, math.ceil(fraction * entries))
  lo, hi = 0, 0x7F800000  # bit patterns of 0.0 and +inf
  while lo < hi:  # largest t with count(F >= t) >= k
    mid = (lo + hi + 1) // 2
    ge = _totals(fisher, np.array(mid, np.uint32).view(np.float32))[0]
    lo, hi = (mid, hi) if ge >= k else (lo, mid - 1)
  t = np.array(lo, np.uint32).view(np.float32)
  _, gt, mass_gt, total = _totals(fisher, t)
  mass = mass_gt + (k - gt) * float(t)
  return mass / total if total > 0 else 0.0


def summary(fisher) -> dict:
  """JSON-able statistics: entries, total and mean F, the share of the
  total in the top 1% of entries, and mean F per parameter kind (and per
  layer for the stacked layer parameters)."""
  means = jax.device_get(_leaf_means(fisher))
  entries = sum(x.size for x in jax.tree.leaves(fisher))
  sizes = {p: x.size for p, x in layout.flatten(fisher)}
  total = sum(float(np.mean(m)) * sizes[p] for p, m in means.items())
  kinds = {
    p: (
      {
        "mean": float(np.mean(m)),
        "per_layer": [float(v) for v in np.atleast_1d(m)],
      }
      if p.startswith("layers/")
      else {"mean": float(m)}
    )
    for p, m in means.items()
  }
  return {
    "entries": int(entries),
    "total": total,
    "mean": total / entries if entries else 0.0,
    "top1pct_share": top_share(fisher, 0.01),
    "per_kind": kinds,
  }
