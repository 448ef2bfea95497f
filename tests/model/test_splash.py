"""Splash attention equals the model's attention rule, forward and backward.

The kernel runs in the Pallas interpreter on CPU (slow: shapes are tiny, and
one compile serves both windows of a model through the traced window index).
The reference is written from the formulas: float32 softmax over
soft-capped scores q.k, where query i sees key j iff j <= i, both lie in the
same segment, and, for window W > 0, i - W < j.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_mask as mask_lib,
)
from jax.sharding import Mesh

from gemma_jax.errors import ConfigError
from gemma_jax.model import splash

pytestmark = pytest.mark.slow

T = 256  # two 128-token blocks
WINDOWS = (40, 0)  # a window smaller than one block, and global
CAP = 50.0
TOL = 1e-5  # float32, relative to the reference's largest value


def reference(q, k, v, segment_ids, window, cap):
  """q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H]."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, k, precision=jax.lax.Precision.HIGHEST)
  if cap:
    s = cap * jnp.tanh(s / cap)
  i = jnp.arange(q.shape[1])[:, None]
  j = jnp.arange(q.shape[1])[None, :]
  visible = (j <= i) & ((window == 0) | (i - window < j))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  s = jnp.where((visible & same)[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum(
    "bnts,bsnh->btnh", p, v, precision=jax.lax.Precision.HIGHEST
  )


# One compile per shape and cap (the window traced), not one per eager op.
jitted_reference = jax.jit(reference, static_argnums=5)


def packed_segments(batch):
  """Row 0 one document; the others several documents, the last row ending
  in padding (segment 0)."""
  seg = np.ones((batch, T), np.int32)
  for row in range(1, batch):
    seg[row] = (
      np.searchsorted([30 + 7 * row, 150, 200], np.arange(T), side="right") + 1
    )
  seg[-1, 230:] = 0
  return jnp.asarray(seg)


def inputs(batch, n, k, h=8, seed=0):
  r = np.random.default_rng(seed)
  # Scores of size ~60 so that the soft-cap saturates on part of them.
  q = r.normal(size=(batch, T, n, h)) * 3
  kv = (
    r.normal(size=(2, batch, T, k, h))
    * np.array([3, 1])[:, None, None, None, None]
  )
  return (
    jnp.asarray(q, jnp.float32),
    jnp.asarray(kv[0], jnp.float32),
    jnp.asarray(kv[1], jnp.float32),
    packed_segments(batch),
  )


def loss_and_grads(attend):
  """value_and_grad of a fixed random projection of the output."""

  def loss(q, k, v, seg, idx):
    out = attend(q, k, v, seg, idx)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * w), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def reference_loss_and_grads(cap):
  """loss_and_grads of the reference at window WINDOWS[idx], the window
  traced like the kernel's: one compile serves both windows, and every test
  of the same shapes and cap."""
  return loss_and_grads(
    lambda q, k, v, seg, idx: reference(
      q, k, v, seg, jnp.asarray(WINDOWS)[idx], cap
    )
  )


def check_against_reference(attend, q, k, v, seg, cap=CAP):
  run = loss_and_grads(attend)
  for idx, window in enumerate(WINDOWS):
    (_, out), grads = run(q, k, v, seg, idx)
    (_, want), want_grads = reference_loss_and_grads(cap)(q, k, v, seg, idx)
    for name, got, exp in zip(
      ("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)
    ):
      # numpy, not jnp: an eager jnp op compiles one program per shape.
      got, exp = np.asarray(got), np.asarray(exp)
      scale = float(np.max(np.abs(exp)))
      np.testing.assert_allclose(
        got, exp, atol=TOL * scale, rtol=0, err_msg=f"{name}, window {window}"
      )


@pytest.mark.parametrize(
  "heads, kv_heads", [(2, 2), (4, 2), (2, 1)], ids=["mha", "gqa", "mqa"]
)
def test_matches_reference_forward_and_gradients(heads, kv_heads):
  q, k, v, seg = inputs(2, heads, kv_heads)
  attend = functools.partial(
    splash.splash_attention, windows=WINDOWS, softcap=CAP
  )
  check_against_reference(attend, q, k, v, seg)


def test_without_a_softcap_as_gemma3():
  # Gemma 3 has no attention soft-cap (QK-norm and RoPE come before the
  # kernel): the uncapped scores reach ~60 here.
  q, k, v, seg = inputs(2, 4, 2)
  attend = functools.partial(
    splash.splash_attention, windows=WINDOWS, softcap=None
  )
  check_against_reference(attend, q, k, v, seg, cap=None)


def test_reference_pins_the_window_rule():
  # The reference is the spec: with W = 40, query 100 sees keys 61..100.
  q, k, v, seg = inputs(1, 1, 1, seed=1)
  q, seg = jnp.zeros_like(q), jnp.ones_like(seg)  # uniform over seen keys
  base = jitted_reference(q, k, v, seg, 40, CAP)[0, 100]
  for j, seen in ((60, False), (61, True), (100, True), (101, False)):
    moved = jitted_reference(q, k, v.at[0, j].add(1.0), seg, 40, CAP)[0, 100]
    assert bool(jnp.any(moved != base)) == seen, j


@pytest.mark.parametrize(
  "shape, heads, kv_heads",
  [
    ((2, 2, 2), 4, 2),  # kv heads split over 'tensor'
    ((2, 1, 4), 4, 1),  # MQA: k, v replicated, one kv head per shard
  ],
  ids=["split_kv", "replicated_kv"],
)
def test_sharded_over_batch_and_heads(shape, heads, kv_heads):
  mesh = Mesh(
    np.asarray(jax.devices()[:8]).reshape(shape), ("data", "fsdp", "tensor")
  )
  batch = shape[0] * shape[1]
  q, k, v, seg = inputs(batch, heads, kv_heads, seed=2)
  attend = functools.partial(
    splash.splash_attention, windows=WINDOWS, softcap=CAP, mesh=mesh
  )
  check_against_reference(attend, q, k, v, seg)


def test_takes_the_abstract_mesh_of_the_context():
  # How the model calls it: under jax.set_mesh, with no Mesh object at hand.
  mesh = Mesh(
    np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor")
  )
  q, k, v, seg = inputs(4, 2, 2, seed=3)
  with jax.set_mesh(mesh):
    out = jax.jit(
      lambda *a: splash.splash_attention(
        *a, windows=WINDOWS, softcap=CAP, mesh=jax.sharding.get_abstract_mesh()
      )
    )(q, k, v, seg, 0)
  out = np.asarray(out)
  np.testing.assert_allclose(
    out,
    jitted_reference(q, k, v, seg, WINDOWS[0], CAP),
    atol=TOL * float(np.max(np.abs(out))),
    rtol=0,
  )


def test_sequence_must_be_a_multiple_of_128():
  q = jnp.zeros((1, 200, 2, 8))
  with pytest.raises(ConfigError, match="data.seq_len=200"):
    splash.splash_attention(
      q, q, q, jnp.ones((1, 200), jnp.int32), 0, windows=(0,), softcap=None
    )


def test_block_size_is_the_largest_that_divides():
  assert splash.block_size(2048) == 512
  assert splash.block_size(768) == 256
  assert splash.block_size(384) == 128


def test_a_local_layer_visits_blocks_in_proportion_to_the_sequence():
  # The kernel's block mask: key blocks a query block cannot see are never
  # visited, so a local layer (window 1024) at 32768 tokens visits ~4x the
  # blocks it does at 8192, a global (causal) one ~15x.
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask_info as info_lib,
  )

  def visited(t, window):
    b = splash.block_size(t)
    mask = mask_lib.MultiHeadMask([splash.layer_mask(t, window)])
    info, _ = info_lib.process_mask(mask, (b, b))
    return int((np.asarray(info.block_mask) > 0).sum())

  assert (visited(8192, 1024), visited(32768, 1024)) == (45, 189)
  assert (visited(8192, 0), visited(32768, 0)) == (136, 2080)
