"""Named tiny models for tests: a few configs that every test starts from.

    from gemma_jax.model.testing import TINY_GEMMA2_MQA
    cfg = dataclasses.replace(TINY_GEMMA2_MQA, vocab_size=512)

Each is the `tiny-gemma`, `tiny-gemma2` or `tiny-gemma3` preset (same
architecture rules as the real sizes) shrunk to a few thousand parameters,
so a test compiles in seconds. A test that needs another size replaces the
fields it depends on; `model_section` writes one as a run config's `model:`
section; `init_params` gives a config's initial parameters.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.model.config import PRESETS, ModelConfig, preset
from gemma_jax.model.transformer import Transformer

# Gemma 1: no soft-caps, no sandwich norms, global attention only.
# One kv head shared by every query head (like gemma-2b).
TINY_GEMMA1_MQA = preset(
  "tiny-gemma",
  num_layers=1,
  d_model=16,
  mlp_dim=32,
  num_heads=2,
  num_kv_heads=1,
  head_dim=8,
  vocab_size=64,
)
# As many kv heads as query heads (like gemma-7b: a fused qkv_einsum in the
# official checkpoints); vocabulary 128 padded to 160 embedding rows.
TINY_GEMMA1_MHA = preset(
  "tiny-gemma",
  num_layers=2,
  d_model=32,
  mlp_dim=48,
  num_heads=2,
  num_kv_heads=2,
  head_dim=8,
  vocab_size=128,
  embed_rows=160,
)

# Gemma 2: local/global layers (window 4), soft-caps, sandwich norms.
# One kv head for two query heads.
TINY_GEMMA2_MQA = preset(
  "tiny-gemma2",
  num_layers=2,
  d_model=32,
  mlp_dim=64,
  num_heads=2,
  num_kv_heads=1,
  head_dim=16,
  vocab_size=64,
  sliding_window=4,
)
# Grouped queries: 4 query heads over 2 kv heads.
TINY_GEMMA2_GQA = preset(
  "tiny-gemma2",
  num_layers=2,
  d_model=32,
  mlp_dim=64,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  vocab_size=128,
  sliding_window=4,
)
# The official (Kaggle) checkpoints' shapes in small: GQA, an MLP width
# that is no power of two, vocabulary 128 padded to 160 embedding rows.
TINY_GEMMA2_PADDED = dataclasses.replace(
  TINY_GEMMA2_GQA, mlp_dim=48, embed_rows=160, sliding_window=8
)
# Twice as wide (d_model 64): room for a quantization block or an adapter.
TINY_GEMMA2_WIDE = preset(
  "tiny-gemma2",
  num_layers=2,
  d_model=64,
  mlp_dim=128,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  vocab_size=256,
  sliding_window=4,
)
# 8 query heads over 2 kv heads: heads to split over a tensor axis of 2-8.
TINY_GEMMA2_SHARDED = dataclasses.replace(
  TINY_GEMMA2_WIDE, num_heads=8, head_dim=8
)

# Gemma 3: QK-norm, no soft-caps, five local layers (window 4) to one
# global; 7 layers, so the pattern does not end on a whole cycle (layer 5 is
# the global one). RoPE per layer: 10k on local layers, 1M with linear
# scaling 8 on the global one. 4 query heads over 2 kv heads,
# heads * head_dim (32) = d_model.
TINY_GEMMA3 = preset(
  "tiny-gemma3",
  num_layers=7,
  d_model=32,
  mlp_dim=64,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  vocab_size=128,
  sliding_window=4,
)


def model_section(cfg: ModelConfig, **overrides) -> dict:
  """`cfg` (with `overrides`) as a run config's `model:` section: its preset
  and the fields that differ from it."""
  cfg = dataclasses.replace(cfg, **overrides)
  base = PRESETS[cfg.name]
  return {"preset": cfg.name} | {
    f.name: getattr(cfg, f.name)
    for f in dataclasses.fields(cfg)
    if getattr(cfg, f.name) != getattr(base, f.name)
  }


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """Transformer(cfg).init's parameters (unboxed) from jax.random.key(seed):
  a fresh tree each call, so a test may edit it.

  Traced on one token (the parameters do not depend on the row length: the
  program then holds no attention worth compiling), under jit, and with
  the plainest execution fields (config.EXECUTION_FIELDS: how a model is
  computed, never which parameters it has): one small program per
  model, which the session's compile cache shares between the
  tests and files that build the same model.
  """
  plain = dataclasses.replace(
    cfg,
    remat_policy="none",
    attention_impl="xla",
    fused_mlp=False,
    loss_chunk=0,
  )
  return _init(plain, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: ModelConfig, key: jax.Array) -> dict:
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Transformer(cfg).init(key, tokens)
  return nn.meta.unbox(variables["params"])
