"""Hand-written gradients equal autodiff of the plain formulas.

Each kernel is compared, forward and backward (jax.vjp with a random
cotangent), with the formula it replaces written the obvious way, in float32.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.model import kernels
from gemma_jax.model.attention import attention_mask

TOL = 2e-5  # float32, relative to the largest magnitude compared


def close(got, want, name):
  # numpy, not jnp: an eager jnp op compiles one program per shape.
  got, want = np.asarray(got), np.asarray(want)
  scale = max(float(np.max(np.abs(want))), 1e-6)
  np.testing.assert_allclose(got, want, atol=TOL * scale, rtol=0, err_msg=name)


def check_vjp(fast, plain, args, diff_argnums, seed=0):
  """Outputs and input cotangents of `fast` equal those of `plain`."""

  def outputs_and_cotangents(f):
    @jax.jit
    def run(diff, cot):
      full = list(args)
      for i, x in zip(diff_argnums, diff):
        full[i] = x
      out, vjp = jax.vjp(
        lambda *d: f(
          *[
            d[diff_argnums.index(i)] if i in diff_argnums else a
            for i, a in enumerate(full)
          ]
        ),
        *diff,
      )
      return out, vjp(cot)

    return run

  diff = [args[i] for i in diff_argnums]
  rng = np.random.default_rng(seed)
  cot = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
    jax.eval_shape(plain, *args),
  )
  out_f, cot_f = outputs_and_cotangents(fast)(diff, cot)
  out_p, cot_p = outputs_and_cotangents(plain)(diff, cot)
  jax.tree.map(lambda a, b: close(a, b, "forward"), out_f, out_p)
  for i, (a, b) in enumerate(zip(cot_f, cot_p)):
    close(a, b, f"cotangent of argument {diff_argnums[i]}")


def normal(rng, *shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def test_gelu_mul():
  rng = np.random.default_rng(0)
  gate, up = normal(rng, 4, 64, scale=3), normal(rng, 4, 64)
  check_vjp(
    kernels.gelu_mul,
    lambda g, u: jax.nn.gelu(g, approximate=True) * u,
    (gate, up),
    (0, 1),
  )


def test_softcap():
  x = normal(np.random.default_rng(1), 4, 64, scale=80)  # saturates
  check_vjp(
    lambda x: kernels.softcap(x, 30.0),
    lambda x: 30.0 * jnp.tanh(x / 30.0),
    (x,),
    (0,),
  )


@pytest.mark.slow
def test_geglu_mlp():
  rng = np.random.default_rng(2)
  x = normal(rng, 2, 8, 16)
  w, w_down = normal(rng, 2, 16, 32, scale=0.3), normal(rng, 32, 16)

  def plain(x, w, w_down):
    gate, up = jnp.einsum("BTD,CDF->CBTF", x, w)
    return jnp.einsum(
      "BTF,FD->BTD", jax.nn.gelu(gate, approximate=True) * up, w_down
    )

  check_vjp(kernels.geglu_mlp, plain, (x, w, w_down), (0, 1, 2))


def packed(batch, t):
  """Row 0 one document; row 1 three documents and trailing padding."""
  seg = np.ones((batch, t), np.int32)
  pos = np.tile(np.arange(t, dtype=np.int32), (batch, 1))
  bounds = [0, 5, 19, 25, t - 3, t]
  for doc, (a, b) in enumerate(itertools.pairwise(bounds)):
    seg[1, a:b], pos[1, a:b] = doc + 1, np.arange(b - a)
  seg[1, t - 3 :] = 0
  return jnp.asarray(pos), jnp.asarray(seg)


def plain_attention(q, k, v, pos, seg, window, cap):
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k)
  if cap:
    s = cap * jnp.tanh(s / cap)
  mask = attention_mask(pos, seg, pos, seg, window)
  s = jnp.where(mask[:, None, None], s, -2.3819763e38)
  return jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.slow
@pytest.mark.parametrize(
  "kv_heads, groups, window, cap",
  [
    (2, 2, 7, 50.0),  # GQA, a window inside one block
    (2, 2, 20, 50.0),  # a window reaching into the block before
    (1, 4, 0, 50.0),  # MQA, global
    # No cap (Gemma 1) and a cap too large to skip the softmax's row
    # maximum: scores up to 128 here, which exp() alone would overflow.
    (1, 4, 0, None),
    (2, 2, 20, 1000.0),
    (2, 2, 20, None),  # Gemma 3: a window and no cap
  ],
  ids=[
    "gqa-window7",
    "gqa-window20",
    "mqa-global",
    "no-cap",
    "cap-1000",
    "gemma3-window-no-cap",
  ],
)
def test_blockwise_attention(kv_heads, groups, window, cap):
  # 40 tokens in blocks of 16: the last block is partial.
  rng = np.random.default_rng(3)
  b, t, h = 2, 40, 8
  q = normal(rng, b, t, kv_heads, groups, h, scale=3)
  k, v = normal(rng, b, t, kv_heads, h, scale=3), normal(rng, b, t, kv_heads, h)
  pos, seg = packed(b, t)
  check_vjp(
    lambda q, k, v: kernels.blockwise_attention(
      q, k, v, pos, seg, window, cap, 16
    ),
    lambda q, k, v: plain_attention(q, k, v, pos, seg, window, cap),
    (q, k, v),
    (0, 1, 2),
  )


@pytest.mark.slow
def test_attention_by_window_picks_the_traced_window():
  rng = np.random.default_rng(4)
  q = normal(rng, 2, 32, 1, 2, 8, scale=3)
  k, v = normal(rng, 2, 32, 1, 8), normal(rng, 2, 32, 1, 8)
  pos, seg = packed(2, 32)
  run = jax.jit(
    lambda i: kernels.attention_by_window(
      q, k, v, pos, seg, i, (0, 7), 50.0, 16
    )
  )
  for index, window in enumerate((0, 7)):
    close(
      run(index),
      jax.jit(plain_attention, static_argnums=(5, 6))(
        q, k, v, pos, seg, window, 50.0
      ),
      f"window {window}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("cap", [None, 30.0])
def test_cross_entropy(cap):
  rng = np.random.default_rng(5)
  hidden = normal(rng, 2, 12, 16, scale=2)
  table = normal(rng, 50, 16, scale=2)  # logits beyond the cap
  targets = jnp.asarray(rng.integers(0, 50, size=(2, 12)), jnp.int32)

  def plain(hidden, table):
    logits = jnp.einsum("BTD,VD->BTV", hidden, table)
    if cap:
      logits = cap * jnp.tanh(logits / cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return lse - picked, lse

  # Chunks of 8 tokens over 24: three chunks; both outputs get cotangents
  # (the z-loss differentiates the log-sum-exp).
  check_vjp(
    lambda h, e: kernels.cross_entropy(h, e, targets, cap, 8),
    plain,
    (hidden, table),
    (0, 1),
  )


def _attention_flops(t, window):
  """XLA's count of one layer's blockwise attention FLOPs (forward), one
  head of width 128, blocks as the model runs them."""
  from gemma_jax.model.attention import BLOCKWISE_BLOCK

  q = jax.ShapeDtypeStruct((1, t, 1, 1, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, 1, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  attend = lambda q, k, v, p, s: kernels.blockwise_attention(
    q, k, v, p, s, window, None, BLOCKWISE_BLOCK
  )
  return jax.jit(attend).lower(q, kv, kv, ids, ids).cost_analysis()["flops"]


@pytest.mark.slow
def test_a_local_layer_costs_in_proportion_to_the_sequence_not_its_square():
  # Gemma 3's local layers (window 1024) from 8192 to 32768 tokens, in
  # 128-token blocks, scaled down 4x (window 256, 2048 to 8192 tokens; the
  # same blocks): 4x the FLOPs, as at full size (key blocks past the window
  # are skipped; the keys visited sum to 4.1998x there, 4.1994x here); a
  # global layer: ~15x. A quarter of the blocks to trace and lower.
  local = _attention_flops(8192, 256) / _attention_flops(2048, 256)
  glob = _attention_flops(8192, 0) / _attention_flops(2048, 0)
  print(f"8192 vs 2048 tokens: local x{local:.2f}, global x{glob:.2f}")
  assert 3.9 < local < 4.4
  assert glob > 14
