"""Distillation losses from a teacher's next-token distribution, and the
format of a dump of its top-k.

Pure functions, float32, per target position; B batch, T positions, V
vocabulary, K stored top-k entries.

    # online: the teacher's full logits
    loss = distill_token_losses(student_logits, teacher_logits, temperature)
    # offline: a dump of the teacher's top-k log-probs and ids
    dump = encode_topk(teacher_logits, k=64, temperature=1.0)
    loss = topk_distill_token_losses(student_logits, dump.logprobs,
                                     dump.ids, temperature=1.0, tail="bucket",
                                     teacher_tail_logmass=dump.tail)
    record = pack_topk(dump)         # bytes_per_token(64) = 388 per position
    # offline, sampled (Gemma 3): k ids drawn without replacement
    dump = encode_sample(teacher_logits, k=256, temperature=1.0, key=key)
    loss = sampled_distill_token_losses(student_logits, dump.logprobs,
                                        dump.ids, dump.tail, 1.0)
    # a dump file's record of one row: CRC-32 of the row's tokens + top-k
    encode_record(dump, row_checksum(batch, row))

Every loss is the cross-entropy of the student's distribution against the
teacher's, both at temperature tau, times tau^2 (kl=True subtracts the
teacher's entropy). Why, the two offline tails ("renormalize", "bucket")
and the one rejected, and the dump's 6k + 4 bytes per position: see
docs/distillation.md, "The loss functions".

A sampled dump (Gemma 3's: 256 teacher logits sampled per token in
proportion to the teacher's probabilities, Gemma 3 report, arXiv
2503.19786, section 2.2)
draws k distinct ids per position with the Gumbel top-k trick: the k
largest log p_T(v) + G_v, G_v i.i.d. Gumbel(0, 1), are a sample without
replacement in proportion to p_T. Its float32 slot holds the threshold
kappa, the (k+1)-th largest perturbed log-prob (-inf when k = V). The loss
weighs each sampled id by p_T(v) / pi_v, with pi_v = 1 - exp(-exp(log
p_T(v) - kappa)) its inclusion probability given kappa: a Horvitz-Thompson
estimator, unbiased for the full loss and its gradient (Kool, van Hoof and
Welling 2019, "Stochastic Beams and Where to Find Them", arXiv 1903.06059:
their importance-weighted estimator from a Gumbel top-k sample; the same
as priority sampling, Duffield, Lund and Thorup 2007). The report's
own form instead renormalises p_T over the sample, which is biased toward
the sampled ids; docs/distillation.md compares the two.
"""

import struct
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gemma_jax.errors import DataError
from gemma_jax.train.config import TAILS

LOGPROB_DTYPE = ml_dtypes.bfloat16  # stored log-probs: 2 bytes
ID_DTYPE = np.dtype("<i4")  # stored ids: 4 bytes, little-endian
TAIL_DTYPE = np.dtype("<f4")  # stored tail log-mass: 4 bytes
_CRC = struct.Struct("<I")  # per-record CRC-32 of the row's tokens


def _xlogy(x, y):
  """x log y with 0 log 0 = 0 (also where y = -inf as log of 0)."""
  return jnp.where(x > 0, x * y, 0.0)


def distill_token_losses(
  student_logits, teacher_logits, temperature: float = 1.0, *, kl: bool = False
) -> jax.Array:
  """tau^2 * -sum_v p_T(v) log p_S(v) per position: [B, T, V] x2 -> [B, T].

  kl: subtract the teacher's entropy (tau^2 KL(p_T || p_S)).
  """
  tau = jnp.float32(temperature)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau)
  log_p = jax.nn.log_softmax(
    jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / tau
  )
  p = jnp.exp(log_p)
  loss = -jnp.sum(_xlogy(p, log_q), axis=-1)
  if kl:
    loss += jnp.sum(_xlogy(p, log_p), axis=-1)
  return tau * tau * loss


def topk_distill_token_losses(
  student_logits,
  teacher_topk_logprobs,
  teacher_topk_ids,
  temperature: float = 1.0,
  tail: str = "renormalize",
  *,
  teacher_tail_logmass=None,
  kl: bool = False,
) -> jax.Array:
  """Distillation loss from the teacher's top-k only: [B, T] float32.

  student_logits: [B, T, V]. teacher_topk_logprobs: [B, T, K], the teacher's
    log-probs at `temperature` (any float dtype, finite). teacher_topk_ids:
    [B, T, K] int, distinct per position. tail: see the module docstring.
  teacher_tail_logmass: [B, T], log of the teacher's mass outside the top-k
    (`encode_topk` stores it); "bucket" then uses it and scales the top-k
    to the remaining mass. Without it the tail is 1 - sum(top-k), which
    bfloat16 log-probs give only to about 3e-3.
  """
  if tail not in TAILS:
    raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
  tau = jnp.float32(temperature)
  z = student_logits.astype(jnp.float32) / tau
  ids = teacher_topk_ids.astype(jnp.int32)
  lp = jax.lax.stop_gradient(teacher_topk_logprobs).astype(jnp.float32)
  z_k = jnp.take_along_axis(z, ids, axis=-1)  # [B, T, K]
  if tail == "renormalize":
    log_p = jax.nn.log_softmax(lp)
    log_q = jax.nn.log_softmax(z_k)
    loss = -jnp.sum(_xlogy(jnp.exp(log_p), log_q), axis=-1)
    if kl:
      loss += jnp.sum(_xlogy(jnp.exp(log_p), log_p), axis=-1)
    return tau * tau * loss
  # Teacher: tail mass r and top-k log-probs scaled to sum to 1 - r.
  log_mass = jax.nn.logsumexp(lp, axis=-1)
  if teacher_tail_logmass is None:
    # Rounding in the dump may push the sum past 1: then r = 0.
    r = -jnp.expm1(jnp.minimum(log_mass, 0.0))
  else:
    r = jnp.exp(jax.lax.stop_gradient(teacher_tail_logmass).astype(jnp.float32))
  log_p = lp - log_mass[..., None] + jnp.log1p(-r)[..., None]
  # Student: log-probs at the ids and log of the mass outside them.
  lse = jax.nn.logsumexp(z, axis=-1)
  log_q = z_k - lse[..., None]
  log_tail = _log_mass_outside(z - lse[..., None], ids)
  # No tail to match where the top-k covers the whole vocabulary.
  use_tail = (r > 0) & (log_tail > -jnp.inf)
  loss = -jnp.sum(_xlogy(jnp.exp(log_p), log_q), axis=-1) - _xlogy(
    r, jnp.where(use_tail, log_tail, 0.0)
  )
  if kl:
    loss += jnp.sum(_xlogy(jnp.exp(log_p), log_p), axis=-1) + _xlogy(
      r, jnp.log(jnp.where(use_tail, r, 1.0))
    )
  return tau * tau * loss


def sampled_distill_token_losses(
  student_logits,
  teacher_logprobs,
  teacher_ids,
  threshold,
  temperature: float = 1.0,
  *,
  kl: bool = False,
) -> jax.Array:
  """Unbiased estimate of `distill_token_losses` from a sampled dump:
  [B, T] float32.

  student_logits: [B, T, V]. teacher_logprobs, teacher_ids: [B, T, K], the
    teacher's log-probs at `temperature` at K distinct ids drawn by
    `encode_sample`. threshold: [B, T], its Gumbel threshold kappa.
  Each id weighs w_v = p_T(v) / pi_v (module docstring); the loss is
  -tau^2 sum_v w_v log p_S(v), the student's full softmax (kl=True adds
  tau^2 sum_v w_v log p_T(v), an unbiased estimate of minus the entropy).
  """
  tau = jnp.float32(temperature)
  z = student_logits.astype(jnp.float32) / tau
  ids = teacher_ids.astype(jnp.int32)
  log_q = jnp.take_along_axis(z, ids, axis=-1) - jax.nn.logsumexp(
    z, axis=-1, keepdims=True
  )
  lp = jax.lax.stop_gradient(teacher_logprobs).astype(jnp.float32)
  w = _sample_weights(lp, jax.lax.stop_gradient(threshold))
  loss = -jnp.sum(_xlogy(w, log_q), axis=-1)
  if kl:
    loss += jnp.sum(_xlogy(w, lp), axis=-1)
  return tau * tau * loss


def _sample_weights(lp, threshold):
  """p / pi per sampled id [..., K]: pi = 1 - exp(-exp(lp - kappa)), the
  chance that id's perturbed log-prob exceeds kappa (1 where kappa =
  -inf: the sample is the whole vocabulary); 0 where p = 0."""
  kappa = threshold.astype(jnp.float32)[..., None]
  gap = jnp.where(kappa > -jnp.inf, lp - kappa, jnp.inf)
  log_pi = jnp.log(-jnp.expm1(-jnp.exp(gap)))
  return jnp.where(lp > -jnp.inf, jnp.exp(lp - log_pi), 0.0)


def encode_sample(teacher_logits, k: int, temperature: float, key) -> "TopK":
  """A sampled dump of one teacher forward [..., V] at `temperature`: k
  distinct ids drawn in proportion to p_T (Gumbel top-k with `key`), the
  teacher's log-probs at them and the threshold kappa (module docstring).
  """
  log_p = jax.nn.log_softmax(
    teacher_logits.astype(jnp.float32) / jnp.float32(temperature)
  )
  v = log_p.shape[-1]
  perturbed = log_p + jax.random.gumbel(key, log_p.shape, jnp.float32)
  keys, ids = jax.lax.top_k(perturbed, min(k + 1, v))
  kappa = keys[..., k] if k < v else jnp.full(keys.shape[:-1], -jnp.inf)
  ids = ids[..., :k]
  return TopK(
    jnp.take_along_axis(log_p, ids, axis=-1).astype(LOGPROB_DTYPE),
    ids.astype(jnp.int32),
    kappa,
  )


class TopK(NamedTuple):
  """One dump of the teacher: k ids per position, its most likely
  (`encode_topk`) or sampled ones (`encode_sample`)."""

  logprobs: Any  # bfloat16 [..., K], log p_T at the temperature
  ids: Any  # int32 [..., K]
  tail: Any  # float32 [...]: top-k, log of the mass outside; sample, kappa


def encode_topk(teacher_logits, k: int, temperature: float = 1.0) -> TopK:
  """The dump of one teacher forward [..., V] at `temperature`.

  The tail mass is stored on its own (float32): recomputed as 1 minus the
  sum of the bfloat16 top-k probabilities it is off by up to 3e-3, as much
  as the whole tail of a confident teacher.
  """
  log_p = jax.nn.log_softmax(
    teacher_logits.astype(jnp.float32) / jnp.float32(temperature)
  )
  values, ids = jax.lax.top_k(log_p, k)
  return TopK(
    values.astype(LOGPROB_DTYPE),
    ids.astype(jnp.int32),
    _log_mass_outside(log_p, ids),
  )


def _log_mass_outside(log_p, ids):
  """log sum_{v not in ids} exp(log_p[v]) [...], -inf if ids cover all of
  V; without the cancellation of log(1 - sum over ids)."""
  outside = jnp.put_along_axis(log_p, ids, -jnp.inf, axis=-1, inplace=False)
  empty = jnp.all(outside == -jnp.inf, axis=-1)
  safe = jnp.where(empty[..., None], 0.0, outside)
  return jnp.where(empty, -jnp.inf, jax.nn.logsumexp(safe, axis=-1))


def bytes_per_token(k: int) -> int:
  """Storage of one position: k bfloat16 log-probs, k int32 ids and the
  float32 tail log-mass."""
  return (
    k * (np.dtype(LOGPROB_DTYPE).itemsize + ID_DTYPE.itemsize)
    + TAIL_DTYPE.itemsize
  )


def pack_topk(topk: TopK) -> bytes:
  """One record (e.g. an ArrayRecord entry) from a [T, K] dump, all
  little-endian: log-probs (bfloat16), ids (int32), tails (float32)."""
  logprobs = np.asarray(topk.logprobs).astype(LOGPROB_DTYPE)
  ids, tail = np.asarray(topk.ids), np.asarray(topk.tail)
  if logprobs.shape != ids.shape or tail.shape != ids.shape[:-1]:
    raise ValueError(
      f"log-probs {logprobs.shape}, ids {ids.shape} and tail "
      f"{tail.shape} do not describe one [T, K] dump"
    )
  return (
    logprobs.view(np.uint16).astype("<u2").tobytes()
    + ids.astype(ID_DTYPE).tobytes()
    + tail.astype(TAIL_DTYPE).tobytes()
  )


def unpack_topk(record: bytes, k: int) -> TopK:
  """Inverse of `pack_topk`: bfloat16 [T, k], int32 [T, k], float32 [T]."""
  per = bytes_per_token(k)
  if len(record) % per:
    raise DataError(
      f"a top-{k} record holds a multiple of {per} bytes; got "
      f"{len(record)}: written with another k?"
    )
  t = len(record) // per
  ends = np.cumsum([t * k * 2, t * k * 4])
  logprobs = (
    np.frombuffer(record[: ends[0]], "<u2")
    .astype(np.uint16)
    .view(LOGPROB_DTYPE)
    .reshape(t, k)
  )
  ids = np.frombuffer(record[ends[0] : ends[1]], ID_DTYPE).astype(np.int32)
  tail = np.frombuffer(record[ends[1] :], TAIL_DTYPE).astype(np.float32)
  return TopK(logprobs, ids.reshape(t, k), tail)


# A dump's records (one per row) and batch arrays.
def row_checksum(batch: dict, row: int) -> int:
  """CRC-32 of one row's tokens and layout: ties a record to its row."""
  crc = 0
  for key in ("inputs", "targets", "segment_ids", "loss_mask"):
    crc = zlib.crc32(
      np.ascontiguousarray(batch[key][row], np.int32).tobytes(), crc
    )
  return crc


def record_bytes(seq_len: int, k: int) -> int:
  """Bytes of one row's record: its CRC-32, then seq_len packed top-k."""
  return _CRC.size + seq_len * bytes_per_token(k)


def encode_record(topk: TopK, crc: int) -> bytes:
  """One row's record: CRC-32 of its tokens, then the packed top-k."""
  return _CRC.pack(crc) + pack_topk(topk)


def decode_record(record: bytes, k: int) -> tuple[int, TopK]:
  return _CRC.unpack_from(record)[0], unpack_topk(record[_CRC.size :], k)


def dump_batch(rows: int, t: int, k: int, sharding) -> dict:
  """The batch keys a dump adds: log-probs bfloat16 [B, T, K], ids int32
  [B, T, K] and float32 [B, T] (top-k: the log tail mass; a sample: its
  threshold kappa)."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(
    shape, dtype, sharding=sharding
  )
  return dict(
    teacher_logprobs=spec((rows, t, k), LOGPROB_DTYPE),
    teacher_ids=spec((rows, t, k), jnp.int32),
    teacher_tail=spec((rows, t), jnp.float32),
  )
