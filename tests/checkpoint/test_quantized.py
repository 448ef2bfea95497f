"""The quantized checkpoint: int4 packed two per byte, scales beside, and a
round trip that gives back the very integers."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from gemma_jax.checkpoint import layout, quantized
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model import quant
from gemma_jax.model.quant import QuantConfig
from gemma_jax.model.testing import TINY_GEMMA2_MQA

CFG = TINY_GEMMA2_MQA
# Under jit: one program per config, not one per eager op and weight shape.
quantize_params = jax.jit(quant.quantize_params, static_argnums=1)


def test_int4_packing_puts_even_entries_in_the_low_nibble():
  values = np.array([[1, -2, 7, -7, 0, -8]], np.int8)
  packed = quantized.pack_int4(values)
  np.testing.assert_array_equal(packed, [[0xE1, 0x97, 0x80]])
  back = quantized.unpack_int4(packed)
  assert back.dtype == ml_dtypes.int4
  np.testing.assert_array_equal(back.astype(np.int8), values)


@pytest.mark.slow
@pytest.mark.parametrize("bits,block", [(4, 16), (8, None)])
def test_a_quantized_checkpoint_round_trips_the_integers(tmp_path, bits, block):
  cfg = dataclasses.replace(
    CFG,
    quant=QuantConfig(
      bits=bits,
      block_size=block,
      targets=("attn", "mlp", "embed"),
      weights="int",
    ),
  )
  params = quantize_params(random_params(CFG), cfg)
  size = quantized.save(tmp_path / "q", params, cfg)
  loaded, loaded_cfg = quantized.load(tmp_path / "q")
  assert loaded_cfg == cfg and quantized.is_quantized(tmp_path / "q")
  for path, x in layout.flatten(params):
    y = layout.flatten(loaded)
    got = dict(y)[path]
    assert got.dtype == x.dtype, path
    np.testing.assert_array_equal(
      np.asarray(got).astype(np.float32), np.asarray(x).astype(np.float32)
    )
  # The file holds the documented tensors: packed int4 is half a byte each.
  with safe_open(str(tmp_path / "q" / quantized.WEIGHTS), "numpy") as f:
    linear = f.get_slice("layers/mlp/linear/w")
    assert linear.get_dtype() == ("U8" if bits == 4 else "I8")
    assert linear.get_shape() == ([2, 64, 16] if bits == 4 else [2, 64, 32])
    assert f.get_slice("layers/mlp/linear/scale").get_dtype() == "F32"
    assert f.metadata() == {"format": quantized.FORMAT}
  meta = json.loads((tmp_path / "q" / "model_config.json").read_text())
  assert meta["model"]["quant"]["weights"] == "int"
  # Bytes: bits/8 per quantized weight, 4 per scale and norm, a header.
  shapes = layout.param_shapes(CFG)
  weights = sum(np.prod(shapes[p]) for p in quant.quantized_leaves(cfg))
  floats = sum(
    np.prod(s)
    for p, s in layout.param_shapes(CFG).items()
    if p not in quant.quantized_leaves(cfg)
  ) + sum(
    np.prod(x.shape)
    for p, x in layout.flatten(params)
    if p.endswith("scale") and p not in shapes
  )
  assert 0 < size - (weights * bits / 8 + floats * 4) < 4096


def test_only_models_with_integer_weights_are_written(tmp_path):
  cfg = dataclasses.replace(CFG, quant=QuantConfig(block_size=16))
  with pytest.raises(ConfigError, match="weights: int"):
    quantized.save(tmp_path / "q", random_params(CFG), cfg)


@pytest.mark.slow
def test_a_config_without_integer_weights_is_refused_on_load(tmp_path):
  cfg = dataclasses.replace(
    CFG, quant=QuantConfig(block_size=16, weights="int")
  )
  quantized.save(tmp_path / "q", quantize_params(random_params(CFG), cfg), cfg)
  path = tmp_path / "q" / "model_config.json"
  meta = json.loads(path.read_text())
  meta["model"]["quant"] = None
  path.write_text(json.dumps(meta))
  with pytest.raises(
    CheckpointError,
    match="has no quant section with "
    "weights: int; write it again with gemma-jax quantize",
  ):
    quantized.load(tmp_path / "q")


@pytest.mark.slow
def test_a_quantized_model_runs_from_the_file(tmp_path):
  from gemma_jax.model import Transformer

  cfg = dataclasses.replace(
    CFG, quant=QuantConfig(block_size=16, weights="int")
  )
  params = quantize_params(random_params(CFG), cfg)
  quantized.save(tmp_path / "q", params, cfg)
  loaded, cfg = quantized.load(tmp_path / "q")
  tokens = jnp.arange(8)[None] % 64
  logits = jax.jit(Transformer(cfg).apply)({"params": loaded}, tokens)
  assert logits.shape == (1, 8, 64) and np.isfinite(logits).all()
