"""Gemma's SentencePiece tokenizer: load, check against a model, train small ones.

Gemma 1 and 2 share one SentencePiece BPE model with fixed special ids
(pad 0, eos 1, bos 2, unk 3). `Tokenizer` loads any such `tokenizer.model`
and refuses one whose special ids differ or whose vocabulary does not fit the
model's embedding; `train_tokenizer` trains a small one with Gemma's settings
(byte fallback, split digits, identity normalisation, whitespace kept).
"""

import hashlib
import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from gemma_jax.errors import ConfigError, DataError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

# SentencePieceTrainer options that reproduce Gemma's tokenizer settings.
GEMMA_TRAINER_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True,
    normalization_rule_name="identity", add_dummy_prefix=False,
    remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
    pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
    unk_piece="<unk>")


class Tokenizer:
  """A SentencePiece model with Gemma's special ids.

  Attributes:
    path: where it was loaded from ('' for one built from bytes).
    vocab_size: number of pieces.
    fingerprint: sha256 of the serialized model proto; prepared datasets
      record it so that tokens are never read with a different tokenizer.
  """

  def __init__(self, model_proto: bytes, path: str = ""):
    self.path = path
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()
    ids = dict(pad=self._sp.pad_id(), eos=self._sp.eos_id(),
               bos=self._sp.bos_id(), unk=self._sp.unk_id())
    want = dict(pad=PAD_ID, eos=EOS_ID, bos=BOS_ID, unk=UNK_ID)
    if ids != want:
      raise DataError(
          f"tokenizer {path or '<bytes>'}: special ids {ids} differ from "
          f"Gemma's {want}")

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    path = os.path.expanduser(str(path))
    try:
      with open(path, "rb") as f:
        proto = f.read()
    except FileNotFoundError:
      raise DataError(f"tokenizer file not found: {path}") from None
    try:
      return cls(proto, path)
    except RuntimeError as e:
      raise DataError(f"tokenizer {path} is not a SentencePiece model: "
                        f"{str(e).splitlines()[0]}") from None

  def check_vocab(self, vocab_size: int) -> None:
    """Raises ConfigError if some token id would fall outside the model."""
    if self.vocab_size > vocab_size:
      raise ConfigError(
          f"tokenizer {self.path or '<bytes>'} has {self.vocab_size} pieces "
          f"but model.vocab_size is {vocab_size}: ids >= {vocab_size} would "
          "index past the embedding")

  def encode(self, text: str, add_bos: bool = False,
             add_eos: bool = False) -> np.ndarray:
    """Text -> int32 ids [n]."""
    ids = self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)
    return np.asarray(ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Texts -> list of int32 ids, without bos/eos (multithreaded)."""
    return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode(ids)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def serialized(self) -> bytes:
    """The model file's bytes (what an HF export writes as tokenizer.model)."""
    return self._proto

  def __getstate__(self):
    return {"proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["path"])


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str,
                    max_sentence_length: int = 16384,
                    input_sentence_size: int = 200_000) -> Tokenizer:
  """Trains a Gemma-style BPE tokenizer on `texts` and writes `out_path`.

  Each text is one training sentence (long ones are cut into lines).
  """
  if vocab_size < 260 + 4:
    # Byte fallback alone needs 256 pieces plus the 4 special ones.
    raise ConfigError(f"tokenizer vocab_size must be >= 264 (256 byte pieces "
                      f"+ specials + merges), got {vocab_size}")
  sentences = _sentences(texts, max_sentence_length)
  if not sentences:
    raise DataError("tokenizer training input is empty")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        vocab_size=vocab_size, max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        hard_vocab_limit=True, character_coverage=1.0, num_threads=2,
        minloglevel=2, **GEMMA_TRAINER_OPTIONS)
  except RuntimeError as e:
    raise DataError(f"tokenizer training failed: "
                      f"{str(e).splitlines()[0]}") from None
  out_path = os.path.expanduser(str(out_path))
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = out_path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, out_path)
  return Tokenizer(model.getvalue(), out_path)


def _sentences(texts: Iterable[str], max_len: int) -> list[str]:
  out = []
  for text in texts:
    for line in text.splitlines(keepends=True) if len(text) > max_len else [text]:
      if line.strip():
        out.append(line[:max_len])
  return out
