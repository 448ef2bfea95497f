"""Multi-head attention for MHA, MQA and GQA, local or global by a window.

One mask rule serves training, packed rows and decoding with a cache: query
t sees key s iff they are in the same segment, s is not later than t, and
(for a local layer) s is fewer than `window` positions back. Positions restart
at 0 for each packed document, so comparing positions is comparing indices
within a document.

Without a cache, `config.attention_impl` picks how the same rule is computed:
plain einsums (xla), query block by query block with a hand-written backward
(blockwise, gemma_jax.model.kernels) or the Pallas TPU kernel (splash,
gemma_jax.model.splash). The last two skip key blocks by index, so they take
rows whose documents are contiguous with positions counting up by one (what
the data pipeline and the default positions give).
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from gemma_jax.model import kernels, splash
from gemma_jax.model.config import ModelConfig
from gemma_jax.model.layers import Einsum, RMSNorm, rope_timescale, rotate

# Large finite negative: a fully masked row stays NaN-free.
_MASKED = -2.3819763e38
# Query block of the blockwise path: on a 2-core CPU 128 was faster than 64
# or 256 at T = 512 (docs/performance.md).
BLOCKWISE_BLOCK = 128


@flax.struct.dataclass
class AttentionInputs:
  """What every layer's attention needs besides its input: the same for all
  layers (broadcast through the layer scan).

  positions, segment_ids: [B, T] of the queries (segment 0 = padding).
  key_positions, key_segments: [B, S] of every key slot; equal to the
    queries' own without a cache, the whole cache's slots with one.
  cache_index: where this call's keys are written into the cache (decoding
    only; None in training).
  """

  positions: jax.Array
  segment_ids: jax.Array
  key_positions: jax.Array
  key_segments: jax.Array
  cache_index: jax.Array | None = None


def attention_mask(q_pos, q_seg, k_pos, k_seg, window):
  """[B, T, S] bool. window: int scalar (may be traced); 0 means global."""
  same_doc = q_seg[:, :, None] == k_seg[:, None, :]
  distance = q_pos[:, :, None] - k_pos[:, None, :]
  in_window = (window == 0) | (distance < window)
  return same_doc & (distance >= 0) & in_window


def dot_product_attention(query, key, value, mask, softcap: float | None):
  """Scaled queries [B, T, N, H], keys/values [B, S, K, H], mask [B, T, S]
  -> [B, T, N, H]. Scores and softmax in float32; query head n uses kv head
  n // G (G = N / K)."""
  b, t, n, h = query.shape
  k = key.shape[2]
  query = query.reshape(b, t, k, n // k, h)
  logits = jnp.einsum(
    "BTKGH,BSKH->BKGTS", query, key, preferred_element_type=jnp.float32
  )
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)


def resolve_impl(config: ModelConfig, seq_len: int, cached: bool) -> str:
  """The attention path of one call: 'xla', 'blockwise' or 'splash'.

  'auto' is splash on TPU devices (those of the mesh in context, else the
  default backend) when seq_len splits into 128-token blocks, else
  blockwise. Decoding with a cache is always xla.
  """
  impl = config.attention_impl
  if cached:
    return "xla"
  if impl != "auto":
    return impl
  mesh = jax.sharding.get_abstract_mesh()
  platform = (
    jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  )
  if platform == "tpu" and seq_len % splash.LANES == 0:
    return "splash"
  return "blockwise"


def window_index(window, windows: tuple[int, ...]):
  """Index of the (traced) `window` in the static sorted `windows`."""
  return jnp.argmax(jnp.asarray(windows, jnp.int32) == window).astype(jnp.int32)


def rope_settings(config: ModelConfig) -> tuple[tuple[float, float], ...]:
  """The model's distinct (max wavelength, scale) RoPE settings, sorted;
  a layer's entry is picked by its index here (per-layer scan data)."""
  return tuple(sorted(set(config.layer_ropes)))


def apply_layer_rope(x, positions, rope_index, config: ModelConfig):
  """RoPE of the layer whose setting is `rope_settings(config)[rope_index]`
  (rope_index may be traced). x: [B, T, N, H]."""
  settings = rope_settings(config)
  h = x.shape[-1]
  if len(settings) == 1:
    timescale = rope_timescale(h, *settings[0])
  else:
    table = jnp.stack([rope_timescale(h, *s) for s in settings])
    timescale = table[rope_index]
  return rotate(x, positions, timescale)


def _splash(query, key, value, segment_ids, window, cfg: ModelConfig):
  """splash.splash_attention over the mesh in context, on the mesh axes the
  logical rules give the batch and the heads."""
  windows = tuple(sorted(set(cfg.layer_windows)))
  spec = nn.logical_to_mesh_axes(("act_batch", "act_heads"))
  assert spec is not None  # None only when given no names
  batch_axes, head_axes = (splash.mesh_axes(a) for a in spec)
  return splash.splash_attention(
    query,
    key,
    value,
    segment_ids,
    window_index(window, windows),
    windows,
    cfg.attn_logit_softcap,
    mesh=jax.sharding.get_abstract_mesh(),
    batch_axes=batch_axes,
    head_axes=head_axes,
  )


def _blockwise(
  query, key, value, inputs: AttentionInputs, window, cfg: ModelConfig
):
  b, t, n, h = query.shape
  k = key.shape[2]
  windows = tuple(sorted(set(cfg.layer_windows)))
  out = kernels.attention_by_window(
    query.reshape(b, t, k, n // k, h),
    key,
    value,
    inputs.positions,
    inputs.segment_ids,
    window_index(window, windows),
    windows,
    cfg.attn_logit_softcap,
    BLOCKWISE_BLOCK,
  )
  return out.reshape(b, t, n, h)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(
    self, x, window, inputs: AttentionInputs, kv_cache=None, rope_index=0
  ):
    """x: [B, T, D] -> ([B, T, D], updated (k, v) cache or None).

    window: this layer's (0 = global); rope_index: its entry in
    rope_settings(config). Without a cache, keys are the queries' own
    tokens. With one, this call's keys and values are written at
    `inputs.cache_index` into `kv_cache` ([B, S, K, H] each) and attention
    runs over every slot.
    """
    cfg = self.config
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    query = Einsum(
      (n, d, h),
      ("heads", "embed", "head_dim"),
      in_axis=1,
      config=cfg,
      name="q_einsum",
    )("BTD,NDH->BTNH", x)
    key, value = Einsum(
      (2, k, d, h),
      (None, "kv_heads", "embed", "head_dim"),
      in_axis=2,
      config=cfg,
      name="kv_einsum",
    )("BSD,CKDH->CBSKH", x)
    query = checkpoint_name(query, "q_proj")
    key = checkpoint_name(key, "kv_proj")
    value = checkpoint_name(value, "kv_proj")
    if cfg.qk_norm:
      query = RMSNorm(cfg, axis="head_dim", name="query_norm")(query)
      key = RMSNorm(cfg, axis="head_dim", name="key_norm")(key)
    query = apply_layer_rope(query, inputs.positions, rope_index, cfg)
    query = query * jnp.asarray(cfg.query_scale, query.dtype)
    key = apply_layer_rope(key, inputs.positions, rope_index, cfg)
    query = nn.with_logical_constraint(
      query, ("act_batch", "act_length", "act_heads", None)
    )
    key, value = (
      nn.with_logical_constraint(
        t, ("act_batch", "act_length", "act_kv_heads", None)
      )
      for t in (key, value)
    )

    if kv_cache is not None:
      assert inputs.cache_index is not None  # decoding passes both
      start = (0, inputs.cache_index, 0, 0)
      kv_cache = tuple(
        jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start)
        for c, new in zip(kv_cache, (key, value))
      )
      key, value = (c.astype(cfg.dtype) for c in kv_cache)

    impl = resolve_impl(cfg, x.shape[1], kv_cache is not None)
    if impl == "splash":
      encoded = _splash(query, key, value, inputs.segment_ids, window, cfg)
    elif impl == "blockwise":
      encoded = _blockwise(query, key, value, inputs, window, cfg)
    else:
      mask = attention_mask(
        inputs.positions,
        inputs.segment_ids,
        inputs.key_positions,
        inputs.key_segments,
        window,
      )
      encoded = dot_product_attention(
        query, key, value, mask, cfg.attn_logit_softcap
      )
    encoded = nn.with_logical_constraint(
      encoded, ("act_batch", "act_length", "act_heads", None)
    )
    out = Einsum(
      (n, h, d),
      ("heads", "head_dim", "embed"),
      in_axis=(0, 1),
      config=cfg,
      name="attn_vec_einsum",
    )("BTNH,NHD->BTD", encoded)
    return out, kv_cache
