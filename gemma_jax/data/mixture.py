"""Staged, block-deterministic mixture: global row index -> (source, row).

Stages are (start step, {source: weight}); stage i covers global rows
[start_i * B, start_{i+1} * B). Inside a stage, rows come in blocks of
`block_size`. The first k blocks of a stage hold the largest-remainder
apportionment of k * block_size rows by the stage's shares, so every block
holds an exact count of each source (within one row of its share of the
block) and the rounding never accumulates: over any number of whole blocks a
source's count is within one row of its exact share. Inside a block the
order is permuted by a seed derived from (seed, stage start, block index). A
stage's last block may be cut short by the next stage; it keeps the
permutation of a full block, so adding a stage later never changes the rows
before it.

Everything is a pure function of the row index: the number of rows drawn from
each source before any row is computed in O(1), so training resumes at any step
(also across a stage boundary) without replaying or saving data state.
"""

import functools
import sys

import grain
import numpy as np

from gemma_jax.errors import ConfigError


def apportion(shares: np.ndarray, rows: int) -> np.ndarray:
  """Largest-remainder rounding of shares [S] * rows; sums to rows."""
  exact = shares * rows
  counts = np.floor(exact).astype(np.int64)
  short = rows - counts.sum()
  # Ties go to the lower source id: stable sort of the negated remainders.
  counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
  return counts


def check_block_size(shares: np.ndarray, block_size: int) -> None:
  """Every source with a share needs a row in every block on average.

  With share * block_size >= 1 the cumulative apportionment grows by at least
  one row per block, so per-block counts (its differences) are never negative.
  """
  small = (shares > 0) & (shares * block_size < 1)
  if small.any():
    raise ConfigError(
        f"a share of {shares[small].min():.4g} gets less than one row per "
        f"block of {block_size}; raise data.block_size to at least "
        f"{int(np.ceil(1 / shares[small].min()))}")


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
    for stage_shares in self.shares:
      check_block_size(stage_shares, block_size)
    # Rows of each source drawn before each stage.
    self.base = np.zeros(self.shares.shape, np.int64)
    for i in range(1, len(self.starts)):
      full, rest = divmod(int(self.starts[i] - self.starts[i - 1]), block_size)
      labels = self._block(i - 1, full)[0][:rest]
      drawn = self.drawn(i - 1, full) + np.bincount(
          labels, minlength=self.shares.shape[1])
      self.base[i] = self.base[i - 1] + drawn

  def __len__(self):
    return sys.maxsize

  def drawn(self, stage: int, blocks: int) -> np.ndarray:
    """Rows of each source in the first `blocks` blocks of a stage."""
    return apportion(self.shares[stage], blocks * self.block_size)

  @functools.lru_cache(maxsize=16)
  def _block(self, stage: int, block: int):
    """(source label [K], rank among same-label rows [K]) of one block."""
    counts = self.drawn(stage, block + 1) - self.drawn(stage, block)
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
    return s, int(self.base[stage, s] + self.drawn(stage, block)[s] + rank[j])


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
