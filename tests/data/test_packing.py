"""Packed rows: Gemma's bos per document, segments, positions, loss mask."""

import numpy as np
import pytest

from gemma_jax.errors import DataError
from gemma_jax.data.packing import PackedRows
from gemma_jax.data.sources import Documents
from gemma_jax.tokenizer import BOS_ID, EOS_ID

T = 16


def synthetic_docs(lengths, name="syn"):
  """Document i is `lengths[i]` copies of token 10 + i (ids name the doc)."""
  return Documents(name, lengths,
                   lambda i: np.full(lengths[i], 10 + i, np.int32), "fp")


def epoch_rows(rows, epoch):
  n = rows.rows_per_epoch
  return [rows[epoch * n + r] for r in range(n)]


def test_row_layout_bos_segments_positions_and_loss_mask():
  rows = PackedRows(synthetic_docs([3, 20]), T, source_id=5, shuffle=False)
  row = rows[0]
  assert set(row) == {"inputs", "targets", "segment_ids", "positions",
                      "loss_mask", "source"}
  assert all(row[k].shape == (T,) and row[k].dtype == np.int32
             for k in row if k != "source")
  assert row["source"] == 5
  # bos doc0 eos | bos doc1... ; targets are inputs shifted by one.
  np.testing.assert_array_equal(
      row["inputs"][:7], [BOS_ID, 10, 10, 10, EOS_ID, BOS_ID, 11])
  np.testing.assert_array_equal(row["targets"][:-1], row["inputs"][1:])
  np.testing.assert_array_equal(row["segment_ids"][:7], [1, 1, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(row["positions"][:7], [0, 1, 2, 3, 4, 0, 1])
  # The target of eos (the next document's bos) does not count.
  np.testing.assert_array_equal(row["loss_mask"][:6], [1, 1, 1, 1, 0, 1])


def test_long_document_continues_in_next_row_and_last_row_is_padded():
  rows = PackedRows(synthetic_docs([40]), T, source_id=0, shuffle=False)
  assert rows.rows_per_epoch == 3            # 42 tokens, stride 16
  first, second, last = epoch_rows(rows, 0)
  assert first["targets"][-1] == second["inputs"][0] == 10
  assert second["segment_ids"].min() == 1 and second["positions"][0] == 0
  assert last["inputs"][9] == EOS_ID and last["loss_mask"][8] == 1
  # Padding: segment 0, nothing counted.
  assert (last["segment_ids"][10:] == 0).all()
  assert (last["loss_mask"][9:] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_every_token_is_a_target_exactly_once_per_epoch(seed):
  lengths = list(np.random.default_rng(seed).integers(1, 50, size=30))
  rows = PackedRows(synthetic_docs(lengths), T, source_id=0, seed=seed)
  for epoch in (0, 1):
    targets = np.concatenate([r["targets"][r["loss_mask"] == 1]
                              for r in epoch_rows(rows, epoch)])
    counts = np.bincount(targets, minlength=10 + len(lengths))
    # Each document's tokens plus its eos; no document repeated.
    np.testing.assert_array_equal(counts[10:], lengths)
    assert counts[EOS_ID] == len(lengths)
    starts = [r["inputs"][np.r_[True, np.diff(r["segment_ids"]) != 0] &
                          (r["inputs"] == BOS_ID)] for r in epoch_rows(rows, epoch)]
    assert sum(len(s) for s in starts) == len(lengths)


def test_each_epoch_is_reshuffled_and_rows_are_pure():
  rows = PackedRows(synthetic_docs(list(range(1, 40))), T, 0, seed=3)
  n = rows.rows_per_epoch
  e0 = np.stack([r["inputs"] for r in epoch_rows(rows, 0)])
  e1 = np.stack([r["inputs"] for r in epoch_rows(rows, 1)])
  assert not np.array_equal(e0, e1)
  fresh = PackedRows(synthetic_docs(list(range(1, 40))), T, 0, seed=3)
  np.testing.assert_array_equal(fresh[n + 4]["inputs"], e1[4])
  other_seed = PackedRows(synthetic_docs(list(range(1, 40))), T, 0, seed=4)
  assert not np.array_equal(other_seed[0]["inputs"], e0[0])


def test_empty_source_is_refused():
  with pytest.raises(DataError, match="'syn' is empty"):
    synthetic_docs([])
  with pytest.raises(DataError, match="empty"):
    synthetic_docs([0, 0])
