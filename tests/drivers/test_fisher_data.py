"""Fisher rows: answered examples and several sources taken in turn."""

import numpy as np
import pytest

from gemma_jax.drivers import fisher_data
from gemma_jax.errors import ConfigError, DataError


def test_answer_row_counts_only_the_answer_targets():
  row = fisher_data.answer_row([2, 10, 11, 12, 20, 21], 2, seq_len=8)
  np.testing.assert_array_equal(row["inputs"], [2, 10, 11, 12, 20, 0, 0, 0])
  np.testing.assert_array_equal(row["targets"], [10, 11, 12, 20, 21, 0, 0, 0])
  np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1] * 5 + [0] * 3)
  np.testing.assert_array_equal(row["positions"][:5], np.arange(5))


@pytest.mark.parametrize(
  "window, answer", [(list(range(10)), 2), ([2, 5], 0), ([2, 5], 2)]
)
def test_answer_row_refuses_what_does_not_fit(window, answer):
  with pytest.raises(DataError, match="does not make a row of 8 tokens"):
    fisher_data.answer_row(window, answer, seq_len=8)


class Numbered:
  """Rows whose inputs hold (part, index)."""

  def __init__(self, part, n):
    self.part, self.num_rows = part, n

  def row(self, i):
    return {"inputs": np.array([self.part, i])}

  def describe(self):
    return {"part": self.part}


def test_mixed_rows_take_one_row_of_each_source_in_turn():
  rows = fisher_data.MixedRows([Numbered(0, 3), Numbered(1, 3)])
  assert rows.num_rows == 6
  assert [tuple(rows.row(i)["inputs"]) for i in range(6)] == [
    (0, 0),
    (1, 0),
    (0, 1),
    (1, 1),
    (0, 2),
    (1, 2),
  ]
  assert rows.describe()["parts"] == [{"part": 0}, {"part": 1}]
  with pytest.raises(ConfigError, match="equal row counts"):
    fisher_data.MixedRows([Numbered(0, 3), Numbered(1, 2)])
