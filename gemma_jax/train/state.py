"""The training state: one immutable pytree that the train step maps to the
next, how a fresh one is made, and whether one is worth keeping.

Is a training state worth keeping? Checksums and the goodness rule.

Every checkpoint records, in its meta, whether it is *good* and why:

    good: {"good": true, "params_finite": true, "skipped_in_row": 0,
           "loss": 3.91, "best_recent_loss": 3.80, "rule": RULE}

A checkpoint is good when its params are all finite, the step that made it
was applied (not skipped as non-finite), and the loss of its params on the
last training batch is finite and not diverging: a loss is diverging when it
is above both DIVERGENCE_FACTOR x the lowest loss of the last RECENT_LOGS
logged steps and ln(vocab size), the loss of a uniform guess (so that a
model at its random start, or one whose mixture moved to a harder source, is
not called diverged).

Checksums: for every array of the state, the sum of its raw bits as uint32
(wrapping). Integer addition is exact and order-free, so the checksum of an
array does not depend on its sharding: a checkpoint restored onto another
mesh has the checksums it was saved with, unless a file was damaged.
"""

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gemma_jax.checkpoint import publish
from gemma_jax.model import ModelConfig, Transformer


@flax.struct.dataclass
class TrainState:
  # Leaves are arrays, or (for the same tree of shardings, specs or
  # shapes) whatever describes them; hence Any.
  step: Any  # int32 [], updates attempted so far
  params: Any
  opt_state: Any
  rng: Any  # uint32 [2], raw PRNG key
  nonfinite_in_row: Any  # int32 [], consecutive skipped steps
  # Per-step state of features, {feature name: tree} (see
  # gemma_jax.features.base.Extra); None (no leaves, so the layout of a
  # state without any is unchanged) when no feature keeps one.
  extras: Any = None


@functools.lru_cache(maxsize=16)
def abstract_params(model_cfg: ModelConfig):
  """ShapeDtypeStructs of the params, boxed with their logical axis names."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(
    lambda key, t: Transformer(model_cfg).init(key, t)["params"],
    jax.ShapeDtypeStruct((2,), jnp.uint32),
    tokens,
  )


def init_params(model_cfg: ModelConfig, key: jax.Array):
  """Random params (unboxed) from a raw uint32 [2] key."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(Transformer(model_cfg).init(key, tokens)["params"])


def init_state(
  params,
  key: jax.Array,
  optimizer: optax.GradientTransformation,
  extras_init=None,
) -> TrainState:
  """Step 0 from given params: a fresh optimizer state, the RNG `key`, and
  the extras extras_init(params) (None without)."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    rng=key,
    nonfinite_in_row=jnp.zeros((), jnp.int32),
    extras=None if extras_init is None else extras_init(params),
  )


# Is a state worth keeping?
DIVERGENCE_FACTOR = 2.0
RECENT_LOGS = 50
RULE = (
  f"params finite, step applied, and the last batch's loss finite and "
  f"not above both {DIVERGENCE_FACTOR:g} x the lowest of the last "
  f"{RECENT_LOGS} logged losses and ln(vocab_size)"
)


def _bits_sum(x: jax.Array) -> jax.Array:
  """uint32 sum of the raw bits of `x` (any dtype), wrapping."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = jnp.dtype(x.dtype).itemsize
  if size in (1, 2, 4):
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  else:  # 8 bytes: two uint32 words
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.sum(bits, dtype=jnp.uint32)


_checksums = jax.jit(lambda leaves: [_bits_sum(x) for x in leaves])


def checksums(tree) -> dict[str, int]:
  """{array path: uint32 sum of its bits} of a pytree of arrays.

  One jitted reduction per set of devices the leaves live on (a state's
  arrays normally share one mesh; the step counter may not).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  groups: dict[frozenset[jax.Device] | None, list[int]] = {}
  for i, (_, x) in enumerate(flat):
    devices = (
      frozenset(x.sharding.device_set) if isinstance(x, jax.Array) else None
    )
    groups.setdefault(devices, []).append(i)
  sums = [0] * len(flat)
  for indices in groups.values():
    leaves = [flat[i][1] for i in indices]
    for i, v in zip(indices, jax.device_get(_checksums(leaves))):
      sums[i] = int(v)
  return {jax.tree_util.keystr(p): v for (p, _), v in zip(flat, sums)}


def params_finite(params) -> bool:
  """Whether every float in `params` is finite: one device reduction, the
  same compiled program as the check every writer makes before it writes
  (checkpoint.publish), so that a run's exports compile none of their own."""
  return publish.first_nonfinite(params) is None


def mismatched(saved: dict[str, int], now: dict[str, int]) -> list[str]:
  """Paths whose checksum differs (arrays missing on either side count)."""
  return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def is_diverging(loss: float, recent: list[float], vocab_size: int) -> bool:
  """The documented rule (module docstring) for a finite `loss`."""
  finite = [
    x for x in recent[-RECENT_LOGS:] if x is not None and math.isfinite(x)
  ]
  if not finite:
    return False
  return loss > DIVERGENCE_FACTOR * min(finite) and loss > math.log(vocab_size)


def judge(
  params_finite: bool,
  skipped_in_row: int,
  loss: float | None,
  recent: list[float],
  vocab_size: int,
) -> dict:
  """The `good` record of a checkpoint (module docstring)."""
  loss_ok = (
    loss is not None
    and math.isfinite(loss)
    and not is_diverging(loss, recent, vocab_size)
  )
  finite = [
    x for x in recent[-RECENT_LOGS:] if x is not None and math.isfinite(x)
  ]
  return {
    "good": bool(params_finite and skipped_in_row == 0 and loss_ok),
    "params_finite": bool(params_finite),
    "skipped_in_row": int(skipped_in_row),
    "loss": loss if loss is not None and math.isfinite(loss) else None,
    "best_recent_loss": min(finite) if finite else None,
    "rule": RULE,
  }


def why_not(good: dict) -> str:
  """Why a `good` record says no, in a few words."""
  if not good.get("params_finite", True):
    return "its params are not finite"
  if good.get("skipped_in_row"):
    return f"the {good['skipped_in_row']} steps before it were skipped"
  loss = good.get("loss")
  if loss is None:
    return "the loss of its params is not finite"
  return (
    f"the loss of its params ({loss:.4g}) is diverging (lowest "
    f"recent {good.get('best_recent_loss')})"
  )
