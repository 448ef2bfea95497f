"""Tokenizer: Gemma's special ids, encode/decode, fingerprint, training."""

import functools
import io

import numpy as np
import pytest
import sentencepiece as spm

from gemma_jax import cli
from gemma_jax.data import testing
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.tokenizer import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
  UNK_ID,
  Tokenizer,
  train_tokenizer,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return Tokenizer.load(
    testing.tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model")
  )


def test_special_ids_are_gemmas(tok):
  assert (PAD_ID, EOS_ID, BOS_ID, UNK_ID) == (0, 1, 2, 3)
  assert [tok.id_to_piece(i) for i in range(4)] == [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
  ]
  assert tok.vocab_size == 512


def test_encode_decode_round_trip_keeps_whitespace_and_unicode(tok):
  text = "  def f(x):\n\treturn 12345 + x  # naïve → ∑\n\n"
  ids = tok.encode(text, add_bos=True)
  assert ids.dtype == np.int32 and ids[0] == BOS_ID
  assert tok.decode(ids[1:]) == text
  # split_digits: every digit is its own piece.
  pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
  assert "".join(pieces) == "12345" and all(len(p) == 1 for p in pieces)


def test_fingerprint_is_sha256_of_the_model_and_stable(tok, tmp_path):
  again = Tokenizer.load(tok.path)
  assert again.fingerprint == tok.fingerprint and len(tok.fingerprint) == 64
  other = train_tokenizer(
    testing.sample_texts(50, seed=7), 400, tmp_path / "other.model"
  )
  assert other.fingerprint != tok.fingerprint


def test_vocab_larger_than_model_is_refused(tok):
  tok.check_vocab(512)
  tok.check_vocab(2048)
  with pytest.raises(
    ConfigError, match="512 pieces but model.vocab_size is 256"
  ):
    tok.check_vocab(256)


def test_wrong_special_ids_are_refused(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(testing.sample_texts(50)),
    model_writer=model,
    vocab_size=400,
    model_type="bpe",
    byte_fallback=True,
    minloglevel=2,
  )
  path = tmp_path / "default_ids.model"
  path.write_bytes(model.getvalue())
  with pytest.raises(DataError, match="special ids"):
    Tokenizer.load(path)


def test_missing_or_broken_file_is_a_clear_error(tmp_path):
  with pytest.raises(DataError, match="not found"):
    Tokenizer.load(tmp_path / "nope.model")
  (tmp_path / "bad.model").write_bytes(b"not a proto")
  with pytest.raises(DataError, match="not a SentencePiece model"):
    Tokenizer.load(tmp_path / "bad.model")


def test_cli_train_writes_a_gemma_style_model(tmp_path, capsys):
  for i, text in enumerate(testing.sample_texts(60)):
    (tmp_path / f"{i}.txt").write_text(text)
  out = tmp_path / "cli.model"
  assert (
    cli.main(
      [
        "tokenizer",
        "train",
        "--input",
        str(tmp_path / "*.txt"),
        "--vocab-size",
        "400",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  tok = Tokenizer.load(out)
  assert tok.vocab_size == 400 and tok.fingerprint in capsys.readouterr().out
  # No input file: a data error (exit 1), one line.
  assert (
    cli.main(
      [
        "tokenizer",
        "train",
        "--input",
        str(tmp_path / "*.none"),
        "--vocab-size",
        "400",
        "--out",
        str(out),
      ]
    )
    == 1
  )


@functools.cache
def _unused_pieces(start, stop):
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  control = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
  for i in range(start, stop):
    proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=control)
  return proto


def released_size(tok, size, special):
  """`tok`'s model grown to `size` pieces with control pieces, `special`
  {piece: id} placed at those ids: a stand-in for a released tokenizer."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tok.serialized())
  control = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
  # Pieces where a special one goes move to the end (byte pieces included).
  moved = [
    proto.pieces[i].SerializeToString()
    for i in special.values()
    if i < len(proto.pieces)
  ]
  # The <unused{i}> control pieces, made once and copied in (one protobuf
  # call instead of a quarter million).
  proto.MergeFrom(_unused_pieces(len(proto.pieces), 262_144))
  del proto.pieces[size - len(moved) :]
  for data in moved:
    proto.pieces.add().ParseFromString(data)
  for piece, i in special.items():
    proto.pieces[i].Clear()
    proto.pieces[i].piece, proto.pieces[i].type = piece, control
  return Tokenizer(proto.SerializeToString(), f"{size}.model")


GEMMA3_SPECIAL = {
  "<start_of_turn>": 105,
  "<end_of_turn>": 106,
  "<start_of_image>": 255_999,
  "<end_of_image>": 256_000,
}


def test_released_tokenizers_must_match_their_models(tok):
  gemma3 = released_size(tok, 262_144, GEMMA3_SPECIAL)
  gemma2 = released_size(
    tok, 256_000, {"<start_of_turn>": 106, "<end_of_turn>": 107}
  )
  gemma3.check_vocab(262_144)  # the 1B
  gemma3.check_vocab(262_208)  # the 4B/12B/27B text config
  gemma2.check_vocab(256_000)
  gemma2.check_vocab(300_000)  # a model of one's own that fits it
  with pytest.raises(
    ConfigError,
    match="256000 pieces, Gemma 1/2's, but model.vocab_size 262208 is "
    "Gemma 3's: use Gemma 3's tokenizer.model",
  ):
    gemma2.check_vocab(262_208)
  with pytest.raises(ConfigError, match="262144 pieces but model.vocab_size"):
    gemma3.check_vocab(256_000)
  # Gemma 2's turn ids in a tokenizer of Gemma 3's size.
  wrong = released_size(
    tok, 262_144, {"<start_of_turn>": 106, "<end_of_turn>": 107}
  )
  with pytest.raises(
    ConfigError,
    match="<start_of_turn> has id 106, Gemma 3's has 105",
  ):
    wrong.check_vocab(262_144)
  # A tokenizer of one's own with that size and no such pieces passes.
  released_size(tok, 262_144, {}).check_vocab(262_144)
