"""GGML's Q4_0 and Q8_0 as QAT schemes: the fake-quantized weights equal
what GGML's reference quantiser (`gguf.quants`, the numpy copy of
ggml-quants.c) makes of the same weights, bit for bit, and the gradient
passes straight through."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.model import quant
from gemma_jax.model.quant import QuantConfig

gguf = pytest.importorskip("gguf")

SCHEMES = {
  "q4_0": (4, gguf.GGMLQuantizationType.Q4_0),
  "q8_0": (8, gguf.GGMLQuantizationType.Q8_0),
}


def _ggml(w: np.ndarray, scheme: str) -> np.ndarray:
  """GGML's dequantize(quantize(w)) (blocks of 32 along the last axis)."""
  qtype = SCHEMES[scheme][1]
  return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _fake(w, scheme):
  return quant.fake_quant(w, -1, SCHEMES[scheme][0], 32, scheme)


def _edge_blocks() -> np.ndarray:
  """One block of 32 per row: the cases a rounding rule gets wrong."""
  rng = np.random.default_rng(1)
  half_steps = (np.arange(32) - 16 + 0.5) * 0.25  # x / d on .5 exactly
  rows = [
    np.zeros(32),  # d = 0: q = 8 (Q4_0), 0 (Q8_0), w~ = 0
    np.full(32, 3.0),  # every entry the block's extreme
    np.r_[2.0, -2.0, rng.uniform(-1, 1, 30)],  # tie, positive first
    np.r_[-2.0, 2.0, rng.uniform(-1, 1, 30)],  # tie, negative first
    np.r_[5.0, rng.uniform(-5, 5, 31)],  # +max: Q4_0's -8 level
    np.r_[-5.0, rng.uniform(-5, 5, 31)],  # -max
    np.r_[-8 * 0.25, half_steps[1:]],  # Q4_0: d = 0.25, ties at .5
    np.r_[127 * 0.5, (np.arange(31) - 15 + 0.5) * 0.5],  # Q8_0 ties
    rng.normal(size=32) * 1e-5,  # d below fp16's normal range
    rng.normal(size=32) * 1e-30,  # d flushed to 0 in fp16
    np.r_[1e-3, np.zeros(31)],  # one nonzero entry
    rng.normal(size=32) * 1e3,
  ]
  return np.asarray(rows, np.float32)


@pytest.mark.parametrize("scheme", ["q4_0", "q8_0"])
@pytest.mark.parametrize("scale", [1.0, 1e-2, 1e-6, 30.0])
def test_random_blocks_equal_ggml_bit_for_bit(scheme, scale):
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((48, 256)) * scale).astype(np.float32)
  want = _ggml(w, scheme)
  bits = SCHEMES[scheme][0]
  q, d = quant.quantize(jnp.asarray(w), 1, bits, 32, scheme)
  exact = np.asarray(quant.dequantize(q, d, 1, 32))
  np.testing.assert_array_equal(exact.view(np.uint32), want.view(np.uint32))
  # The QAT forward's weight: the same values (it adds w - w = +0, so a
  # -0.0 of GGML's reads +0.0 here; equal as numbers).
  np.testing.assert_array_equal(np.asarray(_fake(jnp.asarray(w), scheme)), want)


@pytest.mark.parametrize("scheme", ["q4_0", "q8_0"])
def test_many_blocks_under_jit_equal_ggml_bit_for_bit(scheme):
  # 131k blocks: enough that some x / d land within a rounding of a half
  # step, where computing d = amax / 127 as amax * (1 / 127) (XLA's rewrite
  # of a division by a constant) flips q in a few blocks.
  w = np.random.default_rng(2).normal(size=(1024, 4096)).astype(np.float32)
  w *= np.float32(0.05)
  bits = SCHEMES[scheme][0]
  q, d = jax.jit(quant.quantize, static_argnums=(1, 2, 3, 4))(
    jnp.asarray(w), 1, bits, 32, scheme
  )
  got = np.asarray(quant.dequantize(q, d, 1, 32))
  np.testing.assert_array_equal(
    got.view(np.uint32), _ggml(w, scheme).view(np.uint32)
  )


@pytest.mark.parametrize("scheme", ["q4_0", "q8_0"])
def test_edge_case_blocks_equal_ggml_bit_for_bit(scheme):
  w = _edge_blocks()
  want = _ggml(w, scheme)
  q, d = quant.quantize(jnp.asarray(w), 1, SCHEMES[scheme][0], 32, scheme)
  got = np.asarray(quant.dequantize(q, d, 1, 32))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  np.testing.assert_array_equal(np.asarray(_fake(jnp.asarray(w), scheme)), want)


def test_q4_0_uses_sixteen_levels_with_the_extreme_at_minus_eight():
  w = _edge_blocks()
  q, d = quant.quantize(jnp.asarray(w), 1, 4, 32, "q4_0")
  q = np.asarray(q).astype(np.int8)
  assert q.min() == -8 and q.max() == 7
  # Row 4: +5 is the extreme, so d = 5 / -8 < 0 and it is stored as -8.
  assert q[4, 0] == -8 and np.asarray(d)[4, 0] == np.float16(5 / -8)
  assert (q[0] == 0).all() and np.asarray(d)[0, 0] == 0  # zero block
  # The scale is an fp16 value (GGML stores it so; the forward uses it).
  d = np.asarray(d)
  np.testing.assert_array_equal(d, d.astype(np.float16).astype(np.float32))


def test_ggml_schemes_block_along_the_contraction_axis_of_any_layout():
  # The attention output [N, H, D] contracts N and H: blocks run along H.
  w = jax.random.normal(jax.random.key(0), (4, 64, 48))
  q, d = quant.quantize(w, (0, 1), 4, 32, "q4_0")
  assert d.shape == (4, 2, 48)
  rows = np.asarray(w).transpose(2, 0, 1).reshape(48, 256)  # [D, N*H]
  got = np.asarray(quant.dequantize(q, d, (0, 1), 32))
  want = _ggml(rows, "q4_0").reshape(48, 4, 64).transpose(1, 2, 0)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scheme", ["q4_0", "q8_0"])
def test_the_gradient_passes_straight_through(scheme):
  w = jax.random.normal(jax.random.key(1), (8, 64))
  g = jax.random.normal(jax.random.key(2), (8, 64))
  bits = SCHEMES[scheme][0]
  value, grad = jax.value_and_grad(
    lambda w: jnp.sum(quant.fake_quant(w, 1, bits, 32, scheme) * g)
  )(w)
  np.testing.assert_array_equal(grad, g)
  w_q = _ggml(np.asarray(w), scheme)
  np.testing.assert_allclose(value, np.sum(w_q * np.asarray(g)), rtol=1e-5)


def test_ggml_schemes_fix_bits_and_block_size():
  assert QuantConfig(scheme="q4_0").bits == 4
  assert QuantConfig(scheme="q8_0", bits=8).block_size == 32
  with pytest.raises(ConfigError, match="scheme: q8_0 .* set bits 8"):
    QuantConfig(scheme="q8_0")
  with pytest.raises(
    ConfigError, match="block size 32 .*got bits 4, block size 64"
  ):
    QuantConfig(scheme="q4_0", block_size=64)
  with pytest.raises(ConfigError, match="scheme: unknown 'q4_k'; valid"):
    QuantConfig(scheme="q4_k")  # type: ignore[arg-type]


def test_a_q4_0_int_model_holds_the_qat_forwards_weights():
  # quantize_params (what `gemma-jax quantize` writes) with scheme q4_0
  # gives, dequantized, exactly the QAT forward's weights.
  from gemma_jax.model.testing import TINY_GEMMA2_WIDE

  cfg = dataclasses.replace(
    TINY_GEMMA2_WIDE,
    head_dim=32,
    quant=QuantConfig(scheme="q4_0", targets=("attn", "mlp", "embed")),
  )
  held = dataclasses.replace(
    cfg, quant=dataclasses.replace(cfg.quant, weights="int")
  )
  from gemma_jax.checkpoint.testing import random_params

  params = random_params(cfg)
  # Under jit: a few compiles, not one per eager op and shape.
  ints = jax.jit(quant.quantize_params, static_argnums=1)(params, held)
  back = jax.jit(quant.dequantize_params, static_argnums=(1, 2))(
    ints, held, jnp.float32
  )
  fake_quant = jax.jit(quant.fake_quant, static_argnums=(1, 2, 3, 4))
  for path, (in_axis, _) in quant.quantized_leaves(cfg).items():
    w = quant.get_path(params, path)
    fake = fake_quant(jnp.asarray(w), in_axis, 4, 32, "q4_0")
    np.testing.assert_array_equal(quant.get_path(back, path), fake)
