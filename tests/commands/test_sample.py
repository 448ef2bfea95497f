"""`gemma-jax sample` end to end: native checkpoint + tokenizer -> text."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from gemma_jax import cli
from gemma_jax.checkpoint import native
from gemma_jax.data.testing import tiny_tokenizer
from gemma_jax.model import Transformer
from gemma_jax.model.sampler import generate
from gemma_jax.model.testing import TINY_GEMMA2_WIDE
from gemma_jax.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

CFG = dataclasses.replace(TINY_GEMMA2_WIDE, vocab_size=512, sliding_window=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample")
  tok = tiny_tokenizer(root / "tok.model", vocab_size=512)
  params = nn.meta.unbox(
    Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))[
      "params"
    ]
  )
  native.save(root / "ckpt", params, CFG)
  return root, tok, params


def test_sample_prints_the_greedy_continuation(setup, capsys):
  root, tok, params = setup
  rc = cli.main(
    [
      "sample",
      "--checkpoint",
      str(root / "ckpt"),
      "--tokenizer",
      tok,
      "--prompt",
      "the model",
      "--max-new-tokens",
      "12",
    ]
  )
  assert rc == 0
  tokenizer = Tokenizer.load(tok)
  ids = tokenizer.encode("the model", add_bos=True).tolist()
  expected = generate(params, CFG, [ids], 12, eos_id=1)[0]
  expected = tokenizer.decode([t for t in expected if t != 1])
  assert capsys.readouterr().out == f"the model{expected}\n"


def test_sample_rejects_a_tokenizer_larger_than_the_model(setup, capsys):
  root, tok, params = setup
  small = dataclasses.replace(CFG, vocab_size=300)
  params = dict(
    params, embedder={"embedding": params["embedder"]["embedding"][:300]}
  )
  native.save(root / "small", params, small)
  rc = cli.main(
    [
      "sample",
      "--checkpoint",
      str(root / "small"),
      "--tokenizer",
      tok,
      "--prompt",
      "x",
    ]
  )
  assert rc == 2
  assert "has 512 pieces but model.vocab_size is 300" in capsys.readouterr().err
