"""Weight-merging arithmetic on one tensor: linear, SLERP, interpolation to
the base. Pure NumPy, float32; the sums behind norms and angles
are taken over chunks and added up in float64.

    merged = linear([x1, x2, x3], weights=(0.5, 0.3, 0.2))
    delta = slerp(x_a - base, x_b - base, t=0.5)        # task vectors
    theta = toward_base(base, base + delta, eta=0.7)    # WARP's LITI

SLERP of two task vectors a, b (WARP, Ramé et al. 2024, arXiv 2406.16768,
which applies Shoemake's formula to the task vectors as they are):

    slerp(a, b, t) = sin((1 - t) W) / sin W * a + sin(t W) / sin W * b

with W the angle between a and b. The vectors are not normalised first, so
the result is exactly a at t = 0 and b at t = 1; between them the direction
moves along the arc, and when |a| = |b| the norm stays |a| all the way (a
linear average shrinks it to |a| cos(W / 2) at t = 1/2). With different
norms the norm moves smoothly, not linearly, from |a| to |b|. Where W is
undefined or the arc degenerates (a zero vector, W < 1e-4 rad, or W within
1e-4 of pi) this falls back to linear interpolation; below 1e-4 rad the two
differ by less than W^2/8 ~ 1e-9 relative, under float32 precision.
"""

import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

DEGENERATE_ANGLE = 1e-4     # radians
CHUNK = 1 << 20             # elements per step of chunked work


def as_f32(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def chunks(*xs: np.ndarray, size: int = CHUNK
           ) -> Iterator[tuple[np.ndarray, ...]]:
  """Aligned flat slices (views) of equally sized arrays."""
  flat = [x.reshape(-1) for x in xs]
  for i in range(0, flat[0].size, size):
    yield tuple(f[i:i + size] for f in flat)


Pairs = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def angle_of(pairs: Pairs) -> float | None:
  """Angle in [0, pi] between vectors a and b given as aligned float32
  chunks (`pairs()` yields (a_chunk, b_chunk), and is called twice); None
  if either vector is zero.

  Kahan's form 2 atan2(|u - v|, |u + v|) of the unit vectors u, v stays
  accurate for nearly parallel vectors, where arccos of the cosine loses
  half the digits. Chunk sums are float32, their total float64.
  """
  sq_a, sq_b = [], []
  for ca, cb in pairs():
    sq_a.append(float(np.dot(ca, ca)))
    sq_b.append(float(np.dot(cb, cb)))
  ra, rb = math.sqrt(math.fsum(sq_a)), math.sqrt(math.fsum(sq_b))
  if ra == 0.0 or rb == 0.0:
    return None
  sa, sb = np.float32(1.0 / ra), np.float32(1.0 / rb)
  diff, plus = [], []
  for ca, cb in pairs():
    u, v = ca * sa, cb * sb
    d, s = u - v, u + v
    diff.append(float(np.dot(d, d)))
    plus.append(float(np.dot(s, s)))
  return 2.0 * math.atan2(math.sqrt(math.fsum(diff)),
                          math.sqrt(math.fsum(plus)))


def angle(a, b) -> float | None:
  """Angle in [0, pi] between a and b, or None if either is zero."""
  a, b = as_f32(a), as_f32(b)
  return angle_of(lambda: chunks(a, b))


def slerp_coefficients(pairs: Pairs, t: float) -> tuple[float, float] | None:
  """(sin((1-t)W) / sin W, sin(tW) / sin W) for the vectors in `pairs`, or
  None where SLERP degenerates and linear interpolation is used instead."""
  w = angle_of(pairs)
  if w is None or w < DEGENERATE_ANGLE or math.pi - w < DEGENERATE_ANGLE:
    return None
  s = math.sin(w)
  return math.sin((1.0 - t) * w) / s, math.sin(t * w) / s


def combine(coefficients: tuple[float, float] | None, a, b, t: float
            ) -> np.ndarray:
  """s0 a + s1 b for SLERP's coefficients, or lerp(a, b, t) for None."""
  if coefficients is None:
    return lerp(a, b, t)
  s0, s1 = coefficients
  return np.float32(s0) * as_f32(a) + np.float32(s1) * as_f32(b)


def lerp(a, b, t: float) -> np.ndarray:
  """(1 - t) a + t b in float32; exactly a at t = 0, b at t = 1, and a
  when a == b."""
  a, b = as_f32(a), as_f32(b)
  t = np.float32(t)
  if t < 0.5:
    return a + t * (b - a)
  return b - (np.float32(1) - t) * (b - a)


def slerp(a, b, t: float) -> np.ndarray:
  """Spherical interpolation of task vectors a, b (any equal shapes), float32.

  See the module docstring for the formula and the norm convention.
  """
  a, b = as_f32(a), as_f32(b)
  return combine(slerp_coefficients(lambda: chunks(a, b), t), a, b, t)


def weighted_delta(tensors: Sequence[np.ndarray], weights: Sequence[float],
                   anchor: np.ndarray) -> np.ndarray:
  """sum_i w_i (x_i - anchor) in float32 (zeros for no tensors)."""
  anchor = as_f32(anchor)
  out = np.zeros(anchor.shape, np.float32)
  term = np.empty(anchor.shape, np.float32)
  for x, w in zip(tensors, weights):
    if w != 0.0:
      np.subtract(as_f32(x), anchor, out=term)
      term *= np.float32(w)
      out += term
  return out


def linear(tensors: Sequence[np.ndarray], weights: Sequence[float],
           anchor: np.ndarray | None = None) -> np.ndarray:
  """anchor + sum_i w_i (x_i - anchor), float32; anchor defaults to x_1.

  With weights summing to 1 this is the weighted average sum_i w_i x_i;
  with a base as the anchor it is task arithmetic (weights free). Working on
  differences keeps the merge of identical tensors bitwise the identity.
  """
  if anchor is None:   # x_1's own term is zero
    anchor, tensors, weights = tensors[0], tensors[1:], weights[1:]
  anchor = as_f32(anchor)
  return anchor + weighted_delta(tensors, weights, anchor)


def toward_base(base, merged, eta: float) -> np.ndarray:
  """base + eta (merged - base), float32: WARP's LITI. eta = 0 gives the
  base, eta = 1 the merged tensor, both exactly."""
  base, merged = as_f32(base), as_f32(merged)
  if eta == 1.0:
    return merged
  return base + np.float32(eta) * (merged - base)
