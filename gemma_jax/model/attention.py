"""Multi-head attention for MHA, MQA and GQA, local or global by a window.

One mask rule serves training, packed rows and decoding with a cache: query
t sees key s iff they are in the same segment, s is not later than t, and
(for a local layer) s is fewer than `window` positions back. Positions restart
at 0 for each packed document, so comparing positions is comparing indices
within a document.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from gemma_jax.model.config import ModelConfig
from gemma_jax.model.layers import Einsum, apply_rope

_MASKED = -2.3819763e38  # large finite negative: a fully masked row stays NaN-free


def attention_mask(q_pos, q_seg, k_pos, k_seg, window):
  """[B, T, S] bool. window: int scalar (may be traced); 0 means global."""
  same_doc = q_seg[:, :, None] == k_seg[:, None, :]
  distance = q_pos[:, :, None] - k_pos[:, None, :]
  in_window = (window == 0) | (distance < window)
  return same_doc & (distance >= 0) & in_window


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, window, kv_cache=None,
               key_positions=None, key_segments=None, cache_index=None):
    """x: [B, T, D] -> ([B, T, D], updated (k, v) cache or None).

    Without a cache, keys are the queries' own tokens. With one, this step's
    keys and values are written at `cache_index` into `kv_cache` ([B, S, K, H]
    each), and `key_positions`/`key_segments` [B, S] describe every slot.
    """
    cfg = self.config
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    query = Einsum((n, d, h), ("heads", "embed", "head_dim"), in_axis=1,
                   config=cfg, name="q_einsum")("BTD,NDH->BTNH", x)
    key, value = Einsum((2, k, d, h), (None, "kv_heads", "embed", "head_dim"),
                        in_axis=2, config=cfg,
                        name="kv_einsum")("BSD,CKDH->CBSKH", x)
    query = checkpoint_name(query, "q_proj")
    key, value = checkpoint_name(key, "kv_proj"), checkpoint_name(value,
                                                                  "kv_proj")
    query = apply_rope(query, positions, cfg.rope_max_wavelength)
    query = query * jnp.asarray(cfg.query_scale, query.dtype)
    key = apply_rope(key, positions, cfg.rope_max_wavelength)
    query = nn.with_logical_constraint(
        query, ("act_batch", "act_length", "act_heads", None))
    key, value = (nn.with_logical_constraint(
        t, ("act_batch", "act_length", "act_kv_heads", None))
                  for t in (key, value))

    new_cache = None
    if kv_cache is not None:
      cached_k, cached_v = kv_cache
      start = (0, cache_index, 0, 0)
      key = jax.lax.dynamic_update_slice(cached_k, key.astype(cached_k.dtype),
                                         start)
      value = jax.lax.dynamic_update_slice(cached_v,
                                           value.astype(cached_v.dtype), start)
      new_cache = (key, value)
      key, value = key.astype(cfg.dtype), value.astype(cfg.dtype)
    else:
      key_positions, key_segments = positions, segment_ids

    b, t = x.shape[:2]
    query = query.reshape(b, t, k, n // k, h)  # head n uses kv head n // G
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", query, key,
                        preferred_element_type=jnp.float32)
    if cfg.attn_logit_softcap:
      cap = cfg.attn_logit_softcap
      logits = cap * jnp.tanh(logits / cap)
    mask = attention_mask(positions, segment_ids, key_positions, key_segments,
                          window)
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
    encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value).reshape(b, t, n, h)
    encoded = nn.with_logical_constraint(
        encoded, ("act_batch", "act_length", "act_heads", None))
    out = Einsum((n, h, d), ("heads", "head_dim", "embed"), in_axis=(0, 1),
                 config=cfg, name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)
    return out, new_cache
