"""EMA of the weights: the update rule, its initialisation and debiasing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.features import ema

update = jax.jit(ema.ema_update)
decay_at = jax.jit(ema.ema_decay, static_argnames="debias")


def test_update_is_the_exponential_moving_average():
  e = {"w": jnp.array([1.0, 2.0]), "b": {"x": jnp.array(3.0)}}
  p = {"w": jnp.array([3.0, 0.0]), "b": {"x": jnp.array(-1.0)}}
  out = update(e, p, 0.9)
  np.testing.assert_allclose(out["w"], [1.2, 1.8], rtol=1e-6)
  np.testing.assert_allclose(out["b"]["x"], 2.6, rtol=1e-6)


def test_ema_is_float32_and_moves_where_bfloat16_would_not():
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  e = ema.init_ema(params)
  assert e["w"].dtype == jnp.float32
  moved = update(e, {"w": jnp.full((4,), 1.5, jnp.bfloat16)}, 0.999)
  assert moved["w"].dtype == jnp.float32
  np.testing.assert_allclose(moved["w"], 1.0005, rtol=1e-6)
  # The same update in bfloat16 is lost to rounding.
  assert jnp.bfloat16(1.0) + jnp.bfloat16(0.0005) == jnp.bfloat16(1.0)


def test_constant_params_keep_the_ema_bitwise():
  x = jax.random.normal(jax.random.key(0), (1000,))
  e = {"w": x}
  for n in range(1, 20):
    e = update(e, {"w": x}, decay_at(0.99, n))
  np.testing.assert_array_equal(e["w"], x)


def test_debiased_ema_is_the_normalised_weighted_average():
  d, steps = 0.9, 12
  thetas = np.random.default_rng(0).standard_normal((steps, 5))
  e = ema.init_ema({"w": jnp.full((5,), 100.0)})  # the start drops out
  for n in range(1, steps + 1):
    e = update(e, {"w": thetas[n - 1]}, decay_at(d, n))
    if n == 1:
      np.testing.assert_array_equal(e["w"], thetas[0].astype(np.float32))
  weights = (1 - d) * d ** np.arange(steps - 1, -1, -1) / (1 - d**steps)
  np.testing.assert_allclose(e["w"], weights @ thetas, rtol=1e-5, atol=1e-6)


def test_plain_ema_keeps_the_start_with_weight_decay_to_the_n():
  d, steps = 0.5, 3
  e = {"w": jnp.array([8.0])}
  for _ in range(steps):
    e = update(e, {"w": jnp.array([0.0])}, ema.ema_decay(d, 1, debias=False))
  assert float(e["w"][0]) == pytest.approx(8.0 * d**steps)
