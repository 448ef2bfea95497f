"""The Gemma transformer: one config-driven module for every Gemma 1 and 2 size.

Layers run under `nn.scan`, so compile time does not grow with depth. Local
(sliding-window) and global layers are the same scanned layer: each layer's
window is per-layer data (0 = global).
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.model.attention import Attention
from gemma_jax.model.config import ModelConfig
from gemma_jax.model.layers import MLP, Embedder, RMSNorm

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("q_proj",
                                                              "kv_proj"),
}

_ACT = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
  """Pre-norm attention and MLP; Gemma 2 also norms each branch's output."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, window, kv_cache, positions, segment_ids,
               key_positions, key_segments, cache_index):
    cfg = self.config
    h = RMSNorm(cfg, name="pre_attention_norm")(x)
    h, kv_cache = Attention(cfg, name="attn")(
        h, positions, segment_ids, window, kv_cache, key_positions,
        key_segments, cache_index)
    if cfg.sandwich_norms:
      h = RMSNorm(cfg, name="post_attention_norm")(h)
    x = nn.with_logical_constraint(x + h, _ACT)
    h = MLP(cfg, name="mlp")(RMSNorm(cfg, name="pre_ffw_norm")(x))
    if cfg.sandwich_norms:
      h = RMSNorm(cfg, name="post_ffw_norm")(h)
    return nn.with_logical_constraint(x + h, _ACT), kv_cache


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None):
  """An empty decoding cache for `max_len` tokens per row.

  k, v: [L, B, S, K, H]; positions, segment_ids: [B, S] describe each slot
  (segment -1 marks an empty slot, which no query can see); index: next slot.
  """
  shape = (config.num_layers, batch, max_len, config.num_kv_heads,
           config.head_dim)
  dtype = dtype or config.dtype
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "positions": jnp.zeros((batch, max_len), jnp.int32),
      "segment_ids": jnp.full((batch, max_len), -1, jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


class Transformer(nn.Module):
  """tokens [B, T] -> float32 logits [B, T, V] (and a new cache if given)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, cache=None):
    cfg = self.config
    b, t = tokens.shape
    start = 0 if cache is None else cache["index"]
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32),
                                   (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)

    embedder = Embedder(cfg, name="embedder")
    x = nn.with_logical_constraint(embedder.encode(tokens), _ACT)

    if cache is None:
      kv_cache = key_positions = key_segments = None
    else:
      kv_cache = (cache["k"], cache["v"])
      key_positions = jax.lax.dynamic_update_slice(cache["positions"],
                                                   positions, (0, start))
      key_segments = jax.lax.dynamic_update_slice(cache["segment_ids"],
                                                  segment_ids, (0, start))

    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=False)
    layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, 0) + (nn.broadcast,) * 5, length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)
    x, kv_cache = layers(x, windows, kv_cache, positions, segment_ids,
                         key_positions, key_segments, start)

    x = RMSNorm(cfg, name="final_norm")(x)
    logits = embedder.decode(x)
    if cfg.final_logit_softcap:
      cap = cfg.final_logit_softcap
      logits = cap * jnp.tanh(logits / cap)
    logits = nn.with_logical_constraint(
        logits, ("act_batch", "act_length", "act_vocab"))
    if cache is None:
      return logits
    return logits, {"k": kv_cache[0], "v": kv_cache[1],
                    "positions": key_positions, "segment_ids": key_segments,
                    "index": start + t}
