"""Rows of one source: documents packed into fixed-length rows, random access.

Each epoch lays the source's documents, in an order shuffled per epoch, end to
end as `bos doc eos bos doc eos ...` (bos at each document start as Gemma
expects) and cuts the stream into rows of T+1 tokens that overlap by one
(`inputs = row[:-1]`, `targets = row[1:]`), so every token is a target exactly
once per epoch and long documents continue in the next row. Only the last row
of an epoch is padded. The rows of an epoch are then visited in a shuffled
order, so that the pieces of one long document do not sit side by side.

Row `i` is a pure function of `i`: the epoch's document order and cumulative
lengths (O(num_docs) numpy, cached per epoch) locate its documents by binary
search, so any row is read without reading the rows before it.
"""

import sys
import zlib

import grain
import numpy as np

from gemma_jax.data.sources import Documents
from gemma_jax.tokenizer import BOS_ID, EOS_ID

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# One epoch's layout: (doc order [D], cumulative end of each doc [D],
# row order [R]).
_Layout = tuple[np.ndarray, np.ndarray, np.ndarray]


class PackedRows(grain.MapDataset):
  """Rows of T tokens of one source, as dicts of int32 arrays [T] (+ `source`).

  Indices run over all epochs (the length is unbounded); row `i` of a
  shuffled source belongs to epoch `i // rows_per_epoch`.
  """

  def __init__(
    self,
    docs: Documents,
    seq_len: int,
    source_id: int,
    seed: int = 0,
    shuffle: bool = True,
  ):
    super().__init__([])
    self.docs = docs
    self.seq_len = seq_len
    self.source_id = source_id
    self.shuffle = shuffle
    # Seeds depend on the source's name, not its id, so adding a source to
    # the config leaves the others' streams unchanged.
    self._seed = (seed, zlib.crc32(docs.name.encode()))
    self._doc_tokens = docs.lengths + 2  # bos ... eos
    self.tokens_per_epoch = int(self._doc_tokens.sum())
    # T+1-token windows with a stride of T cover tokens [0, N) of an epoch.
    self.rows_per_epoch = max(1, -(-(self.tokens_per_epoch - 1) // seq_len))
    self._epochs: dict[int, _Layout] = {}

  def __len__(self):
    return sys.maxsize

  def __str__(self):
    return f"PackedRows({self.docs.name}, T={self.seq_len})"

  def _epoch(self, epoch: int) -> _Layout:
    """(doc order [D], cumulative end of each doc [D], row order [R])."""
    if epoch not in self._epochs:
      if len(self._epochs) >= 2:  # rows are read in nearly epoch order
        self._epochs.pop(min(self._epochs))
      self._epochs[epoch] = self._layout(epoch)
    return self._epochs[epoch]

  def _layout(self, epoch: int) -> _Layout:
    n, r = len(self.docs), self.rows_per_epoch
    if self.shuffle:
      rng = np.random.default_rng([*self._seed, epoch])
      order, rows = rng.permutation(n), rng.permutation(r)
    else:
      order, rows = np.arange(n), np.arange(r)
    return order, np.cumsum(self._doc_tokens[order]), rows

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, r = divmod(int(index), self.rows_per_epoch)
    order, ends, rows = self._epoch(epoch)
    return self.row_at(int(rows[r]) * self.seq_len, order, ends)

  def row_at(self, start: int, order, ends) -> dict:
    """The row whose first token is token `start` of the epoch's stream."""
    t = self.seq_len
    tokens = np.zeros(t + 1, np.int32)
    segments = np.zeros(t + 1, np.int32)
    positions = np.zeros(t + 1, np.int32)
    stop = min(start + t + 1, self.tokens_per_epoch)
    d = int(np.searchsorted(ends, start, side="right"))
    pos, seg = start, 0
    while pos < stop:
      doc_end = int(ends[d])
      doc_start = doc_end - int(self._doc_tokens[order[d]])
      lo, hi = pos - doc_start, min(doc_end, stop) - doc_start
      full = self._full_doc(int(order[d]), lo, hi)
      seg += 1
      a, b = pos - start, pos - start + (hi - lo)
      tokens[a:b], segments[a:b], positions[a:b] = full, seg, np.arange(b - a)
      pos, d = doc_end, d + 1
    return to_example(tokens, segments, positions, self.source_id)

  def _full_doc(self, i: int, lo: int, hi: int) -> np.ndarray:
    """Tokens [lo, hi) of `bos doc eos` for document i."""
    doc = self.docs.doc(i)
    n = len(doc)
    out = doc[max(lo - 1, 0) : max(min(hi - 1, n), 0)]
    if lo == 0:
      out = np.concatenate([[BOS_ID], out])
    if hi == n + 2:
      out = np.concatenate([out, [EOS_ID]])
    return out

  def __getstate__(self):
    return {**self.__dict__, "_epochs": {}}  # rebuilt lazily in workers


def to_example(tokens, segments, positions, source_id: int) -> dict:
  """A T+1 row -> model inputs [T] with targets and loss mask.

  A target counts when it is a real token of the same document piece as its
  input: padding and the first token of the next document are excluded.
  """
  loss = (segments[1:] == segments[:-1]) & (segments[1:] != 0)
  return {
    "inputs": tokens[:-1],
    "targets": tokens[1:],
    "segment_ids": segments[:-1],
    "positions": positions[:-1],
    "loss_mask": loss.astype(np.int32),
    "source": np.int32(source_id),
  }


def padding_example(seq_len: int, source_id: int) -> dict:
  """An all-padding row (segment 0, nothing counted)."""
  z = np.zeros(seq_len + 1, np.int32)
  return to_example(z, z, z, source_id)
