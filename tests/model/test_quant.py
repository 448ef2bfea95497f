"""Weight quantization: the int grid, scale layouts, the straight-through
estimator, and a QAT forward pass equal to the integer model's."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gemma_jax.errors import ConfigError
from gemma_jax.model import Transformer, quant
from gemma_jax.model.quant import QuantConfig
from gemma_jax.model.testing import TINY_GEMMA2_WIDE, init_params

TINY = dataclasses.replace(TINY_GEMMA2_WIDE, head_dim=32)


@pytest.mark.slow
def test_int4_values_lie_on_a_symmetric_grid_and_the_block_max_is_exact():
  w = jax.random.normal(jax.random.key(0), (6, 64))
  q, scale = quant.quantize(w, 1, bits=4, block_size=32)
  assert q.dtype == jnp.int4 and scale.shape == (6, 2)
  values = np.asarray(q).astype(np.int8)
  assert values.min() >= -7 and values.max() <= 7
  # The largest |w| of each block is represented exactly: q = +-7.
  blocks = np.abs(values).reshape(6, 2, 32).max(axis=-1)
  assert (blocks == 7).all()
  back = quant.dequantize(q, scale, 1, 32)
  # Rounding error at most half a step of the block's scale.
  step = np.repeat(np.asarray(scale), 32, axis=1)
  assert (np.abs(np.asarray(back - w)) <= step / 2 + 1e-6).all()
  neg_q, _ = quant.quantize(-w, 1, bits=4, block_size=32)
  np.testing.assert_array_equal(np.asarray(neg_q).astype(np.int8), -values)


@pytest.mark.slow
@pytest.mark.parametrize(
  "block,in_axis,shape,expected",
  [
    (None, 1, (4, 64, 32), (4, 1, 32)),  # q: per (head, head_dim)
    (32, 1, (4, 64, 32), (4, 2, 32)),  # blocks along D
    (None, (0, 1), (4, 32, 64), (1, 1, 64)),  # attn output: per D
    (16, (0, 1), (4, 32, 64), (4, 2, 64)),  # blocks along H, per head
  ],
)
def test_scale_shapes_follow_the_contraction_axis(
  block, in_axis, shape, expected
):
  w = jnp.ones(shape)
  _, scale = quant.quantize(w, in_axis, bits=8, block_size=block)
  assert scale.shape == expected == quant.scale_shape(shape, in_axis, block)


@pytest.mark.slow
def test_fake_quant_passes_the_gradient_straight_through():
  w = jax.random.normal(jax.random.key(1), (8, 32))
  g = jax.random.normal(jax.random.key(2), (8, 32))
  value, grad = jax.value_and_grad(
    lambda w: jnp.sum(quant.fake_quant(w, 1, 4, 16) * g)
  )(w)
  np.testing.assert_array_equal(grad, g)
  w_q = quant.dequantize(*quant.quantize(w, 1, 4, 16), 1, 16)
  np.testing.assert_allclose(value, jnp.sum(w_q * g), rtol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens):
  return Transformer(cfg).apply({"params": params}, tokens)


@pytest.mark.slow
def test_qat_forward_equals_the_integer_model_and_differs_from_float():
  q = QuantConfig(bits=4, block_size=16, targets=("attn", "mlp", "embed"))
  params = init_params(TINY)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 256)
  qat = dataclasses.replace(TINY, quant=q)
  held_int = dataclasses.replace(
    TINY, quant=dataclasses.replace(q, weights="int")
  )
  int_params = jax.jit(quant.quantize_params, static_argnums=1)(
    params, held_int
  )
  assert int_params["layers"]["mlp"]["linear"]["w"].dtype == jnp.int4
  assert int_params["embedder"]["embedding_scale"].shape == (256, 4)
  logits_qat = _logits(qat, params, tokens)
  np.testing.assert_allclose(
    _logits(held_int, int_params, tokens), logits_qat, atol=1e-5
  )
  assert np.abs(_logits(TINY, params, tokens) - logits_qat).max() > 1e-2
  back = jax.jit(quant.dequantize_params, static_argnums=(1, 2))(
    int_params, held_int, jnp.float32
  )
  np.testing.assert_allclose(_logits(TINY, back, tokens), logits_qat, atol=1e-5)


def test_a_group_left_out_of_targets_stays_float():
  qat = dataclasses.replace(
    TINY, quant=QuantConfig(targets=("mlp",), weights="int")
  )
  shapes = jax.eval_shape(
    Transformer(qat).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
  )["params"]
  layers = nn.meta.unbox(shapes)["layers"]
  assert layers["mlp"]["linear"]["w"].dtype == jnp.int4
  assert layers["attn"]["q_einsum"]["w"].dtype == jnp.float32
  assert "scale" not in layers["attn"]["q_einsum"]


def test_bad_quant_configs_name_the_key_and_the_choices():
  with pytest.raises(
    ConfigError, match="unknown group 'norms'; valid groups: attn, mlp, embed"
  ):
    QuantConfig(targets=("norms",))
  with pytest.raises(
    ConfigError,
    match=r"block_size: 48 does not divide .* "
    r"layers/attn/q_einsum \(size 64",
  ):
    dataclasses.replace(TINY, quant=QuantConfig(block_size=48))
