"""Memory-lean pieces of the train step with hand-written gradients.

Autodiff of the plain formulas keeps every intermediate of the forward pass
for the backward pass: the [B, K, G, T, S] attention probabilities, ~7
[B, T, F] tensors of the GeGLU, the [B, T, V] logits and their soft-cap.
On a CPU the step is bound by writing and re-reading those, not by the
matmuls. Each function here saves only what its backward needs and
recomputes the rest:

  gelu_mul           gelu_tanh(gate) * up, saving gate and up;
  softcap            cap * tanh(x / cap), saving its output;
  blockwise_attention  flash-style attention: per query block, only the key
                     blocks it can see; saves the output and the row
                     log-sum-exp, never the probabilities;
  cross_entropy      logits = cap(h @ E^T) in token chunks, fused with the
                     log-sum-exp and the target logit; saves h and the
                     log-sum-exp, never the [B, T, V] logits.

Forward values equal the plain formulas up to float round-off (the same
operations, reduced over fewer, fully masked-out terms). Shape letters as in
gemma_jax/model/config.py.
"""

import functools
import math

import jax
import jax.numpy as jnp

_MASKED = -2.3819763e38  # as in attention.py: finite, so no NaN rows
_GELU_C = math.sqrt(2 / math.pi)


# GeGLU.


def _gelu_and_slope(gate):
  """gelu_tanh(gate) and its derivative."""
  t = jnp.tanh(_GELU_C * (gate + 0.044715 * gate**3))
  gelu = 0.5 * gate * (1 + t)
  slope = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * _GELU_C * (
    1 + 3 * 0.044715 * gate * gate
  )
  return gelu, slope


@jax.custom_vjp
def gelu_mul(gate, up):
  """gelu_tanh(gate) * up, elementwise."""
  return jax.nn.gelu(gate, approximate=True) * up


def _gelu_mul_fwd(gate, up):
  return gelu_mul(gate, up), (gate, up)


def _gelu_mul_bwd(res, g):
  gate, up = res
  gelu, slope = _gelu_and_slope(gate)
  return g * up * slope, g * gelu


gelu_mul.defvjp(_gelu_mul_fwd, _gelu_mul_bwd)


# Soft-cap.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softcap(x, cap: float):
  """cap * tanh(x / cap)."""
  return cap * jnp.tanh(x / cap)


def _softcap_fwd(x, cap):
  y = softcap(x, cap)
  return y, y


def _softcap_bwd(cap, y, g):
  return (g * (1 - jnp.square(y / cap)),)


softcap.defvjp(_softcap_fwd, _softcap_bwd)


# Blockwise attention.


def _key_range(start: int, end: int, window: int) -> int:
  """First key a query in [start, end) can see (window 0: global)."""
  return 0 if not window else max(0, start - window + 1)


def _bmm(x, y, x_axis: int, y_axis: int):
  """Matmul batched over the two leading axes (batch, kv head) of x and y,
  contracting x's axis `x_axis` with y's `y_axis` (both 2 or 3)."""
  return jax.lax.dot_general(
    x,
    y,
    (((x_axis,), (y_axis,)), ((0, 1), (0, 1))),
    preferred_element_type=jnp.float32,
  )


def _block_scores(q, k, q_pos, q_seg, k_pos, k_seg, window, cap):
  """Capped, masked scores [B, K, G * Tb, Sb] (float32) of q [B, K, G, Tb,
  H] and k [B, K, Sb, H], and the capped ones before masking (for the
  cap's derivative)."""
  b, kv, g, tb, h = q.shape
  s = _bmm(q.reshape(b, kv, g * tb, h), k, 3, 3).reshape(b, kv, g, tb, -1)
  if cap:
    s = cap * jnp.tanh(s / cap)
  distance = q_pos[:, :, None] - k_pos[:, None, :]
  visible = (q_seg[:, :, None] == k_seg[:, None, :]) & (distance >= 0)
  if window:
    visible &= distance < window
  masked = jnp.where(visible[:, None, None], s, _MASKED)
  return masked.reshape(b, kv, g * tb, -1), s.reshape(b, kv, g * tb, -1)


def _blocks(t: int, block: int):
  for start in range(0, t, block):
    yield start, min(start + block, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def blockwise_attention(
  q, k, v, positions, segment_ids, window: int, cap: float | None, block: int
):
  """Causal attention, query block by query block.

  q: [B, T, K, G, H] (scaled, RoPE applied); k, v: [B, T, K, H];
  positions, segment_ids: int32 [B, T]. window: static (0 = global).
  Query i sees key j iff same segment, 0 <= pos_i - pos_j (< window).
  Key blocks past a query block, or (local) more than `window` before it,
  are skipped: rows hold contiguous documents whose positions count up by
  one, so those keys are masked anyway. Returns [B, T, K, G, H].

  Inside, q is [B, K, G, T, H] and k, v are [B, K, T, H], so that every
  matmul is one over the (B, K) batch whose only transposed operand is a
  [.., H]-wide one: the [G * Tb, Sb] scores and probabilities are never
  copied into another layout (on a CPU those copies cost more than the
  matmuls).
  """
  return _attention_fwd(q, k, v, positions, segment_ids, window, cap, block)[0]


# With scores capped at |s| <= cap, exp(s) cannot overflow float32 for any
# row length we meet (e^60 * 2^30 keys < 3.4e38), so the softmax can skip
# subtracting the row maximum: one reduction and one pass over the scores
# fewer. A query always sees itself, so no row sums to zero.
_NO_MAX_CAP = 60.0


def _heads_first(q, k, v):
  return (
    q.transpose(0, 2, 3, 1, 4),
    k.transpose(0, 2, 1, 3),
    v.transpose(0, 2, 1, 3),
  )


def _attention_fwd(q, k, v, positions, segment_ids, window, cap, block):
  qt, kt, vt = _heads_first(q, k, v)
  b, kv, g, _, h = qt.shape
  outs, lses = [], []
  for start, end in _blocks(q.shape[1], block):
    lo = _key_range(start, end, window)
    s, _ = _block_scores(
      qt[:, :, :, start:end],
      kt[:, :, lo:end],
      positions[:, start:end],
      segment_ids[:, start:end],
      positions[:, lo:end],
      segment_ids[:, lo:end],
      window,
      cap,
    )
    if cap and cap <= _NO_MAX_CAP:
      m = jnp.zeros(s.shape[:-1] + (1,), s.dtype)
      p = jnp.exp(s)
    else:
      m = jnp.max(s, axis=-1, keepdims=True)
      p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)  # [B, K, G * Tb, 1]
    # Normalise the [.., H] output, not the [.., S] probabilities.
    o = _bmm(p.astype(v.dtype), vt[:, :, lo:end], 3, 2) / l
    outs.append(o.reshape(b, kv, g, end - start, h))
    lses.append((m + jnp.log(l)).reshape(b, kv, g, end - start))
  out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).astype(q.dtype)
  lse = jnp.concatenate(lses, axis=-1)  # [B, K, G, T]
  return out, (q, k, v, positions, segment_ids, out, lse)


def _attention_bwd(window, cap, block, res, d_out):
  q, k, v, positions, segment_ids, out, lse = res
  qt, kt, vt = _heads_first(q, k, v)
  b, kv, g, _, h = qt.shape
  # D_i = sum_h dO_ih O_ih: the softmax backward's row term.
  delta = jnp.einsum(
    "BTKGH,BTKGH->BKGT", d_out.astype(jnp.float32), out.astype(jnp.float32)
  )
  dot = d_out.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  dq_blocks = []
  # dK and dV transposed, [B, K, H, T]: (dS^T Q)^T = Q^T dS transposes Q.
  dkt = jnp.zeros((b, kv, h, k.shape[1]), jnp.float32)
  dvt = jnp.zeros((b, kv, h, v.shape[1]), jnp.float32)
  for start, end in _blocks(q.shape[1], block):
    lo = _key_range(start, end, window)
    rows = g * (end - start)
    qb, kb, vb = qt[:, :, :, start:end], kt[:, :, lo:end], vt[:, :, lo:end]
    dob = dot[:, :, :, start:end].reshape(b, kv, rows, h)
    s, capped = _block_scores(
      qb,
      kb,
      positions[:, start:end],
      segment_ids[:, start:end],
      positions[:, lo:end],
      segment_ids[:, lo:end],
      window,
      cap,
    )
    lse_b = lse[..., start:end].reshape(b, kv, rows, 1)
    p = jnp.exp(s - lse_b)  # [B, K, G * Tb, Sb]
    dvt = dvt.at[..., lo:end].add(_bmm(dob, p, 2, 2))
    dp = _bmm(dob, vb, 3, 3)
    delta_b = delta[..., start:end].reshape(b, kv, rows, 1)
    ds = p * (dp - delta_b)
    if cap:
      ds = ds * (1 - jnp.square(capped / cap))
    dq_blocks.append(_bmm(ds, kb, 3, 2).reshape(b, kv, g, end - start, h))
    dkt = dkt.at[..., lo:end].add(_bmm(qb.reshape(b, kv, rows, h), ds, 2, 2))
  dq = jnp.concatenate(dq_blocks, axis=3).transpose(0, 3, 1, 2, 4)
  return (
    dq.astype(q.dtype),
    dkt.transpose(0, 3, 1, 2).astype(k.dtype),
    dvt.transpose(0, 3, 1, 2).astype(v.dtype),
    None,
    None,
  )


blockwise_attention.defvjp(
  lambda q, k, v, pos, seg, window, cap, block: _attention_fwd(
    q, k, v, pos, seg, window, cap, block
  ),
  _attention_bwd,
)


def attention_by_window(
  q,
  k,
  v,
  positions,
  segment_ids,
  window_index,
  windows: tuple[int, ...],
  cap,
  block,
):
  """blockwise_attention for the layer whose window is `windows[index]`.

  Under nn.scan each layer's window is data: the traced `window_index` picks
  the branch compiled for that window with lax.switch.
  """
  branches = [
    functools.partial(lambda w, *a: blockwise_attention(*a, w, cap, block), w)
    for w in windows
  ]
  if len(branches) == 1:
    return branches[0](q, k, v, positions, segment_ids)
  return jax.lax.switch(window_index, branches, q, k, v, positions, segment_ids)


# Cross-entropy fused with the output projection.


def _identity(x):
  return x


def _weight_grad(small, big, spec: str):
  """einsum(spec, small, big), transposed: a weight gradient [big, small]
  that contracts over the tokens.

  Written (small^T @ big) so that the transposed copy XLA makes for the
  matmul is of the [B, T, D] operand. The barrier keeps XLA from folding
  the final transpose into the dot by swapping its operands: that dot, with
  its big operand contracted over its leading axis, runs on a generic
  kernel (Eigen) at a fraction of the speed on a CPU (the MLP down and the
  table gradients were 14% of the 8 x 512 benchmark step that way).
  """
  return jax.lax.optimization_barrier(jnp.einsum(spec, small, big)).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def cross_entropy(
  hidden,
  table,
  targets,
  cap: float | None,
  chunk: int,
  constrain_table=_identity,
):
  """(ce, lse), float32 [B, T], of logits = cap(hidden @ table^T).

  hidden: [B, T, D]; table: [V, D] (the tied embedding's real rows);
  targets: int32 [B, T]. ce = lse - logits[target]. Logits are computed for
  `chunk` positions of every row at a time (a slice of T, so a batch-sharded
  hidden stays sharded; the largest divisor of T not above `chunk`) and
  never stored. constrain_table(x) places the [V, D] table gradient (e.g. a
  sharding constraint; the backward accumulates it over the chunks).
  """
  return _ce_fwd(hidden, table, targets, cap, chunk, constrain_table)[0]


def _time_chunks(x, chunk):
  """[B, T, ...] -> [T / c, B, c, ...], c the largest divisor of T <= chunk."""
  b, t = x.shape[:2]
  c = max(d for d in range(1, min(chunk, t) + 1) if t % d == 0)
  return x.reshape((b, t // c, c, *x.shape[2:])).swapaxes(0, 1)


def _unchunk(x):
  """[T / c, B, c] -> [B, T]."""
  return x.swapaxes(0, 1).reshape(x.shape[1], -1)


def _logits(h, table, cap):
  z = jnp.einsum("BTD,VD->BTV", h, table, preferred_element_type=jnp.float32)
  return softcap(z, cap) if cap else z


def _ce_fwd(hidden, table, targets, cap, chunk, constrain_table):
  del constrain_table

  def one(_, xs):
    h, tgt = xs
    logits = _logits(h, table, cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # A one-hot contraction keeps a vocab-sharded chunk sharded.
    onehot = jax.nn.one_hot(tgt, logits.shape[-1], dtype=logits.dtype)
    picked = jnp.einsum("BTV,BTV->BT", logits, onehot)
    return None, (lse - picked, lse)

  _, (ce, lse) = jax.lax.scan(
    one, None, (_time_chunks(hidden, chunk), _time_chunks(targets, chunk))
  )
  lse = _unchunk(lse)
  return (_unchunk(ce), lse), (hidden, table, targets, lse)


def _ce_bwd(cap, chunk, constrain_table, res, g):
  hidden, table, targets, lse = res
  g_ce, g_lse = g

  def one(d_table, xs):
    h, tgt, l, gc, gl = xs
    logits = _logits(h, table, cap)
    p = jnp.exp(logits - l[..., None])
    # d/dlogits of gc * (lse - logit[tgt]) + gl * lse.
    d = (gc + gl)[..., None] * p
    d = d - gc[..., None] * jax.nn.one_hot(tgt, d.shape[-1], dtype=d.dtype)
    if cap:
      d = d * (1 - jnp.square(logits / cap))
    dh = jnp.einsum("BTV,VD->BTD", d, table.astype(jnp.float32))
    d_table = d_table + _weight_grad(h.astype(jnp.float32), d, "BTD,BTV->DV")
    return constrain_table(d_table), dh

  d_table, dh = jax.lax.scan(
    one,
    constrain_table(jnp.zeros(table.shape, jnp.float32)),
    tuple(_time_chunks(x, chunk) for x in (hidden, targets, lse, g_ce, g_lse)),
  )
  dh = dh.swapaxes(0, 1).reshape(hidden.shape)
  return dh.astype(hidden.dtype), d_table.astype(table.dtype), None


cross_entropy.defvjp(_ce_fwd, _ce_bwd)


# The whole GeGLU MLP, with a hand-written backward pass.


@jax.custom_vjp
def geglu_mlp(x, w_gate_up, w_down):
  """down(gelu_tanh(x @ gate) * (x @ up)).

  x: [B, T, D]; w_gate_up: [2, D, F] (0 = gate, 1 = up); w_down: [F, D].
  Gate and up come out of one einsum as [B, T, 2, F]: row-major, that is
  one [BT, 2F] matrix, so the backward pass's dx and dW are plain matmuls
  over it (autodiff of the [2, B, T, F] einsum re-reads its gradient
  transposed). Saves x and the [B, T, 2, F] pre-activations only.
  """
  return _geglu_fwd(x, w_gate_up, w_down)[0]


def _geglu_fwd(x, w_gate_up, w_down):
  h = jnp.einsum("BTD,CDF->BTCF", x, w_gate_up)
  act = gelu_mul(h[..., 0, :], h[..., 1, :])
  return jnp.einsum("BTF,FD->BTD", act, w_down), (x, h, w_gate_up, w_down)


def _geglu_bwd(res, dy):
  x, h, w_gate_up, w_down = res
  gate, up = h[..., 0, :], h[..., 1, :]
  gelu, slope = _gelu_and_slope(gate)
  d_act = jnp.einsum("BTD,FD->BTF", dy, w_down)
  dh = jnp.stack([d_act * up * slope, d_act * gelu], axis=-2)  # [B,T,2,F]
  dx = jnp.einsum("BTCF,CDF->BTD", dh, w_gate_up)
  # Weight gradients contract over tokens, the small [B, T, D] operand
  # first (on a CPU, a transposed copy of the recomputed gelu * up cost more
  # than the matmul); see _weight_grad.
  d_down = _weight_grad(dy, gelu * up, "BTD,BTF->DF")
  d_gate_up = jnp.einsum("BTD,BTCF->DCF", x, dh).transpose(1, 0, 2)
  return dx, d_gate_up.astype(w_gate_up.dtype), d_down.astype(w_down.dtype)


geglu_mlp.defvjp(_geglu_fwd, _geglu_bwd)
