"""Distillation losses from a teacher's next-token distribution.

Pure functions, float32, per target position; B batch, T positions, V
vocabulary, K stored top-k entries.

    # online: the teacher's full logits
    loss = distill_token_losses(student_logits, teacher_logits, temperature)
    # offline: a dump of the teacher's top-k log-probs and ids
    logprobs, ids = encode_topk(teacher_logits, k=64, temperature=1.0)
    loss = topk_distill_token_losses(student_logits, logprobs, ids,
                                     temperature=1.0, tail="bucket")

Every loss is the cross-entropy -sum_v p_T(v) log p_S(v) of the student's
distribution against the teacher's, both at temperature tau (softmax of
logits / tau), as in the Gemma 2 report, multiplied by tau^2 as Hinton et
al. (2015) and MaxText do: the gradient wrt the student logits is then
tau (p_S - p_T), so the distillation term keeps its weight against the hard
cross-entropy when tau changes (at tau = 1 nothing is scaled). kl=True
subtracts the teacher's entropy: tau^2 KL(p_T || p_S), 0 when the student
matches, with the same gradient. The teacher is a constant (no gradient).
The caller combines and averages like the hard loss, e.g.
alpha * distill + (1 - alpha) * ce, summed with the loss mask and divided
by the number of target tokens.

Offline top-k, `tail`:
  "renormalize"  teacher and student both renormalised over the teacher's
                 top-k ids (MaxText's offline loss): matches the student's
                 distribution *given* the top-k set; the student's mass
                 outside the top-k gets no gradient from this term.
  "bucket"       the teacher's tail mass r = 1 - sum(top-k) is one more
                 class, matched against the student's mass outside those ids:
                 -sum_k p_T log p_S - r log(1 - sum_k p_S). Its minimum is a
                 student that agrees with the teacher on every top-k token
                 *and* on the tail mass; only how the tail is shared is free.
Rejected: the student's full-vocabulary log-probs at the top-k ids against
the renormalised teacher. That is "bucket" with the tail mass set to 0: it
trains the student to put all its mass on the teacher's top-k, more
confident than the teacher by exactly the mass the dump dropped.
With K = V all three equal the full loss.

The dump stores the teacher's log-probs *at the distillation temperature*
(`encode_topk(..., temperature)`): the tail mass at another temperature is
not recoverable from the top-k alone.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gemma_jax.errors import DataError

TAILS = ("renormalize", "bucket")
LOGPROB_DTYPE = ml_dtypes.bfloat16   # stored log-probs: 2 bytes
ID_DTYPE = np.dtype("<i4")           # stored ids: 4 bytes, little-endian


def _xlogy(x, y):
  """x log y with 0 log 0 = 0 (also where y = -inf as log of 0)."""
  return jnp.where(x > 0, x * y, 0.0)


def distill_token_losses(student_logits, teacher_logits,
                         temperature: float = 1.0, *, kl: bool = False
                         ) -> jax.Array:
  """tau^2 * -sum_v p_T(v) log p_S(v) per position: [B, T, V] x2 -> [B, T].

  kl: subtract the teacher's entropy (tau^2 KL(p_T || p_S)).
  """
  tau = jnp.float32(temperature)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau)
  log_p = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / tau)
  p = jnp.exp(log_p)
  loss = -jnp.sum(_xlogy(p, log_q), axis=-1)
  if kl:
    loss += jnp.sum(_xlogy(p, log_p), axis=-1)
  return tau * tau * loss


def topk_distill_token_losses(student_logits, teacher_topk_logprobs,
                              teacher_topk_ids, temperature: float = 1.0,
                              tail: str = "renormalize", *, kl: bool = False
                              ) -> jax.Array:
  """Distillation loss from the teacher's top-k only: [B, T] float32.

  student_logits: [B, T, V]. teacher_topk_logprobs: [B, T, K], the teacher's
    log-probs at `temperature` (any float dtype, finite). teacher_topk_ids:
    [B, T, K] int, distinct per position. tail: see the module docstring.
  """
  if tail not in TAILS:
    raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
  tau = jnp.float32(temperature)
  z = student_logits.astype(jnp.float32) / tau
  ids = teacher_topk_ids.astype(jnp.int32)
  lp = jax.lax.stop_gradient(teacher_topk_logprobs).astype(jnp.float32)
  z_k = jnp.take_along_axis(z, ids, axis=-1)                   # [B, T, K]
  if tail == "renormalize":
    log_p = jax.nn.log_softmax(lp)
    log_q = jax.nn.log_softmax(z_k)
    loss = -jnp.sum(_xlogy(jnp.exp(log_p), log_q), axis=-1)
    if kl:
      loss += jnp.sum(_xlogy(jnp.exp(log_p), log_p), axis=-1)
    return tau * tau * loss
  lse = jax.nn.logsumexp(z, axis=-1)                           # [B, T]
  log_q = z_k - lse[..., None]
  # Teacher: top-k mass and tail r, from log sum_k p; rounding in the dump
  # may push the sum past 1, then the top-k is renormalised and r = 0.
  log_mass = jax.nn.logsumexp(lp, axis=-1)
  r = -jnp.expm1(jnp.minimum(log_mass, 0.0))
  log_p = lp - jnp.maximum(log_mass, 0.0)[..., None]
  # Student: log of the mass outside the top-k ids, without cancellation.
  outside = jnp.put_along_axis(z, ids, -jnp.inf, axis=-1, inplace=False)
  has_tail = jnp.any(outside > -jnp.inf, axis=-1)
  outside = jnp.where(has_tail[..., None], outside, 0.0)   # K = V: no tail
  log_tail = jax.nn.logsumexp(outside, axis=-1) - lse
  use_tail = has_tail & (r > 0)
  loss = (-jnp.sum(_xlogy(jnp.exp(log_p), log_q), axis=-1)
          - jnp.where(use_tail, r * jnp.where(use_tail, log_tail, 0.0), 0.0))
  if kl:
    loss += (jnp.sum(_xlogy(jnp.exp(log_p), log_p), axis=-1)
             + _xlogy(r, jnp.log(jnp.where(r > 0, r, 1.0))))
  return tau * tau * loss


def encode_topk(teacher_logits, k: int, temperature: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
  """The dump of one teacher forward: [..., V] -> log-probs at
  `temperature` of the k most likely ids (bfloat16 [..., k], descending)
  and those ids (int32 [..., k])."""
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32)
                             / jnp.float32(temperature))
  values, ids = jax.lax.top_k(log_p, k)
  return values.astype(LOGPROB_DTYPE), ids.astype(jnp.int32)


def bytes_per_token(k: int) -> int:
  """Storage of one position's top-k: k bfloat16 log-probs + k int32 ids."""
  return k * (np.dtype(LOGPROB_DTYPE).itemsize + ID_DTYPE.itemsize)


def pack_topk(logprobs, ids) -> bytes:
  """One record (e.g. an ArrayRecord entry) from [T, K] log-probs and ids:
  the log-probs as little-endian bfloat16, then the ids as int32."""
  logprobs = np.asarray(logprobs).astype(LOGPROB_DTYPE)
  ids = np.asarray(ids)
  if logprobs.shape != ids.shape:
    raise ValueError(f"log-probs {logprobs.shape} and ids {ids.shape} differ")
  return (logprobs.view(np.uint16).astype("<u2").tobytes()
          + ids.astype(ID_DTYPE).tobytes())


def unpack_topk(record: bytes, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of `pack_topk`: (bfloat16 [T, k], int32 [T, k])."""
  per = bytes_per_token(k)
  if len(record) % per:
    raise DataError(f"a top-{k} record holds a multiple of {per} bytes; got "
                    f"{len(record)}: written with another k?")
  t = len(record) // per
  half = t * k * 2
  logprobs = np.frombuffer(record[:half], "<u2").astype(np.uint16).view(
      LOGPROB_DTYPE).reshape(t, k)
  ids = np.frombuffer(record[half:], ID_DTYPE).astype(np.int32).reshape(t, k)
  return logprobs, ids
