"""Attention by the Pallas splash-attention kernel (TPU; interpreted on CPU).

    out = splash_attention(q * query_scale, k, v, segment_ids,
                           window_index, windows=(4096, 0), softcap=50.0,
                           mesh=mesh)

The kernel (jax.experimental.pallas.ops.tpu.splash_attention) computes
softmax(cap(q k^T) masked) v blockwise in VMEM, never materialising the
[B, N, T, S] probabilities in HBM, and skips key blocks that a query block
cannot see (the far past of a local layer, the future of a causal one).

The mask is our model's rule: query i sees key j iff j <= i, both lie in the
same segment, and for a layer with window W > 0, i - W < j (W keys including
the query's own). Packed documents are contiguous runs of one segment id, so
absolute indices compared within a segment are the positions within that
document. Segment id 0 (padding) attends to padding only: no row is empty.

Layers run under nn.scan with their window as data, so the kernel is picked
by a traced index into the model's static tuple of distinct windows with
lax.switch; each branch holds one compiled kernel and its block mask.

With a mesh, the kernel runs per device under shard_map: rows split over the
batch axes (default 'data', 'fsdp'; the model passes those of its logical rules
for 'act_batch'), heads over the head axes (default 'tensor'). Kv heads are
split too when 'tensor' divides them; otherwise (fewer kv heads than tensor
shards, e.g. MQA) k and v stay replicated and each shard picks the kv head its
query heads share.

Shape letters as in gemma_jax/model/config.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as kernel_lib,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_mask as mask_lib,
)
from jax.sharding import PartitionSpec as P

from gemma_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
LANES = 128  # the kernel's key-block granule (TPU lanes)
_MAX_BLOCK = 512


def block_size(seq_len: int) -> int:
  """The largest of 512, 256, 128 that divides seq_len."""
  for b in (_MAX_BLOCK, 256, LANES):
    if seq_len % b == 0:
      return b
  raise ConfigError(
    f"data.seq_len={seq_len}: splash attention needs a "
    f"multiple of {LANES}; pad the sequence or set "
    "model.attention_impl=xla"
  )


def layer_mask(seq_len: int, window: int) -> mask_lib.Mask:
  """[T, T] key mask of one layer: causal, or the last `window` keys."""
  shape = (seq_len, seq_len)
  if window <= 0 or window >= seq_len:
    return mask_lib.CausalMask(shape)
  # LocalMask keeps q - left <= k <= q + right: left = W - 1 gives W keys.
  return mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)


def _kernel(
  num_heads: int,
  seq_len: int,
  window: int,
  mqa: bool,
  softcap: float | None,
  interpret: bool,
):
  """A splash kernel for one device: q [N, T, H], k/v [K, T, H] ([T, H] MQA)."""
  b = block_size(seq_len)
  blocks = kernel_lib.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  mask = mask_lib.MultiHeadMask([layer_mask(seq_len, window)] * num_heads)
  make = kernel_lib.make_splash_mqa if mqa else kernel_lib.make_splash_mha
  # Built afresh in each trace: its block-mask tables become arrays of the
  # trace that builds it (a kernel cached across traces, e.g. those of
  # nn.scan and its partial evaluation, would hold leaked tracers).
  return make(
    mask,
    block_sizes=blocks,
    head_shards=1,
    q_seq_shards=1,
    attn_logits_soft_cap=softcap,
    interpret=interpret,
  )


def _local_attention(
  query, key, value, segment_ids, window_index, *, windows, softcap, interpret
):
  """One device's share: query [B, T, N, H], key/value [B, T, K, H]."""
  _, t, n, _ = query.shape
  mqa = key.shape[2] == 1
  q = query.transpose(0, 2, 1, 3)  # [B, N, T, H]
  k, v = (
    x[:, :, 0] if mqa else x.transpose(0, 2, 1, 3) for x in (key, value)
  )  # [B, (K,) T, H]
  segments = kernel_lib.SegmentIds(q=segment_ids, kv=segment_ids)

  def branch(window):
    kernel = _kernel(n, t, window, mqa, softcap, interpret)
    return lambda *args: jax.vmap(kernel)(*args)

  branches = [branch(w) for w in windows]
  if len(branches) == 1:
    out = branches[0](q, k, v, segments)
  else:
    out = jax.lax.switch(window_index, branches, q, k, v, segments)
  return out.transpose(0, 2, 1, 3)  # [B, T, N, H]


def mesh_axes(entry) -> tuple[str, ...]:
  """Mesh axes of one PartitionSpec entry (None, a name or a tuple)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _axes(mesh, names):
  present = tuple(a for a in names if a in mesh.axis_names)
  return present, math.prod(mesh.shape[a] for a in present)


def _interpret(mesh) -> bool:
  """Whether the devices are not TPUs (then Pallas interprets the kernel)."""
  if mesh is None:
    return jax.default_backend() != "tpu"
  abstract = getattr(mesh, "abstract_mesh", mesh)
  return abstract.abstract_device.platform != "tpu"


def splash_attention(
  query,
  key,
  value,
  segment_ids,
  window_index,
  windows: tuple[int, ...],
  softcap: float | None,
  mesh=None,
  interpret: bool | None = None,
  batch_axes: tuple[str, ...] = BATCH_AXES,
  head_axes: tuple[str, ...] = (HEAD_AXIS,),
):
  """Causal (optionally sliding-window) attention of packed rows.

  Args:
    query: [B, T, N, H], already multiplied by the query scale.
    key, value: [B, T, K, H] with RoPE applied to key; N % K == 0 and query
      head n uses kv head n // (N / K).
    segment_ids: int32 [B, T]; 0 is padding, documents are contiguous runs.
    window_index: int scalar (may be traced): the layer's entry in `windows`.
    windows: static tuple of the model's distinct windows (0 = global).
    softcap: attention logit soft-cap (`cap * tanh(s / cap)`) or None.
    mesh: a Mesh or AbstractMesh (e.g. jax.sharding.get_abstract_mesh()
      under jax.set_mesh) to shard over its ('data', 'fsdp') and 'tensor'
      axes; None or an empty mesh: one device (or already in shard_map).
    interpret: run the Pallas interpreter; default: unless on TPU.
    batch_axes, head_axes: the mesh axes rows and heads are split over.
  Returns:
    [B, T, N, H] in query's dtype.
  """
  b, _, n, _ = query.shape
  k_heads = key.shape[2]
  if n % k_heads:
    raise ConfigError(
      f"splash attention: {n} query heads are not a multiple "
      f"of {k_heads} kv heads"
    )
  if mesh is not None and mesh.empty:
    mesh = None
  if interpret is None:
    interpret = _interpret(mesh)
  run = functools.partial(
    _local_attention,
    windows=tuple(windows),
    softcap=softcap,
    interpret=interpret,
  )
  window_index = jnp.asarray(window_index, jnp.int32)
  if mesh is None:
    return run(query, key, value, segment_ids, window_index)

  batch_axes, batch_shards = _axes(mesh, batch_axes)
  head_axes, head_shards = _axes(mesh, head_axes)
  if b % batch_shards or n % head_shards:
    raise ConfigError(
      f"splash attention: batch {b} / {n} heads do not split over mesh "
      f"axes {batch_axes} ({batch_shards}) / {head_axes} ({head_shards})"
    )
  group = n // k_heads
  heads_per_shard = n // head_shards
  split_kv = k_heads % head_shards == 0
  if not split_kv and group % heads_per_shard:
    raise ConfigError(
      f"splash attention: {k_heads} kv heads neither split over "
      f"{head_shards} tensor shards nor map whole groups of {group} query "
      "heads to one shard; choose mesh.ici_tensor dividing num_kv_heads"
    )
  rows = batch_axes or None
  heads = head_axes or None
  q_spec = P(rows, None, heads, None)
  kv_spec = q_spec if split_kv else P(rows, None, None, None)

  def local(q, k, v, seg, idx):
    if not split_kv:  # this shard's query heads all share one kv head
      shard = jax.lax.axis_index(head_axes) if head_axes else 0
      kv = shard * heads_per_shard // group
      k = jax.lax.dynamic_slice_in_dim(k, kv, 1, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v, kv, 1, axis=2)
    return run(q, k, v, seg, idx)

  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, P(rows, None), P()),
    out_specs=q_spec,
    check_vma=False,
  )(query, key, value, segment_ids, window_index)
