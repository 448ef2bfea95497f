"""Analytic training FLOPs of a Gemma model, for MFU and to check the compiler.

Counts matmuls only (2 FLOPs per multiply-add), forward + backward = 3x the
forward, no rematerialisation (the MFU convention: recomputation is not
useful work). Attention is counted causally: query i of a layer with window
W sees min(i + 1, W) keys, so sliding-window layers cost less than global.
"""

from gemma_jax.model.config import ModelConfig


def mean_keys_per_query(seq_len: int, window: int = 0) -> float:
  """Average number of keys a causal query attends to (window 0: global)."""
  w = window or seq_len
  if w >= seq_len:
    return (seq_len + 1) / 2
  # Positions 0..w-1 see 1..w keys, the remaining seq_len - w see w each.
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def matmul_params(cfg: ModelConfig) -> int:
  """Weights used in a matmul per token: all layers + the output projection."""
  d, h, f = cfg.d_model, cfg.head_dim, cfg.mlp_dim
  attn = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * d * h
  return cfg.num_layers * (attn + 3 * d * f) + cfg.vocab_size * d


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 * matmul params + causal attention."""
  attn = sum(
    12 * cfg.num_heads * cfg.head_dim * mean_keys_per_query(seq_len, w)
    for w in cfg.layer_windows
  )
  return 6 * matmul_params(cfg) + attn
