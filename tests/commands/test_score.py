"""gemma-jax score: logits and next-token log-probs, from arrays or text."""

import pathlib

import numpy as np
import pytest

from gemma_jax import cli
from gemma_jax.checkpoint import native
from gemma_jax.checkpoint.testing import random_params, write_hf_dir
from gemma_jax.model import preset
from gemma_jax.tokenizer import Tokenizer, train_tokenizer

PARITY = pathlib.Path(__file__).parents[1] / "fixtures" / "parity"


def log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
  """Native checkpoint of the Gemma 2 parity fixture, plus HF's outputs."""
  tmp = tmp_path_factory.mktemp("score")
  data, _ = write_hf_dir(PARITY / "gemma2_gqa_window.npz", tmp / "hf")
  assert (
    cli.main(
      [
        "convert",
        "--from",
        "hf",
        "--to",
        "native",
        str(tmp / "hf"),
        str(tmp / "ckpt"),
      ]
    )
    == 0
  )
  np.save(tmp / "tokens.npy", data["tokens"])
  np.save(tmp / "mask.npy", data["mask"])
  return tmp, data


@pytest.mark.slow
def test_scores_match_hugging_face(hf_ckpt):
  tmp, data = hf_ckpt
  out = tmp / "out.npz"
  # Batch size 1 over 2 rows: chunked forward passes give the same result.
  assert (
    cli.main(
      [
        "score",
        "--checkpoint",
        str(tmp / "ckpt"),
        "--tokens",
        str(tmp / "tokens.npy"),
        "--mask",
        str(tmp / "mask.npy"),
        "--batch-size",
        "1",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  got = np.load(out)
  tokens, mask, ref = data["tokens"], data["mask"], data["logits"]
  assert got["logits"].dtype == np.float32 and got["logits"].shape == ref.shape
  assert got["logprobs"].dtype == np.float32
  assert got["logprobs"].shape == (2, tokens.shape[1] - 1)
  real = mask.astype(bool)
  assert np.abs(got["logits"][real] - ref[real]).max() < 3e-4
  # logprobs[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1]), 0 on padding.
  want = np.take_along_axis(log_softmax(ref[:, :-1]), tokens[:, 1:, None], -1)[
    ..., 0
  ]
  want = np.where(mask[:, 1:] == 1, want, 0.0)
  np.testing.assert_allclose(got["logprobs"], want, atol=3e-4)
  assert (got["logprobs"][1, 16:] == 0).all()


@pytest.mark.slow
def test_scores_text_with_a_tokenizer(tmp_path):
  cfg = preset("tiny-gemma", num_layers=1)
  params = random_params(cfg, scale=0.05)
  native.save(tmp_path / "ckpt", params, cfg)
  words = "the model reads text and code while numbers add up def return"
  docs = [
    " ".join(np.random.default_rng(i).permutation(words.split()))
    + f"\ndef f{i}(x):\n  return x + {i}\n"
    for i in range(200)
  ]
  tok_path = str(tmp_path / "tok.model")
  train_tokenizer(docs, 300, tok_path)
  texts = ["def f(x):\n  return x + 1\n", "the model reads text"]
  assert (
    cli.main(
      [
        "score",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--tokenizer",
        tok_path,
        "--text",
        texts[0],
        "--text",
        texts[1],
        "--logprobs-only",
        "--out",
        str(tmp_path / "o.npz"),
      ]
    )
    == 0
  )
  got = np.load(tmp_path / "o.npz")
  assert "logits" not in got.files
  tok = Tokenizer.load(tok_path)
  for row, text in enumerate(texts):
    ids = tok.encode(text, add_bos=True)
    n = len(ids)
    np.testing.assert_array_equal(got["tokens"][row, :n], ids)
    assert got["mask"][row].sum() == n
    assert (got["logprobs"][row, : n - 1] < 0).all()
    assert (got["logprobs"][row, n - 1 :] == 0).all()


@pytest.mark.parametrize(
  "mask, message",
  [
    ([[1, 1, 0, 1]], "mask row 0 is not right-padded"),
    ([[1, 1, 2, 0]], "only 0 (padding) and 1"),
    ([[1, 1, 1]], "mask shape [1, 3] differs"),
  ],
)
def test_bad_masks_are_named(hf_ckpt, tmp_path, capsys, mask, message):
  tmp, _ = hf_ckpt
  np.save(tmp_path / "t.npy", np.array([[2, 5, 6, 7]], np.int32))
  np.save(tmp_path / "m.npy", np.array(mask, np.int32))
  assert (
    cli.main(
      [
        "score",
        "--checkpoint",
        str(tmp / "ckpt"),
        "--tokens",
        str(tmp_path / "t.npy"),
        "--mask",
        str(tmp_path / "m.npy"),
        "--out",
        str(tmp_path / "o.npz"),
      ]
    )
    == 1
  )  # a data error
  assert message in capsys.readouterr().err
  assert not (tmp_path / "o.npz").exists()


def test_token_outside_the_vocabulary(hf_ckpt, tmp_path, capsys):
  tmp, _ = hf_ckpt
  np.save(tmp_path / "t.npy", np.array([[2, 5, 128]], np.int32))
  assert (
    cli.main(
      [
        "score",
        "--checkpoint",
        str(tmp / "ckpt"),
        "--tokens",
        str(tmp_path / "t.npy"),
        "--out",
        str(tmp_path / "o.npz"),
      ]
    )
    == 1
  )
  assert "token id 128 at [0, 2] is outside" in capsys.readouterr().err
