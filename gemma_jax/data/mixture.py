"""Staged mixture, exact at every batch: global row index -> (source, row).

Stages are (start step, {source: weight}). With global batch B, stage shares
s_i (the weights normalised, as exact fractions) and q_i(k) = s_i * k * B,
the first k batches of a stage hold C_i(k) rows of source i with

    floor(q_i(k)) <= C_i(k) <= ceil(q_i(k))                          (1)

at EVERY k, so |C_i(k) - q_i(k)| < 1 (and C_i(k) = q_i(k) when that is a
whole number), with C_i nondecreasing in k and sum_i C_i(k) = k * B. Batch k
holds C(k + 1) - C(k) rows of each source in a seeded order. Shares below
one row per batch are spread over batches; a zero share gets no row. A stage
added later cuts the one before it short, which changes no earlier row, and
(1) holds for a stage of any length, in any process count (processes take
slices of the global batch).

Why (1) holds (Tijdeman's theorem, then earliest-deadline-first scheduling
and its random-access form) is proved in docs/data.md, "Why the mixture is
exact"; tests/data/test_mixture.py checks (1) on random stages. Rows are a
pure function of the step: training resumes at any step, also across a
stage boundary, with no data state saved.
"""

import functools
import math
import sys
from fractions import Fraction

import grain
import numpy as np


class Apportionment:
  """Rows per source in the first k batches of one stage; see module doc.

  Args:
    weights: [S] weights >= 0 with a positive sum, normalised exactly, each
      read as the decimal it prints as (0.2 is 1/5, not the binary fraction
      nearest it, so that a share of 0.2 of 1,024-row batches is exactly
      204.8 rows a batch and whole counts come out whole).
    batch_size: B, global rows per batch.
  """

  def __init__(self, weights, batch_size: int):
    exact = [Fraction(repr(float(w))) for w in weights]
    self.shares = [w / sum(exact) for w in exact]
    # q_i(k) = rate_i * k / denominator, in exact integers.
    self.denominator = math.lcm(*(s.denominator for s in self.shares))
    self.rate = [int(s * self.denominator) * batch_size for s in self.shares]
    self.batch_size = batch_size
    self.rows_per_batch = [Fraction(r, self.denominator) for r in self.rate]

  # Bounded caches on a long-lived schedule object: nothing leaks.
  @functools.lru_cache(maxsize=64)  # noqa: B019
  def cumulative(self, k: int) -> np.ndarray:
    """C(k): int64 [S] rows of each source in the first k batches."""
    w = self.denominator
    counts = [r * k // w for r in self.rate]
    # A source below ceil(q_i(k)) has one job left to test: floor + 1.
    jobs = {
      i: self._job(i, counts[i] + 1, k)
      for i, r in enumerate(self.rate)
      if r * k % w
    }
    for i in self._have_run(jobs, k):
      counts[i] += 1
    if sum(counts) != k * self.batch_size:
      raise AssertionError(
        f"mixture: {counts} rows after {k} batches of "
        f"{self.batch_size} (shares {self.shares})"
      )
    return np.array(counts, np.int64)

  def batch_counts(self, k: int) -> np.ndarray:
    """int64 [S] rows of each source in batch k (0-based): >= 0, sum B."""
    counts = self.cumulative(k + 1) - self.cumulative(k)
    if (counts < 0).any():
      raise AssertionError(
        f"mixture: negative count {counts} in batch {k} (shares {self.shares})"
      )
    return counts

  def _job(self, i: int, j: int, k: int):
    """(release, ahead [S], start) of job j of source i, for batch k.

    ahead[s]: jobs of source s before it in EDF order (an earlier deadline,
    or the same one and a lower source id). With g(t) = A(t) - B * t over
    those jobs (A(t): how many are released by batch t), the job has run by
    batch k iff min g over [0, release) > min g over [release, k]: the
    queue ahead of it emptied after its release. g is an integer, g(0) = 0,
    and g(t) >= -(sum over sources whose jobs ahead are all released by t of
    q_s(k) - ahead[s]), each term below one row: so g >= 0 up to `start`,
    the batch where those deficits first reach one row, and only the batches
    after it are evaluated.
    """
    w, rate = self.denominator, self.rate
    deadline = -(-j * w // rate[i])
    release = (j - 1) * w // rate[i] + 1
    # Jobs not released by batch k count as not ahead: clip to ceil(q_s(k)).
    ahead = [
      min(j - 1 if s == i else r * (deadline - (s > i)) // w, -(-r * k // w))
      for s, r in enumerate(rate)
    ]
    # (last batch with no job of s released beyond those ahead, deficit).
    full = sorted((a * w // r, r * k - a * w) for a, r in zip(ahead, rate) if r)
    start, deficit = k, 0
    for t, d in full:
      deficit += max(d, 0)
      if deficit >= w:
        start = t
        break
    return release, ahead, start

  def _have_run(self, jobs: dict, k: int) -> list[int]:
    """The sources whose job in `jobs` (from `_job`) has run by batch k."""
    first = min((start for _, _, start in jobs.values()), default=k)
    if k - first > 64:
      return self._have_run_long(jobs, k, first)
    w, b = self.denominator, self.batch_size
    # released[t - first - 1][s]: jobs of source s released by batch t.
    released = [
      [-(-r * t // w) for r in self.rate] for t in range(first + 1, k + 1)
    ]
    run = []
    for i, (release, ahead, start) in jobs.items():
      low, high = 0, None  # min g before the release, and from it on
      for t in range(start + 1, k + 1):
        g = sum(map(min, released[t - first - 1], ahead)) - b * t
        if t < release:
          low = min(low, g)
        else:
          high = g if high is None else min(high, g)
      if high is not None and low > high:
        run.append(i)
    return run

  def _have_run_long(
    self, jobs: dict, k: int, first: int, chunk: int = 1 << 14
  ) -> list[int]:
    """`_have_run` over a long window (a source far below one row per
    batch): the same sums, vectorised over batches in chunks."""
    low: dict[int, int] = dict.fromkeys(jobs, 0)
    high: dict[int, int | None] = dict.fromkeys(jobs, None)
    for t0 in range(first + 1, k + 1, chunk):
      t = np.arange(t0, min(t0 + chunk, k + 1), dtype=np.int64)
      released = np.stack([_ceil_rows(x, t) for x in self.rows_per_batch], 1)
      for i, (release, ahead, start) in jobs.items():
        keep = t > start
        g = (
          np.minimum(released[keep], np.array(ahead, np.int64)).sum(1)
          - self.batch_size * t[keep]
        )
        before, after = g[t[keep] < release], g[t[keep] >= release]
        low[i] = min(low[i], int(before.min(initial=0)))
        if after.size:
          m, h = int(after.min()), high[i]
          high[i] = m if h is None else min(h, m)
    return [i for i in jobs if (h := high[i]) is not None and low[i] > h]


def _ceil_rows(per_batch: Fraction, t: np.ndarray) -> np.ndarray:
  """ceil(per_batch * t), int64 [L], exactly, for int64 t [L] > 0."""
  num, den = per_batch.numerator, per_batch.denominator
  whole, part = divmod(num, den)
  if den <= (1 << 62) // int(t[-1]):  # part * t fits in int64
    return whole * t - (-part * t // den)
  # Floats are exact here except within t * 2^-52 of an integer (part < den
  # and each float op has relative error 2^-53); those few are redone.
  x = t * (part / den)
  out = whole * t + np.ceil(x).astype(np.int64)
  for n in np.flatnonzero(np.abs(x - np.rint(x)) <= int(t[-1]) * 2.0**-48):
    out[n] = -(-num * int(t[n]) // den)
  return out


class StageSchedule(grain.transforms.DatasetSelectionMap):
  """Maps a global row index to (source id, row index within that source).

  Args:
    start_steps: first step of each stage, increasing, starting at 0.
    weights: [num_stages][num_sources] weights >= 0 (normalised per stage).
    batch_size: B, global rows per step.
    seed: seed of the permutation inside each batch.
  """

  def __init__(self, start_steps, weights, batch_size: int, seed: int):
    self.starts = np.asarray(start_steps, np.int64)
    self.batch_size = batch_size
    self.seed = seed
    self.stages = [Apportionment(w, batch_size) for w in weights]
    # Rows of each source drawn before each stage.
    self.base = np.zeros((len(self.stages), len(weights[0])), np.int64)
    for i in range(1, len(self.stages)):
      steps = int(self.starts[i] - self.starts[i - 1])
      self.base[i] = self.base[i - 1] + self.stages[i - 1].cumulative(steps)

  def __len__(self):
    return sys.maxsize

  @functools.lru_cache(maxsize=16)  # noqa: B019  (bounded, as above)
  def _batch(self, stage: int, k: int):
    """(source label [B], rank among same-label rows [B]) of batch k."""
    counts = self.stages[stage].batch_counts(k)
    rng = np.random.default_rng([self.seed, int(self.starts[stage]), k])
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    first = np.cumsum(counts) - counts
    order = np.argsort(labels, kind="stable")
    rank = np.empty_like(labels)
    rank[order] = np.arange(len(labels)) - first[labels[order]]
    return labels, rank

  def __getitem__(self, index: int) -> tuple[int, int]:
    step, j = divmod(int(index), self.batch_size)
    stage = int(np.searchsorted(self.starts, step, side="right")) - 1
    k = step - int(self.starts[stage])
    labels, rank = self._batch(stage, k)
    s = int(labels[j])
    drawn = self.stages[stage].cumulative(k)[s]
    return s, int(self.base[stage, s] + drawn + rank[j])


class ProcessRows(grain.transforms.DatasetSelectionMap):
  """The rows of data shard s of S (what one process reads): local row l of
  step t is global row t * B + s * (B / S) + l % (B / S)."""

  def __init__(
    self,
    schedule: StageSchedule,
    global_batch: int,
    shard_index: int,
    shard_count: int,
  ):
    self.schedule = schedule
    self.global_batch = global_batch
    self.local = global_batch // shard_count
    self.offset = shard_index * self.local

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, index: int) -> tuple[int, int]:
    step, l = divmod(int(index), self.local)
    return self.schedule[step * self.global_batch + self.offset + l]
