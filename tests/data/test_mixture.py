"""Staged mixture: every source within one row of its share after every batch
of every stage, monotone, pure in the step, stage-edit safe."""

import math
from fractions import Fraction

import numpy as np
import pytest

from gemma_jax.data import mixture
from gemma_jax.data.mixture import Apportionment, ProcessRows, StageSchedule


def random_weights(rng, s):
  """Weights with tiny (1e-4, 3e-3) and zero shares mixed in."""
  w = rng.dirichlet(np.ones(s) * rng.choice([0.2, 1.0, 5.0]))
  if rng.random() < 0.4:
    w[rng.integers(s)] = 1e-4
  if rng.random() < 0.3:
    w[rng.integers(s)] = 3e-3
  if rng.random() < 0.3:
    w[rng.integers(s)] = 0.0
  if rng.random() < 0.2:
    w = np.round(w * 10)  # whole weights: shares with small denominators
  if w.sum() == 0:
    w[0] = 1.0
  return [float(x) for x in w]


def edf_by_replay(weights, batch_size, batches):
  """The specification, run batch by batch: C [batches + 1, S].

  Source i's j-th row is a job released in the first batch with
  ceil(q_i) >= j and due in the first batch with floor(q_i) >= j; each batch
  runs the B released jobs with the earliest (deadline, source id)."""
  exact = [Fraction(repr(w)) for w in weights]  # 0.07 is 7/100
  shares = [w / sum(exact) for w in exact]
  counts = [0] * len(shares)
  out = [list(counts)]
  for k in range(1, batches + 1):
    ready = []
    for i, s in enumerate(shares):
      for j in range(counts[i] + 1, math.ceil(s * k * batch_size) + 1):
        ready.append((math.ceil(j / (s * batch_size)), i))
    for _, i in sorted(ready)[:batch_size]:
      counts[i] += 1
    out.append(list(counts))
  return np.array(out)


@pytest.mark.slow
def test_every_source_is_within_one_row_after_every_batch():
  """Random stages (1..120 batches), B in 1..64, shares down to 1e-4 and 0:
  floor(q) <= C <= ceil(q) exactly, counts >= 0 and B rows per batch."""
  rng = np.random.default_rng(0)
  for _ in range(250):
    weights = random_weights(rng, int(rng.integers(2, 7)))
    b = int(rng.integers(1, 65))
    batches = int(rng.integers(1, 121))
    mix = Apportionment(weights, b)
    shares = np.array(weights) / sum(weights)
    c = np.stack([mix.cumulative(k) for k in range(batches + 1)])
    for k in range(batches + 1):
      for i, share in enumerate(mix.shares):
        q = share * k * b
        assert math.floor(q) <= c[k, i] <= math.ceil(q), (weights, b, k)
    target = np.outer(np.arange(batches + 1) * b, shares)
    assert (np.abs(c - target) <= 1 + 1e-9).all()
    per_batch = np.stack([mix.batch_counts(k) for k in range(batches)])
    assert (per_batch >= 0).all() and (per_batch.sum(1) == b).all()
    assert (per_batch[:, shares == 0] == 0).all()


def test_rows_read_by_processes_meet_every_stage_share_at_every_step():
  """Random stages and shares, B in 1..64, 1/2/4 processes: the rows the
  processes read, stage by stage and step by step, are within one row of
  share * rows for every source."""
  rng = np.random.default_rng(3)
  for _ in range(25):
    count = int(rng.choice([1, 2, 4]))
    b = count * int(rng.integers(1, 64 // count + 1))
    starts = np.cumsum([0, *rng.integers(1, 15, size=int(rng.integers(0, 3)))])
    weights = [random_weights(rng, 4) for _ in starts]
    sched = StageSchedule(starts, weights, b, seed=int(rng.integers(99)))
    local = b // count
    steps = int(starts[-1]) + int(rng.integers(1, 15))
    procs = [ProcessRows(sched, b, p, count) for p in range(count)]
    sources = np.array(
      [
        [procs[p][t * local + l][0] for p in range(count) for l in range(local)]
        for t in range(steps)
      ]
    )
    ends = [*starts[1:], steps]
    for first, last, w in zip(starts, ends, weights):
      drawn = np.cumsum(
        [np.bincount(x, minlength=4) for x in sources[first:last]], axis=0
      )
      share = np.array(w) / sum(w)
      target = np.outer(np.arange(1, last - first + 1) * b, share)
      assert (np.abs(drawn - target) <= 1 + 1e-9).all(), (w, b, count)


def test_random_access_equals_replaying_edf():
  """The closed form at batch k equals running EDF through batches 1..k."""
  rng = np.random.default_rng(1)
  for _ in range(120):
    weights = random_weights(rng, int(rng.integers(2, 6)))
    b = int(rng.integers(1, 17))
    batches = int(rng.integers(1, 60))
    mix = Apportionment(weights, b)
    got = np.stack([mix.cumulative(k) for k in range(batches + 1)])
    np.testing.assert_array_equal(
      got, edf_by_replay(weights, b, batches), err_msg=f"{weights} B={b}"
    )


def test_long_windows_take_the_vectorised_path_and_agree(monkeypatch):
  """Two sources far below one row per batch make the window long."""
  calls = []
  long_path = Apportionment._have_run_long
  monkeypatch.setattr(
    Apportionment, "_have_run_long", lambda *a: calls.append(1) or long_path(*a)
  )
  weights = [0.6, 0.3943, 0.0033, 0.0024]
  mix = Apportionment(weights, 1)
  got = np.stack([mix.cumulative(k) for k in range(701)])
  assert calls
  np.testing.assert_array_equal(got, edf_by_replay(weights, 1, 700))


def test_ceil_rows_is_exact_for_small_and_huge_denominators():
  t = np.arange(1, 5001, dtype=np.int64)
  for per_batch in [
    Fraction(7, 3),
    Fraction(1, 2),
    Fraction(0.07 * 8),
    Fraction(0.1) * 3 + Fraction(1, 3),
    Fraction(1, 3) + Fraction(1, 2**70),
  ]:
    expected = [math.ceil(per_batch * int(x)) for x in t]
    assert mixture._ceil_rows(per_batch, t).tolist() == expected


def test_three_stage_example_from_the_issue():
  """.07/.33/.60 from step 0, .5/.5/0 from 24, .15/.15/.70 from 48, batch 8:
  each stage's rows are within one of its shares after every step (the
  block scheme drew 59 code rows of 192 in stage 0, 0.307 for 0.33)."""
  weights = [[0.07, 0.33, 0.60], [0.5, 0.5, 0], [0.15, 0.15, 0.70]]
  sched = StageSchedule([0, 24, 48], weights, batch_size=8, seed=0)
  sources = np.array([sched[r][0] for r in range(72 * 8)]).reshape(72, 8)
  for (first, last), w in zip([(0, 24), (24, 48), (48, 72)], weights):
    drawn = np.cumsum(
      [np.bincount(b, minlength=3) for b in sources[first:last]], axis=0
    )
    target = np.outer(np.arange(1, last - first + 1) * 8, w)
    assert (np.abs(drawn - target) < 1).all()


def test_each_source_row_is_drawn_once_in_order_across_stages():
  sched = StageSchedule(
    [0, 12, 31],
    [[0.5, 0.5, 0], [0.1, 0.2, 0.7], [0, 0, 1]],
    batch_size=8,
    seed=0,
  )
  r = np.array([sched[i] for i in range(8 * 50)])
  for s in range(3):
    np.testing.assert_array_equal(
      np.sort(r[r[:, 0] == s, 1]), np.arange((r[:, 0] == s).sum())
    )
  assert set(r[:96, 0]) == {0, 1} and set(r[248:, 0]) == {2}


def test_batches_hold_their_counts_in_a_seeded_order():
  sched = StageSchedule([0], [[0.5, 0.3, 0.2]], batch_size=64, seed=0)
  r = np.array([sched[i] for i in range(64 * 5)])
  for k, batch in enumerate(r.reshape(5, 64, 2)):
    counts = np.bincount(batch[:, 0], minlength=3)
    assert counts.tolist() == sched.stages[0].batch_counts(k).tolist()
  assert not np.array_equal(r[:64, 0], r[64:128, 0])  # permuted per batch
  other = StageSchedule([0], [[0.5, 0.3, 0.2]], batch_size=64, seed=1)
  assert not np.array_equal([other[i][0] for i in range(64)], r[:64, 0])


def test_adding_a_later_stage_keeps_every_earlier_row():
  one = StageSchedule([0], [[0.6, 0.4, 1e-4]], batch_size=10, seed=2)
  two = StageSchedule([0, 13], [[0.6, 0.4, 1e-4], [0.1, 0.9, 0]], 10, seed=2)
  np.testing.assert_array_equal(
    [one[i] for i in range(130)], [two[i] for i in range(130)]
  )
  # The source rows after the new stage continue where the first left off.
  r = np.array([two[i] for i in range(300)])
  for s in range(2):
    np.testing.assert_array_equal(
      np.sort(r[r[:, 0] == s, 1]), np.arange((r[:, 0] == s).sum())
    )


def test_rows_do_not_depend_on_what_was_read_before():
  """Resuming = a fresh schedule read from step s on; across stage ends."""
  stages = [0, 5, 9]
  weights = [[0.07, 0.33, 0.6], [0.5, 0.5, 0], [1e-4, 0.3, 0.7]]
  served = StageSchedule(stages, weights, 6, seed=3)
  stream = [served[i] for i in range(6 * 15)]
  for start in (4, 5, 8, 9, 12):
    fresh = StageSchedule(stages, weights, 6, seed=3)
    assert [fresh[i] for i in range(6 * start, 6 * 15)] == stream[6 * start :]


def test_process_rows_are_slices_of_the_global_batch():
  rng = np.random.default_rng(2)
  for _ in range(5):
    b = 4 * int(rng.integers(1, 9))
    sched = StageSchedule(
      [0, 3], [random_weights(rng, 4), random_weights(rng, 4)], b, seed=0
    )
    glob = [sched[i] for i in range(b * 6)]
    for count in (1, 2, 4):
      parts = [ProcessRows(sched, b, p, count) for p in range(count)]
      local = b // count
      for step in range(6):
        rows = [
          parts[p][step * local + l] for p in range(count) for l in range(local)
        ]
        assert rows == glob[step * b : (step + 1) * b]


def test_a_whole_share_is_exact_and_a_zero_share_never_drawn():
  mix = Apportionment([1, 1, 2, 0], 8)
  for k in range(50):
    assert mix.cumulative(k).tolist() == [2 * k, 2 * k, 4 * k, 0]


@pytest.mark.parametrize("batch_size", [1, 1024])
def test_batch_one_million_is_exact_without_replay(batch_size):
  """Weights read as decimals: 0.2 of 1,024,000,000 rows is 204,800,000."""
  mix = Apportionment([0.3, 0.2, 0.2, 0.2999, 1e-4], batch_size)
  shares = [Fraction(s) for s in ("0.3", "0.2", "0.2", "0.2999", "0.0001")]
  for k in (1_000_000, 1_000_001):
    counts = mix.cumulative(k)
    assert counts.sum() == k * batch_size
    for share, count in zip(shares, counts):
      assert math.floor(share * k * batch_size) <= count
      assert count <= math.ceil(share * k * batch_size)
  assert (mix.batch_counts(1_000_000) >= 0).all()
