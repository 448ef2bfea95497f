"""Staged block-deterministic mixture: exact counts, pure, stage-edit safe."""

import numpy as np
import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.data.mixture import ProcessRows, StageSchedule, apportion


def routes(schedule, n):
  return np.array([schedule[i] for i in range(n)])


def test_apportion_rounds_by_largest_remainder():
  np.testing.assert_array_equal(apportion(np.array([.5, .3, .2]), 64),
                                [32, 19, 13])
  np.testing.assert_array_equal(apportion(np.array([1 / 3] * 3), 10),
                                [4, 3, 3])
  assert apportion(np.array([0.0, 1.0]), 7).tolist() == [0, 7]


def test_every_block_holds_exact_counts_in_a_seeded_order():
  sched = StageSchedule([0], [[.5, .3, .2]], block_size=64, seed=0)
  r = routes(sched, 64 * 5)
  shares = np.array([.5, .3, .2])
  for k, block in enumerate(r.reshape(5, 64, 2)):
    counts = np.bincount(block[:, 0], minlength=3)
    expected = apportion(shares, (k + 1) * 64) - apportion(shares, k * 64)
    assert counts.tolist() == expected.tolist()
    assert (np.abs(counts - shares * 64) < 1).all()
  assert not np.array_equal(r[:64, 0], r[64:128, 0])   # permuted per block
  other = routes(StageSchedule([0], [[.5, .3, .2]], 64, seed=1), 64)
  assert not np.array_equal(other[:, 0], r[:64, 0])


def test_each_source_row_is_drawn_once_in_order_across_stages():
  sched = StageSchedule([0, 100, 250], [[.5, .5, 0], [.1, .2, .7], [0, 0, 1]],
                        block_size=32, seed=0)
  r = routes(sched, 400)
  for s in range(3):
    np.testing.assert_array_equal(np.sort(r[r[:, 0] == s, 1]),
                                  np.arange((r[:, 0] == s).sum()))
  assert set(r[:100, 0]) == {0, 1} and set(r[250:, 0]) == {2}


def test_adding_a_later_stage_keeps_every_earlier_row():
  one = StageSchedule([0], [[.6, .4]], block_size=50, seed=2)
  two = StageSchedule([0, 130], [[.6, .4], [.1, .9]], block_size=50, seed=2)
  np.testing.assert_array_equal(routes(one, 130), routes(two, 130))
  # The source rows after the new stage continue where the first left off.
  r = routes(two, 300)
  for s in range(2):
    np.testing.assert_array_equal(np.sort(r[r[:, 0] == s, 1]),
                                  np.arange((r[:, 0] == s).sum()))


def test_process_rows_are_slices_of_the_global_batch():
  sched = StageSchedule([0], [[.5, .5]], block_size=16, seed=0)
  glob = [sched[i] for i in range(8 * 3)]
  for count in (1, 2, 4):
    parts = [ProcessRows(sched, 8, p, count) for p in range(count)]
    local = 8 // count
    for step in range(3):
      rows = [parts[p][step * local + l] for p in range(count)
              for l in range(local)]
      assert rows == glob[step * 8:(step + 1) * 8]


def test_rounding_never_accumulates_over_blocks():
  """0.1 of a 64-row block is 6.4 rows: blocks hold 6 or 7, and any number
  of whole blocks holds the exact share within one row."""
  shares = np.array([.45, .45, .1])
  sched = StageSchedule([0], [shares], block_size=64, seed=0)
  sources = np.array([sched[i][0] for i in range(64 * 50)])
  per_block = np.stack([np.bincount(b, minlength=3)
                        for b in sources.reshape(50, 64)])
  assert set(per_block[:, 2]) == {6, 7}
  assert (np.abs(per_block - shares * 64) < 1).all()
  cumulative = per_block.cumsum(axis=0)
  exact = np.outer(np.arange(1, 51) * 64, shares)
  assert (np.abs(cumulative - exact) < 1).all()


def test_a_share_below_one_row_per_block_is_refused():
  with pytest.raises(ConfigError, match=r"raise data.block_size to at least "
                     r"100"):
    StageSchedule([0], [[.99, .01]], block_size=64, seed=0)
