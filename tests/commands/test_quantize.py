"""gemma-jax quantize, and a quantized model or an adapter through score and
convert: the int4 file runs exactly as the QAT forward pass."""

import dataclasses

import numpy as np
import pytest

from gemma_jax import cli
from gemma_jax.checkpoint import adapter, layout, native
from gemma_jax.checkpoint.testing import random_arrays, random_params
from gemma_jax.model import lora
from gemma_jax.model.quant import QuantConfig
from gemma_jax.model.testing import TINY_GEMMA2_MQA

CFG = TINY_GEMMA2_MQA


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("quantize")
  params = random_params(CFG, scale=0.2)
  native.save(tmp / "float", params, CFG)
  np.save(tmp / "tokens.npy", np.arange(24, dtype=np.int32).reshape(2, 12))
  return tmp, params


def score(tmp, checkpoint, *extra):
  out = tmp / "out.npz"
  assert (
    cli.main(
      [
        "score",
        "--checkpoint",
        str(checkpoint),
        "--tokens",
        str(tmp / "tokens.npy"),
        "--out",
        str(out),
        *map(str, extra),
      ]
    )
    == 0
  )
  return np.load(out)["logits"]


@pytest.mark.slow
def test_the_int4_file_scores_as_the_qat_model_and_exports_to_hf(ckpt):
  tmp, params = ckpt
  assert (
    cli.main(
      [
        "quantize",
        str(tmp / "float"),
        str(tmp / "int4"),
        "--block-size",
        "16",
        "--targets",
        "attn,mlp,embed",
      ]
    )
    == 0
  )
  qat = dataclasses.replace(
    CFG, quant=QuantConfig(block_size=16, targets=("attn", "mlp", "embed"))
  )
  native.save(tmp / "qat", params, qat)
  int4 = score(tmp, tmp / "int4")
  np.testing.assert_allclose(int4, score(tmp, tmp / "qat"), atol=1e-5)
  assert np.abs(int4 - score(tmp, tmp / "float")).max() > 1e-3
  # Dequantized for Hugging Face, and back: the same model.
  assert (
    cli.main(
      [
        "convert",
        "--from",
        "quantized",
        "--to",
        "hf",
        str(tmp / "int4"),
        str(tmp / "hf"),
      ]
    )
    == 0
  )
  assert (
    cli.main(
      [
        "convert",
        "--from",
        "hf",
        "--to",
        "native",
        str(tmp / "hf"),
        str(tmp / "back"),
      ]
    )
    == 0
  )
  np.testing.assert_allclose(score(tmp, tmp / "back"), int4, atol=1e-5)


@pytest.mark.slow
def test_an_adapter_scores_on_its_base_and_merges_by_convert(ckpt):
  tmp, _ = ckpt
  adapted = dataclasses.replace(CFG, lora=lora.LoraConfig(rank=2, alpha=4.0))
  adapter.save(
    tmp / "adapter",
    layout.unflatten(random_arrays(lora.adapter_paths(adapted), 1, 0.2)),
    adapted,
  )
  with_adapter = score(tmp, tmp / "float", "--adapter", tmp / "adapter")
  assert (
    cli.main(
      [
        "convert",
        "--from",
        "native",
        "--to",
        "native",
        "--adapter",
        str(tmp / "adapter"),
        str(tmp / "float"),
        str(tmp / "merged"),
      ]
    )
    == 0
  )
  assert native.load_config(tmp / "merged") == CFG
  np.testing.assert_allclose(
    score(tmp, tmp / "merged"), with_adapter, atol=1e-4
  )


def test_bad_quantize_flags_are_usage_errors(ckpt, capsys):
  tmp, _ = ckpt
  for flags, message in [
    (
      ["--block-size", "12"],
      "--block-size: 12 does not divide the contraction axis",
    ),
    (["--block-size", "big"], "neither an integer nor 'channel'"),
    (["--targets", "attn,norm"], "unknown group 'norm'"),
  ]:
    assert (
      cli.main(["quantize", str(tmp / "float"), str(tmp / "bad"), *flags]) == 2
    )
    assert message in capsys.readouterr().err


def test_scheme_q4_0_writes_ggmls_rounding_as_the_qat_forward_sees_it(
  ckpt, capsys
):
  import jax.numpy as jnp

  from gemma_jax.checkpoint import quantized
  from gemma_jax.model import quant

  tmp, params = ckpt
  src, dst = str(tmp / "float"), str(tmp / "q4_0")
  argv = ["quantize", src, dst, "--scheme", "q4_0", "--targets", "mlp"]
  assert cli.main(argv) == 0
  ints, cfg = quantized.load(dst)
  assert cfg.quant == QuantConfig(
    scheme="q4_0", targets=("mlp",), weights="int"
  )
  back = quant.dequantize_params(ints, cfg, jnp.float32)
  for path, (in_axis, _) in quant.quantized_leaves(cfg).items():
    w = jnp.asarray(quant.get_path(params, path))
    np.testing.assert_array_equal(
      quant.get_path(back, path),
      quant.fake_quant(w, in_axis, 4, 32, "q4_0"),
    )
  # GGML's formats fix bits and block size: a flag against them is refused.
  for flags, message in [
    (["--scheme", "q8_0", "--bits", "4"], "--scheme: q8_0 is GGML's 8-bit"),
    (["--scheme", "q4_0", "--block-size", "16"], "block size 32 (got bits 4"),
  ]:
    assert cli.main(["quantize", src, str(tmp / "bad"), *flags]) == 2
    assert message in capsys.readouterr().err
