"""Our GGUF files run in llama.cpp itself (llama-cpp-python, the llama-cpp
extra; skipped without it, and marked llama_cpp so that `-m "not
llama_cpp"` leaves them out): they load, tokenise as SentencePiece does,
give llama.cpp the logits of our forward pass within the bounds measured in
docs/quantization.md, equal those of llama.cpp's own converter's files
(LLAMA_CPP_SRC: a llama.cpp source tree with convert_hf_to_gguf.py), and a
QAT model's Q4_0/Q8_0 exports stay closer to its forward pass than a float
model's do to its own."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from gemma_jax.checkpoint import native
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.data.testing import tiny_tokenizer
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

# check_gguf's random tiny Gemma 2 (d 128, 4 layers, window 16, soft-caps
# 50/30, vocabulary 512, weights N(0, 0.1^2); |logits| <= 8.3).
CFG = check.random_model()
# Bounds on max |llama.cpp logit - our logit| with an f32 KV cache: about
# twice the largest difference measured on 15 runs (weight seeds 0-4 x 3
# token sequences; llama-cpp-python 0.3.36) by
#   python scripts/check_gguf.py --bounds 5 --out bounds/
# measured: f32 2.3e-3, f16 7.6e-3, bf16 7.1e-2, q8_0 0.25, q4_0 2.43 (the
# float model's post-training exports against its float forward), and a
# QAT model's exports against its QAT forward: q8_0 0.14, q4_0 0.13 (what
# llama.cpp's 8-bit activations in Q8_0/Q4_0 dot products cost).
BOUNDS = {"f32": 5e-3, "f16": 1.5e-2, "bf16": 0.15, "q8_0": 0.5, "q4_0": 5.0}
QAT_BOUNDS = {"q8_0": 0.3, "q4_0": 0.3}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  from gemma_jax import cli

  tmp = tmp_path_factory.mktemp("llama_cpp")
  tok = tiny_tokenizer(tmp / "tokenizer.model")
  native.save(tmp / "float", random_params(CFG, scale=check.RANDOM_SCALE), CFG)
  out = {}
  for kind in BOUNDS:
    out[kind] = tmp / f"{kind}.gguf"
    argv = ["convert", "--from", "native", "--to", "gguf", "--tokenizer", tok]
    assert (
      cli.main([*argv, "--gguf-type", kind, str(tmp / "float"), str(out[kind])])
      == 0
    )
  return tmp, Tokenizer.load(tok), out


def test_every_file_loads_and_tokenises_as_sentencepiece(files):
  _, tok, out = files
  for kind, path in out.items():
    model = check.llama(path)
    assert check.tokenization_matches(model, tok), kind  # check.PROMPT
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
  qat = check.qat_model(cfg, kind)
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
  assert qat_gap <= QAT_BOUNDS[kind]
  assert qat_gap < ptq_gap
