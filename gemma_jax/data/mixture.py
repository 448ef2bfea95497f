"""Staged, block-deterministic mixture: global row index -> (source, row).

Stages are (start step, {source: weight}); stage i covers global rows
[start_i * B, start_{i+1} * B). Inside a stage, rows come in blocks of
`block_size`: each block holds exactly `counts[s]` rows of source s (weights
rounded by largest remainder, so the counts sum to the block size), in an order
permuted by a seed derived from (seed, stage start, block index). A stage's
last block may be cut short by the next stage; it keeps the permutation of a
full block, so adding a stage later never changes the rows before it.

Everything is a pure function of the row index: the number of rows drawn from
each source before any row is computed in O(1), so training resumes at any step
(also across a stage boundary) without replaying or saving data state.
"""

import functools
import sys

import grain
import numpy as np


def block_counts(shares: np.ndarray, block_size: int) -> np.ndarray:
  """Largest-remainder rounding of shares [S] * block_size; sums to block_size."""
  exact = shares * block_size
  counts = np.floor(exact).astype(np.int64)
  short = block_size - counts.sum()
  # Ties go to the lower source id: stable sort of the negated remainders.
  counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
  return counts


class StageSchedule(grain.transforms.DatasetSelectionMap):
  """Maps a global row index to (source id, row index within that source).

  Args:
    starts: first global row of each stage, increasing, starting at 0.
    shares: float [num_stages, num_sources], each row summing to 1.
    block_size: rows per exactly-mixed block.
    seed: seed of the block permutations.
  """

  def __init__(self, starts, shares, block_size: int, seed: int):
    self.starts = np.asarray(starts, np.int64)
    self.shares = np.asarray(shares, np.float64)
    self.block_size = block_size
    self.seed = seed
    self.counts = np.stack([block_counts(s, block_size) for s in self.shares])
    # Rows of each source drawn before each stage.
    self.base = np.zeros_like(self.counts)
    for i in range(1, len(self.starts)):
      full, rest = divmod(int(self.starts[i] - self.starts[i - 1]), block_size)
      labels = self._block(i - 1, full)[0][:rest]
      drawn = full * self.counts[i - 1] + np.bincount(
          labels, minlength=self.counts.shape[1])
      self.base[i] = self.base[i - 1] + drawn

  def __len__(self):
    return sys.maxsize

  @functools.lru_cache(maxsize=16)
  def _block(self, stage: int, block: int):
    """(source label [K], rank among same-label rows [K]) of one block."""
    counts = self.counts[stage]
    labels = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(
        [self.seed, int(self.starts[stage]), block])
    labels = rng.permutation(labels)
    rank = np.zeros_like(labels)
    for s in range(len(counts)):
      mask = labels == s
      rank[mask] = np.arange(mask.sum())
    return labels, rank

  def __getitem__(self, index: int) -> tuple[int, int]:
    stage = int(np.searchsorted(self.starts, index, side="right")) - 1
    block, j = divmod(int(index - self.starts[stage]), self.block_size)
    labels, rank = self._block(stage, block)
    s = int(labels[j])
    return s, int(self.base[stage, s] + block * self.counts[stage, s]
                  + rank[j])


class ProcessRows(grain.transforms.DatasetSelectionMap):
  """This process's rows: local row l of step t is global row
  t * B + p * (B / P) + l % (B / P)."""

  def __init__(self, schedule: StageSchedule, global_batch: int,
               process_index: int, process_count: int):
    self.schedule = schedule
    self.global_batch = global_batch
    self.local = global_batch // process_count
    self.offset = process_index * self.local

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, index: int) -> tuple[int, int]:
    step, l = divmod(int(index), self.local)
    return self.schedule[step * self.global_batch + self.offset + l]
