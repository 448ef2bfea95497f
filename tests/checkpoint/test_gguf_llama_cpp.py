"""Our GGUF files run in llama.cpp itself (llama-cpp-python, the llama-cpp
extra; skipped without it, and marked llama_cpp so that `-m "not
llama_cpp"` leaves them out): they load, tokenise as SentencePiece does,
give llama.cpp the logits of our forward pass within the bounds measured in
docs/quantization.md, equal those of llama.cpp's own converter's files
(LLAMA_CPP_SRC: a llama.cpp source tree with convert_hf_to_gguf.py), and a
QAT model's Q4_0/Q8_0 exports stay closer to its forward pass than a float
model's do to its own."""

import dataclasses
import importlib.util
import os
import pathlib

import numpy as np
import pytest

from gemma_jax.checkpoint import native
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.data.testing import tiny_tokenizer
from gemma_jax.model.config import PRESETS
from gemma_jax.model.quant import GROUPS, QuantConfig
from gemma_jax.tokenizer import Tokenizer

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.llama_cpp, pytest.mark.slow]

_spec = importlib.util.spec_from_file_location(
  "check_gguf",
  pathlib.Path(__file__).parents[2] / "scripts" / "check_gguf.py",
)
assert _spec is not None and _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

# A tiny Gemma 2 like the scale measurement: d 128, 4 layers, window
# 16, soft-caps 50/30. Bounds on max |logit difference| with an f32 KV
# cache, measured on it (docs/quantization.md) with margin.
CFG = dataclasses.replace(
  PRESETS["tiny-gemma2"], vocab_size=512, sliding_window=16
)
BOUNDS = {"f32": 2e-2, "f16": 5e-2, "bf16": 0.5, "q8_0": 1.5, "q4_0": 6.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  from gemma_jax import cli

  tmp = tmp_path_factory.mktemp("llama_cpp")
  tok = tiny_tokenizer(tmp / "tokenizer.model")
  native.save(tmp / "float", random_params(CFG, scale=0.1), CFG)
  out = {}
  for kind in BOUNDS:
    out[kind] = tmp / f"{kind}.gguf"
    argv = ["convert", "--from", "native", "--to", "gguf", "--tokenizer", tok]
    assert (
      cli.main([*argv, "--gguf-type", kind, str(tmp / "float"), str(out[kind])])
      == 0
    )
  return tmp, Tokenizer.load(tok), out


def test_the_file_loads_and_tokenises_as_sentencepiece(files):
  _, tok, out = files
  model = check.llama(out["f32"])
  assert check.tokenization_matches(model, tok)
  assert check.tokenization_matches(model, tok, "  two  spaces\n\nand 12345")


def test_llama_cpp_computes_our_logits_within_the_measured_bounds(files):
  tmp, _, out = files
  params, cfg = native.load(tmp / "float")
  tokens = [2, *np.random.default_rng(0).integers(4, 512, 47)]
  ours = check.our_logits(params, cfg, tokens)
  for kind, bound in BOUNDS.items():
    theirs = check.llama_logits(check.llama(out[kind]), tokens)
    assert np.abs(theirs - ours).max() <= bound, kind


@pytest.mark.skipif(
  not os.environ.get("LLAMA_CPP_SRC"),
  reason="LLAMA_CPP_SRC (a llama.cpp source tree) not set",
)
def test_files_equal_llama_cpps_own_converters(files):
  from gemma_jax import cli

  tmp, tok, out = files
  hf_dir = tmp / "hf"
  argv = ["convert", "--from", "native", "--to", "hf", "--tokenizer"]
  assert cli.main([*argv, tok.path, str(tmp / "float"), str(hf_dir)]) == 0
  tokens = [2, *np.random.default_rng(1).integers(4, 512, 31)]
  for kind in check.CONVERTER_TYPES:
    theirs = tmp / f"converter-{kind}.gguf"
    check.converter_file(hf_dir, theirs, kind, os.environ["LLAMA_CPP_SRC"])
    assert check.compare_files(out[kind], theirs) == [], kind
    np.testing.assert_array_equal(
      check.llama_logits(check.llama(out[kind]), tokens),
      check.llama_logits(check.llama(theirs), tokens),
    )


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_a_qat_models_export_is_closer_to_its_forward_than_ptqs(files, kind):
  # The same weights, once as a QAT model (its forward already quantizes
  # every matrix as `kind`) and once as a float model quantized after
  # training: llama.cpp on the QAT file differs from the QAT forward by its
  # arithmetic alone, on the PTQ file from the float forward by the
  # rounding too.
  from gemma_jax import cli

  tmp, tok, out = files
  params, cfg = native.load(tmp / "float")
  bits = 4 if kind == "q4_0" else 8
  qat = dataclasses.replace(
    cfg, quant=QuantConfig(bits=bits, scheme=kind, targets=GROUPS)
  )
  native.save(tmp / f"qat-{kind}", params, qat)
  qat_file = tmp / f"qat-{kind}.gguf"
  argv = ["convert", "--from", "native", "--to", "gguf", "--tokenizer"]
  assert (
    cli.main([*argv, tok.path, str(tmp / f"qat-{kind}"), str(qat_file)]) == 0
  )
  tokens = [2, *np.random.default_rng(2).integers(4, 512, 47)]
  qat_gap = np.abs(
    check.llama_logits(check.llama(qat_file), tokens)
    - check.our_logits(params, qat, tokens)
  ).max()
  ptq_gap = np.abs(
    check.llama_logits(check.llama(out[kind]), tokens)
    - check.our_logits(params, cfg, tokens)
  ).max()
  assert qat_gap < ptq_gap
