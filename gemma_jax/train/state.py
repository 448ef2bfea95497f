"""The training state: one immutable pytree that the train step maps to the
next, and how a fresh one is made."""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gemma_jax.model import ModelConfig, Transformer
from gemma_jax.train import ema as ema_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # int32 [], updates attempted so far
  params: Any
  opt_state: Any
  rng: jax.Array                # uint32 [2], raw PRNG key
  nonfinite_in_row: jax.Array   # int32 [], consecutive skipped steps
  # float32 EMA of the params when train.ema_decay > 0; None (no leaves, so
  # the layout of an EMA-less state is unchanged) otherwise.
  ema: Any = None


@functools.lru_cache(maxsize=16)
def abstract_params(model_cfg: ModelConfig):
  """ShapeDtypeStructs of the params, boxed with their logical axis names."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(
      lambda key, t: Transformer(model_cfg).init(key, t)["params"],
      jax.ShapeDtypeStruct((2,), jnp.uint32), tokens)


def init_params(model_cfg: ModelConfig, key: jax.Array):
  """Random params (unboxed) from a raw uint32 [2] key."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(Transformer(model_cfg).init(key, tokens)["params"])


def init_state(params, key: jax.Array,
               optimizer: optax.GradientTransformation,
               ema: bool = False) -> TrainState:
  """Step 0 from given params: a fresh optimizer state, the RNG `key`, and
  with `ema` an EMA starting at the params."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=key,
                    nonfinite_in_row=jnp.zeros((), jnp.int32),
                    ema=ema_lib.init_ema(params) if ema else None)
