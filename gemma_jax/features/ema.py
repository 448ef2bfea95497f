"""Exponential moving average (EMA) of the weights, kept during training.

    ema = init_ema(params)                               # at step 0
    ...after each successful optimizer update number n = 1, 2, ...:
    ema = ema_update(ema, params, ema_decay(0.999, n))

The EMA is float32 whatever the parameter dtype: with decay 0.999 one
update moves it by 0.1% of the gap, below bfloat16's resolution (2^-8), so a
bfloat16 EMA would stay where it started.

Initialisation and bias. The EMA starts as a copy of the parameters, and
`ema_decay(decay, n)` gives update n the rate (1 - d) / (1 - d^n) instead
of 1 - d. That makes the EMA after n updates exactly

    sum_{s=1..n} (1 - d) d^(n-s) theta_s / (1 - d^n),

the normalised exponentially weighted average of the parameters after
updates 1..n: Adam's bias correction (a zero-started average divided by
1 - d^n), written as a recursion so that the stored EMA is always the
corrected one and the initial weights drop out at update 1 (rate 1). With
`debias=False` the rate is the plain 1 - d and the starting weights keep
weight d^n: the choice when the EMA should stay anchored to a pretrained
start (WARP's EMA anchor, arXiv 2406.16768), rather than forget a random
initialisation.
"""

import jax
import jax.numpy as jnp

from gemma_jax.features.base import Extra, Feature, Variant
from gemma_jax.train import step as step_lib


def init_ema(params):
  """A float32 copy of `params` (any pytree of arrays)."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)


def ema_decay(decay: float, count, debias: bool = True) -> jax.Array:
  """The decay to use for update number `count` (1 for the first; may be a
  traced int): 1 - (1 - d) / (1 - d^count) when `debias`, else d."""
  d = jnp.float32(decay)
  if not debias:
    return d
  count = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
  return 1.0 - (1.0 - d) / (1.0 - d**count)


def ema_update(ema_params, params, decay):
  """ema + (1 - decay) (params - ema), leaf by leaf in float32.

  decay: a float or a float32 scalar (e.g. from `ema_decay`). Written, like
  a careful lerp, so that the EMA stays bitwise unchanged when params ==
  ema and becomes bitwise the params when decay is 0 (the first debiased
  update).
  """
  rate = 1.0 - jnp.asarray(decay, jnp.float32)

  def one(e, p):
    p = jnp.asarray(p, jnp.float32)
    gap = p - e
    return jnp.where(rate < 0.5, e + rate * gap, p - (1.0 - rate) * gap)

  return jax.tree.map(one, ema_params, params)


def params_of(program, state):
  """The state's EMA as params: their dtype and sharding (to evaluate or
  export it)."""
  feature = next(f for f in program.features if isinstance(f, EMA))
  return feature.as_params(program, state.extras[EMA.name])


class EMA(Feature):
  """train.ema_decay > 0: a float32 EMA of the trained params in
  TrainState.extras["ema"], sharded like the optimizer moments, moved
  after every kept step (debiased by the applied-update count unless
  train.ema_debias is false); evaluated beside the params (eval_ema/...)
  and exported to WORKDIR/params_ema."""

  name = "ema"

  def __init__(self, cfg):
    super().__init__(cfg)
    self._cast = None  # compiled once: EMA -> params' dtypes and shardings

  def as_params(self, program, ema):
    if self._cast is None:
      dtypes = jax.tree.map(lambda x: x.dtype, program.abstract_state.params)
      self._cast = jax.jit(
        lambda ema: jax.tree.map(lambda e, d: e.astype(d), ema, dtypes),
        out_shardings=program.param_shardings,
      )
    return self._cast(ema)

  def extras(self, program) -> Extra:
    t = self.cfg.train

    def update(ema, params, opt_state):
      count = step_lib.applied_updates(opt_state)
      return ema_update(
        ema, params, ema_decay(t.ema_decay, count, t.ema_debias)
      )

    return Extra(init=init_ema, update=update, specs=program.moment_specs)

  def variants(self, program, state) -> list[Variant]:
    ema = self.as_params(program, state.extras[self.name])
    return [Variant("ema", "EMA", "EMA of the params", ema)]
