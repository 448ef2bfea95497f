"""Gemma's SentencePiece tokenizer: load, check against a model, train one.

Gemma 1 and 2 share one SentencePiece BPE model, Gemma 3 has its own (262,144
pieces, more special pieces: images, turns); all have the special ids pad 0,
eos 1, bos 2, unk 3. `Tokenizer` loads any such `tokenizer.model` and refuses
one whose special ids differ or whose vocabulary does not fit the model's
embedding, and a released tokenizer given to the other release's model;
`train_tokenizer` trains a small one with Gemma's settings (byte fallback,
split digits, identity normalisation, whitespace kept).
"""

import dataclasses
import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from gemma_jax.errors import ConfigError, DataError

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

# SentencePieceTrainer options that reproduce Gemma's tokenizer settings.
# Values mix str, bool and int; they go to train() as **kwargs.
GEMMA_TRAINER_OPTIONS: dict[str, Any] = dict(
  model_type="bpe",
  byte_fallback=True,
  split_digits=True,
  normalization_rule_name="identity",
  add_dummy_prefix=False,
  remove_extra_whitespaces=False,
  allow_whitespace_only_pieces=True,
  pad_id=PAD_ID,
  eos_id=EOS_ID,
  bos_id=BOS_ID,
  unk_id=UNK_ID,
  pad_piece="<pad>",
  eos_piece="<eos>",
  bos_piece="<bos>",
  unk_piece="<unk>",
)


@dataclasses.dataclass(frozen=True)
class Release:
  """A released Gemma tokenizer: its size, the model vocabularies that go
  with it, and the ids of its special pieces."""

  name: str
  pieces: int
  vocab_sizes: tuple[int, ...]
  special: dict[str, int]


# The official `gemma` package 3.3.0 (gm/text/_tokenizer.py:
# _Gemma2SpecialTokens, _Gemma3SpecialTokens) and the model configs: Gemma 3
# models have 262,144 embedding rows (official) or 262,208 (the Hugging Face
# text config of the 4B/12B/27B).
RELEASES = (
  Release(
    "Gemma 1/2",
    256_000,
    (256_000,),
    {"<start_of_turn>": 106, "<end_of_turn>": 107},
  ),
  Release(
    "Gemma 3",
    262_144,
    (262_144, 262_208),
    {
      "<start_of_turn>": 105,
      "<end_of_turn>": 106,
      "<start_of_image>": 255_999,
      "<end_of_image>": 256_000,
    },
  ),
)


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
    ids = dict(
      pad=self._sp.pad_id(),
      eos=self._sp.eos_id(),
      bos=self._sp.bos_id(),
      unk=self._sp.unk_id(),
    )
    want = dict(pad=PAD_ID, eos=EOS_ID, bos=BOS_ID, unk=UNK_ID)
    if ids != want:
      raise DataError(
        f"tokenizer {path or '<bytes>'}: special ids {ids} differ from "
        f"Gemma's {want}"
      )

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
      raise DataError(
        f"tokenizer {path} is not a SentencePiece model: "
        f"{str(e).splitlines()[0]}"
      ) from None

  def check_vocab(self, vocab_size: int) -> None:
    """Raises ConfigError if some token id would fall outside the model, if
    the model's vocabulary is one release's and this tokenizer (by its size)
    the other's, or if a released-size tokenizer has a special piece of its
    release at another id."""
    name = self.path or "<bytes>"
    if self.vocab_size > vocab_size:
      raise ConfigError(
        f"tokenizer {name} has {self.vocab_size} pieces "
        f"but model.vocab_size is {vocab_size}: ids >= {vocab_size} would "
        "index past the embedding"
      )
    model = next((r for r in RELEASES if vocab_size in r.vocab_sizes), None)
    mine = next((r for r in RELEASES if r.pieces == self.vocab_size), None)
    if mine is None:
      return  # a tokenizer of one's own: the size check is all
    if model is not None and model != mine:
      raise ConfigError(
        f"tokenizer {name} has {self.vocab_size} pieces, {mine.name}'s, but "
        f"model.vocab_size {vocab_size} is {model.name}'s: use "
        f"{model.name}'s tokenizer.model ({model.pieces} pieces)"
      )
    for piece, want in mine.special.items():
      got = self._sp.piece_to_id(piece)
      # A piece it lacks maps to unk: a custom tokenizer of that size.
      if got not in (want, UNK_ID):
        raise ConfigError(
          f"tokenizer {name}: {piece} has id {got}, {mine.name}'s has "
          f"{want}; not {mine.name}'s tokenizer.model"
        )

  def encode(
    self, text: str, add_bos: bool = False, add_eos: bool = False
  ) -> np.ndarray:
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


def train_tokenizer(
  texts: Iterable[str],
  vocab_size: int,
  out_path: str,
  max_sentence_length: int = 16384,
  input_sentence_size: int = 200_000,
) -> Tokenizer:
  """Trains a Gemma-style BPE tokenizer on `texts` and writes `out_path`.

  Each text is one training sentence (long ones are cut into lines).
  """
  if vocab_size < 260 + 4:
    # Byte fallback alone needs 256 pieces plus the 4 special ones.
    raise ConfigError(
      f"tokenizer vocab_size must be >= 264 (256 byte pieces "
      f"+ specials + merges), got {vocab_size}"
    )
  sentences = _sentences(texts, max_sentence_length)
  if not sentences:
    raise DataError("tokenizer training input is empty")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      vocab_size=vocab_size,
      max_sentence_length=max_sentence_length,
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True,
      hard_vocab_limit=True,
      character_coverage=1.0,
      num_threads=2,
      minloglevel=2,
      **GEMMA_TRAINER_OPTIONS,
    )
  except RuntimeError as e:
    raise DataError(
      f"tokenizer training failed: {str(e).splitlines()[0]}"
    ) from None
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
    lines = text.splitlines(keepends=True) if len(text) > max_len else [text]
    for line in lines:
      if line.strip():
        out.append(line[:max_len])
  return out
