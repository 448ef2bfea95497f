"""Distillation losses against NumPy, their gradients, top-k tails, codec."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.errors import DataError
from gemma_jax.features import distill_loss as distill

B, T, V = 2, 3, 11


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(student, teacher, tau, kl):
  """tau^2 (-sum p_T log p_S) [- H(p_T)], float64."""
  log_q = log_softmax(student.astype(np.float64) / tau)
  log_p = log_softmax(teacher.astype(np.float64) / tau)
  loss = -(np.exp(log_p) * log_q).sum(-1)
  if kl:
    loss += (np.exp(log_p) * log_p).sum(-1)
  return tau * tau * loss


def logits(seed, scale=3.0):
  return (
    scale * np.random.default_rng(seed).standard_normal((B, T, V))
  ).astype(np.float32)


def full_topk(teacher, tau):
  """The whole vocabulary as a 'top-k' dump (K = V), sorted."""
  lp = log_softmax(teacher.astype(np.float64) / tau)
  ids = np.argsort(-lp, axis=-1)
  return np.take_along_axis(lp, ids, -1).astype(np.float32), ids


full = jax.jit(distill.distill_token_losses, static_argnames="kl")
topk = jax.jit(
  distill.topk_distill_token_losses, static_argnames=("tail", "kl")
)
encode = jax.jit(distill.encode_topk, static_argnames="k")
# Gradients of the summed losses wrt the student logits.
full_grad = jax.jit(
  jax.grad(
    lambda x, t, tau, kl: distill.distill_token_losses(x, t, tau, kl=kl).sum()
  ),
  static_argnames="kl",
)
topk_grad = jax.jit(
  jax.grad(
    lambda x, lp, ids, tau, tail, kl, **kw: distill.topk_distill_token_losses(
      x, lp, ids, tau, tail, kl=kl, **kw
    ).sum()
  ),
  static_argnames=("tail", "kl"),
)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("kl", [False, True])
def test_full_vocabulary_loss_matches_numpy(tau, kl):
  s, t = logits(0), logits(1)
  out = full(s, t, tau, kl=kl)
  assert out.shape == (B, T) and out.dtype == jnp.float32
  np.testing.assert_allclose(
    out, reference(s, t, tau, kl), rtol=1e-5, atol=1e-5
  )
  if kl:
    assert (np.asarray(out) > 0).all()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_gradient_is_tau_times_p_student_minus_p_teacher(tau):
  s, t = logits(2), logits(3)
  for kl in (False, True):
    g = full_grad(s, t, tau, kl=kl)
    p_s = np.exp(log_softmax(s.astype(np.float64) / tau))
    p_t = np.exp(log_softmax(t.astype(np.float64) / tau))
    np.testing.assert_allclose(g, tau * (p_s - p_t), atol=1e-6)


@pytest.mark.slow
def test_gradient_is_zero_when_student_equals_teacher():
  s = logits(4)
  for kl in (False, True):
    g = full_grad(s, s, 1.0, kl=kl)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)
  ids = encode(jnp.asarray(s), k=4).ids
  # The teacher's exact top-k log-probs (float32, not the bf16 dump).
  lp = jnp.take_along_axis(jax.nn.log_softmax(s), ids, axis=-1)
  for tail in distill.TAILS:
    g = topk_grad(s, lp, ids, 1.0, tail=tail, kl=False)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("tail", distill.TAILS)
@pytest.mark.parametrize("tau, kl", [(1.0, False), (2.0, True)])
def test_topk_with_k_equal_v_is_the_full_loss(tail, tau, kl):
  s, t = logits(5), logits(6)
  lp, ids = full_topk(t, tau)
  out = topk(s, lp, ids, tau, tail=tail, kl=kl)
  np.testing.assert_allclose(
    out, reference(s, t, tau, kl), rtol=1e-5, atol=1e-5
  )
  g = topk_grad(s, lp, ids, tau, tail=tail, kl=kl)
  g_full = full_grad(s, t, tau, kl=kl)
  np.testing.assert_allclose(g, g_full, atol=1e-6)


def hand_example(student_probs):
  """Teacher (0.5, 0.3, 0.15, 0.05), its top-2 dumped; [1, 1] positions."""
  lp = np.log([[[0.5, 0.3]]], dtype=np.float32)
  ids = np.array([[[0, 1]]], np.int32)
  student = np.log(np.array([[student_probs]], np.float32))
  return {
    tail: float(topk(student, lp, ids, tail=tail, kl=True)[0, 0])
    for tail in distill.TAILS
  }


@pytest.mark.slow
def test_renormalize_ignores_the_students_tail_mass_and_bucket_does_not():
  # Same top-2 ratio as the teacher (5:3), tail mass 0.6 instead of 0.2.
  out = hand_example([0.25, 0.15, 0.3, 0.3])
  assert out["renormalize"] == pytest.approx(0.0, abs=1e-6)
  expected = 0.5 * math.log(2) + 0.3 * math.log(2) + 0.2 * math.log(0.2 / 0.6)
  assert out["bucket"] == pytest.approx(expected, rel=1e-5)
  # Same top-2 and same tail mass (0.2), shared differently in the tail:
  # both are 0; how the tail mass is split is not in the dump.
  out = hand_example([0.5, 0.3, 0.05, 0.15])
  assert out == pytest.approx({"renormalize": 0.0, "bucket": 0.0}, abs=1e-6)
  # The CE form adds the entropy of what each compares: the renormalised
  # top-2 (5/8, 3/8) or the top-2 plus the tail bucket (0.5, 0.3, 0.2).
  student = np.log(np.array([[[0.5, 0.3, 0.15, 0.05]]], np.float32))
  lp, ids = np.log([[[0.5, 0.3]]], dtype=np.float32), np.array([[[0, 1]]])
  h = lambda *p: -sum(x * math.log(x) for x in p)
  assert float(
    topk(student, lp, ids, tail="renormalize")[0, 0]
  ) == pytest.approx(h(5 / 8, 3 / 8), rel=1e-5)
  assert float(topk(student, lp, ids, tail="bucket")[0, 0]) == pytest.approx(
    h(0.5, 0.3, 0.2), rel=1e-5
  )


@pytest.mark.slow
def test_bucket_is_finite_when_the_top_k_holds_all_the_mass():
  teacher = np.full((B, T, V), -1e9, np.float32)
  teacher[..., :4] = logits(7)[..., :4]  # no mass outside these 4
  dump = encode(jnp.asarray(teacher), k=4)
  assert (np.asarray(dump.tail) < -1e8).all()  # mass exp(tail) = 0
  student = logits(8)
  for kw in ({}, {"teacher_tail_logmass": dump.tail}):
    g = topk_grad(
      student, dump.logprobs, dump.ids, 1.0, tail="bucket", kl=False, **kw
    )
    assert np.isfinite(g).all()
  assert np.isfinite(
    topk(
      student,
      dump.logprobs,
      dump.ids,
      tail="bucket",
      teacher_tail_logmass=dump.tail,
    )
  ).all()


@pytest.mark.slow
def test_dump_codec_round_trip_and_size():
  assert distill.bytes_per_token(64) == 388
  assert distill.bytes_per_token(256) == 1540
  t = jnp.asarray(logits(8).reshape(B * T, V))
  dump = encode(t, k=5, temperature=2.0)
  assert dump.logprobs.dtype == jnp.bfloat16 and dump.ids.dtype == jnp.int32
  exact = np.asarray(jax.nn.log_softmax(t / 2.0), np.float64)
  np.testing.assert_array_equal(dump.ids, np.argsort(-exact, axis=-1)[:, :5])
  top = np.take_along_axis(exact, np.asarray(dump.ids), -1)
  np.testing.assert_allclose(dump.logprobs.astype(jnp.float32), top, rtol=2**-8)
  np.testing.assert_allclose(
    dump.tail, np.log1p(-np.exp(top).sum(-1)), rtol=1e-5
  )
  record = distill.pack_topk(dump)
  assert len(record) == B * T * distill.bytes_per_token(5)
  back = distill.unpack_topk(record, k=5)
  for got, want in zip(back, dump):
    np.testing.assert_array_equal(got, np.asarray(want))
  with pytest.raises(DataError, match="multiple of 28 bytes; got 30"):
    distill.unpack_topk(record[:30], k=4)


@pytest.mark.slow
def test_stored_tail_mass_gives_the_tail_gradient_of_a_confident_teacher():
  # The bucket's gradient wrt the student logits outside the top-k sums to
  # (student tail mass) - (teacher tail mass r): it shows which r was used.
  rng = np.random.default_rng(9)
  teacher = jnp.asarray(6 * rng.standard_normal((B, T, 512)), jnp.float32)
  student = jnp.asarray(rng.standard_normal((B, T, 512)), jnp.float32)
  dump = encode(teacher, k=16)
  outside = np.ones((B, T, 512), bool)
  np.put_along_axis(outside, np.asarray(dump.ids), False, axis=-1)
  p_s = np.exp(log_softmax(np.asarray(student, np.float64)))
  p_t = np.exp(log_softmax(np.asarray(teacher, np.float64)))
  expected = (p_s * outside).sum(-1) - (p_t * outside).sum(-1)

  def tail_gradient(**kw):
    g = topk_grad(
      student, dump.logprobs, dump.ids, 1.0, tail="bucket", kl=False, **kw
    )
    return (np.asarray(g) * outside).sum(-1)

  stored = tail_gradient(teacher_tail_logmass=dump.tail)
  derived = tail_gradient()  # r = 1 - sum of the bfloat16 top-k
  np.testing.assert_allclose(stored, expected, atol=1e-6)
  assert np.abs(derived - expected).max() > 1e-4
