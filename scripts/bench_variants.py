"""Prototype changes to the train step, applied as patches for benchmarks.

    bench_variants.apply("flash")   # before the model or step is built

Each patch swaps one module or function of gemma_jax for a version built on
gemma_jax.model.kernels, keeping the parameter tree, so that
scripts/bench_vs_hf.py can measure it side by side with the unchanged code
(`--ours LABEL:+flash,+geglu`). They are measuring tools, not the way to
ship: docs/performance.md says which change to make where.

  flash[N]   attention through kernels.blockwise_attention (query blocks of
             N tokens, default 128), no [B, K, G, T, S] residuals;
  geglu      the MLP's gelu(gate) * up through kernels.gelu_mul;
  ce[N]      final projection, soft-cap and cross-entropy fused and chunked
             (N tokens a chunk, default 1024) through kernels.cross_entropy;
  split_mlp  gate and up as two einsums instead of one [2, D, F] einsum;
  mlp        the whole MLP through kernels.geglu_mlp (row-major matmuls
             over [BT, 2F], saves x and the pre-activations only).
"""

import re

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.model import attention as attention_lib
from gemma_jax.model import kernels, layers
from gemma_jax.model import transformer as transformer_lib
from gemma_jax.train import step as step_lib


def _weight(module, name, shape, axes, in_axis, cfg):
  """The `w` param of a child named `name`, as layers.Einsum creates it."""
  class W(nn.Module):
    @nn.compact
    def __call__(self):
      import math
      fan_in = math.prod(shape[a] for a in
                         ((in_axis,) if isinstance(in_axis, int)
                          else in_axis))
      init = nn.initializers.truncated_normal(
          1 / (0.87962566 * math.sqrt(fan_in)))
      return layers.param(self, "w", shape, axes, init,
                          cfg.param_dtype).astype(cfg.dtype)
  return W(name=name, parent=module)()


def flash(block: int = 128):
  class FlashAttention(attention_lib.Attention):
    @nn.compact
    def __call__(self, x, positions, segment_ids, window, kv_cache=None,
                 key_positions=None, key_segments=None, cache_index=None):
      assert kv_cache is None, "prototype: training only"
      cfg = self.config
      n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
      wq = _weight(self, "q_einsum", (n, d, h),
                   ("heads", "embed", "head_dim"), 1, cfg)
      wkv = _weight(self, "kv_einsum", (2, k, d, h),
                    (None, "kv_heads", "embed", "head_dim"), 2, cfg)
      wo = _weight(self, "attn_vec_einsum", (n, h, d),
                   ("heads", "head_dim", "embed"), (0, 1), cfg)
      query = jnp.einsum("BTD,NDH->BTNH", x, wq)
      key, value = jnp.einsum("BSD,CKDH->CBSKH", x, wkv)
      query = layers.apply_rope(query, positions, cfg.rope_max_wavelength)
      query = query * jnp.asarray(cfg.query_scale, query.dtype)
      key = layers.apply_rope(key, positions, cfg.rope_max_wavelength)
      b, t = x.shape[:2]
      query = query.reshape(b, t, k, n // k, h)
      encoded = kernels.attention_by_window(
          query, key, value, positions, segment_ids, window,
          cfg.layer_windows, cfg.attn_logit_softcap, block)
      out = jnp.einsum("BTNH,NHD->BTD", encoded.reshape(b, t, n, h), wo)
      return out, None
  transformer_lib.Attention = FlashAttention


def geglu(split: bool = False):
  class GegluMLP(layers.MLP):
    @nn.compact
    def __call__(self, x):
      cfg = self.config
      w = _weight(self, "gating_einsum", (2, cfg.d_model, cfg.mlp_dim),
                  (None, "embed", "mlp"), 1, cfg)
      if split:
        gate = jnp.einsum("BTD,DF->BTF", x, w[0])
        up = jnp.einsum("BTD,DF->BTF", x, w[1])
      else:
        gate, up = jnp.einsum("BTD,CDF->CBTF", x, w)
      hidden = kernels.gelu_mul(gate, up)
      linear = _weight(self, "linear", (cfg.mlp_dim, cfg.d_model),
                       ("mlp", "embed"), 0, cfg)
      return jnp.einsum("BTF,FD->BTD", hidden, linear)
  transformer_lib.MLP = GegluMLP


def split_mlp():
  geglu(split=True)


def mlp():
  class FusedMLP(layers.MLP):
    @nn.compact
    def __call__(self, x):
      cfg = self.config
      w = _weight(self, "gating_einsum", (2, cfg.d_model, cfg.mlp_dim),
                  (None, "embed", "mlp"), 1, cfg)
      linear = _weight(self, "linear", (cfg.mlp_dim, cfg.d_model),
                       ("mlp", "embed"), 0, cfg)
      return kernels.geglu_mlp(x, w, linear)
  transformer_lib.MLP = FusedMLP


class _Hidden(transformer_lib.Transformer):
  """The Transformer's training path up to the final norm: [B, T, D]."""

  @nn.compact
  def __call__(self, tokens, positions, segment_ids):
    cfg = self.config
    embedder = layers.Embedder(cfg, name="embedder")
    x = embedder.encode(tokens)
    block = transformer_lib.Block
    if cfg.remat_policy != "none":
      block = nn.remat(block,
                       policy=transformer_lib.REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=False)
    layers_ = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, 0) + (nn.broadcast,) * 5, length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)
    x, _ = layers_(x, windows, None, positions, segment_ids, None, None, 0)
    return layers.RMSNorm(cfg, name="final_norm")(x)


def ce(chunk: int = 1024):
  def token_losses(model, params, mb, z_loss):
    cfg = model.config
    hidden = _Hidden(cfg).apply({"params": params}, mb["inputs"],
                                mb["positions"], mb["segment_ids"])
    table = params["embedder"]["embedding"][:cfg.vocab_size].astype(
        cfg.dtype)
    ce_, lse = kernels.cross_entropy(hidden, table, mb["targets"],
                                     cfg.final_logit_softcap, chunk)
    mask = mb["loss_mask"].astype(jnp.float32)
    return ce_ * mask, z_loss * jnp.square(lse) * mask
  step_lib._token_losses = token_losses


PATCHES = {"flash": flash, "geglu": geglu, "ce": ce, "split_mlp": split_mlp,
           "mlp": mlp}


def apply(name: str) -> None:
  """Applies patch `name`, e.g. 'flash', 'flash256', 'ce2048'."""
  m = re.fullmatch(r"([a-z_]+?)(\d*)", name)
  if not m or m.group(1) not in PATCHES:
    raise SystemExit(f"unknown patch {name!r}; valid: {', '.join(PATCHES)}")
  fn = PATCHES[m.group(1)]
  fn(*([int(m.group(2))] if m.group(2) else []))
