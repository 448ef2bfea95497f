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


@flax.struct.dataclass
class TrainState:
  step: jax.Array               # int32 [], updates attempted so far
  params: Any
  opt_state: Any
  rng: jax.Array                # uint32 [2], raw PRNG key
  nonfinite_in_row: jax.Array   # int32 [], consecutive skipped steps


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
               optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0 from given params: a fresh optimizer state, the RNG `key`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=key,
                    nonfinite_in_row=jnp.zeros((), jnp.int32))
