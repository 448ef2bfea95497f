"""The Gemma transformer: one config-driven module for every Gemma 1, 2 and 3
(text) size.

    logits = Transformer(cfg).apply({"params": p}, tokens)          # training
    logits, cache = Transformer(cfg).apply(                          # decoding
        {"params": p}, tokens, cache, method=Transformer.decode)
    ce, lse = Transformer(cfg).apply(                                # the loss
        {"params": p}, tokens, targets, method=Transformer.token_losses)

Layers run under `nn.scan`, so compile time does not grow with depth. Local
(sliding-window) and global layers are the same scanned layer: each layer's
window (0 = global) and RoPE setting are per-layer data.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.model import kernels
from gemma_jax.model.attention import (
  Attention,
  AttentionInputs,
  rope_settings,
)
from gemma_jax.model.config import ModelConfig
from gemma_jax.model.layers import MLP, Embedder, RMSNorm

REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "qkv_proj": jax.checkpoint_policies.save_only_these_names(
    "q_proj", "kv_proj"
  ),
}

_ACT = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
  """Pre-norm attention and MLP; Gemma 2 and 3 also norm each branch's
  output."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, layer, inputs: AttentionInputs):
    """x [B, T, D]; layer: this layer's (window, RoPE setting index, kv
    cache or None)."""
    cfg = self.config
    window, rope_index, kv_cache = layer
    h = RMSNorm(cfg, name="pre_attention_norm")(x)
    h, kv_cache = Attention(cfg, name="attn")(
      h, window, inputs, kv_cache, rope_index
    )
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
  shape = (
    config.num_layers,
    batch,
    max_len,
    config.num_kv_heads,
    config.head_dim,
  )
  dtype = dtype or config.dtype
  return {
    "k": jnp.zeros(shape, dtype),
    "v": jnp.zeros(shape, dtype),
    "positions": jnp.zeros((batch, max_len), jnp.int32),
    "segment_ids": jnp.full((batch, max_len), -1, jnp.int32),
    "index": jnp.zeros((), jnp.int32),
  }


def _defaults(tokens, positions, segment_ids, start=0):
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  return positions, segment_ids


class Transformer(nn.Module):
  """tokens [B, T] -> float32 logits [B, T, V]; `decode` also uses a cache."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(
        block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False
      )
    self.embedder = Embedder(cfg)
    self.layers = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast),
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg)
    self.final_norm = RMSNorm(cfg)

  def __call__(self, tokens, positions=None, segment_ids=None):
    """Logits of every position. positions/segment_ids [B, T] describe
    packed documents (default: one document per row)."""
    positions, segment_ids = _defaults(tokens, positions, segment_ids)
    inputs = AttentionInputs(positions, segment_ids, positions, segment_ids)
    logits, _ = self._forward(tokens, inputs, None)
    return logits

  def decode(self, tokens, cache, positions=None, segment_ids=None):
    """Logits of `tokens` [B, T] written after the cache's `index` slots;
    returns (logits, the cache with them)."""
    start = cache["index"]
    positions, segment_ids = _defaults(tokens, positions, segment_ids, start)
    update = lambda slots, new: jax.lax.dynamic_update_slice(
      slots, new, (0, start)
    )
    inputs = AttentionInputs(
      positions,
      segment_ids,
      update(cache["positions"], positions),
      update(cache["segment_ids"], segment_ids),
      cache_index=start,
    )
    logits, (k, v) = self._forward(tokens, inputs, (cache["k"], cache["v"]))
    return logits, {
      "k": k,
      "v": v,
      "positions": inputs.key_positions,
      "segment_ids": inputs.key_segments,
      "index": start + tokens.shape[1],
    }

  def token_losses(self, tokens, targets, positions=None, segment_ids=None):
    """(ce, lse): float32 [B, T] cross-entropy of `targets` [B, T] and the
    log-sum-exp of the logits (for a z-loss), as from the logits of
    `__call__`. With config.loss_chunk, the output projection, soft-cap and
    loss run fused, loss_chunk tokens per batch shard at a time, and the
    [B, T, V] logits are never stored (kernels.cross_entropy)."""
    cfg = self.config
    positions, segment_ids = _defaults(tokens, positions, segment_ids)
    inputs = AttentionInputs(positions, segment_ids, positions, segment_ids)
    if not cfg.loss_chunk:
      logits, _ = self._forward(tokens, inputs, None)
      lse = jax.nn.logsumexp(logits, axis=-1)
      onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
      return lse - jnp.einsum("BTV,BTV->BT", logits, onehot), lse
    hidden, _ = self._hidden(tokens, inputs, None)
    table = self.embedder.embedding[: cfg.vocab_size].astype(cfg.dtype)
    # loss_chunk counts tokens of one batch shard: rows per shard x a slice
    # of T.
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = nn.logical_to_mesh_axes(("act_batch",))[0]
    batch_axes = (
      (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    )
    shards = (
      1
      if mesh.empty
      else math.prod(mesh.shape[a] for a in batch_axes if a in mesh.axis_names)
    )
    rows = max(1, tokens.shape[0] // shards)
    constrain = functools.partial(
      nn.with_logical_constraint, logical_axis_resources=("vocab", "embed")
    )
    return kernels.cross_entropy(
      hidden,
      table,
      targets,
      cfg.final_logit_softcap,
      max(1, cfg.loss_chunk // rows),
      constrain,
    )

  def _hidden(self, tokens, inputs: AttentionInputs, kv_cache):
    """Final-normed hidden states [B, T, D] and the updated cache."""
    cfg = self.config
    x = nn.with_logical_constraint(self.embedder.encode(tokens), _ACT)
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)
    settings = rope_settings(cfg)
    ropes = jnp.asarray([settings.index(r) for r in cfg.layer_ropes], jnp.int32)
    x, kv_cache = self.layers(x, (windows, ropes, kv_cache), inputs)
    return self.final_norm(x), kv_cache

  def _forward(self, tokens, inputs: AttentionInputs, kv_cache):
    cfg = self.config
    x, kv_cache = self._hidden(tokens, inputs, kv_cache)
    logits = self.embedder.decode(x)
    if cfg.final_logit_softcap:
      cap = cfg.final_logit_softcap
      logits = cap * jnp.tanh(logits / cap)
    logits = nn.with_logical_constraint(
      logits, ("act_batch", "act_length", "act_vocab")
    )
    return logits, kv_cache
