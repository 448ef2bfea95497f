"""Analytic training FLOPs per token (for MFU and the AOT report)."""

import pytest

from gemma_jax.model import preset
from gemma_jax.train.metrics import (
  matmul_params,
  mean_keys_per_query,
  model_flops_per_token,
)


def test_causal_queries_see_half_the_keys_on_average():
  assert mean_keys_per_query(8) == 4.5  # 1 + 2 + ... + 8 over 8
  assert mean_keys_per_query(8, window=16) == 4.5
  # Window 2: keys 1, 2, 2, 2 -> 7 / 4.
  assert mean_keys_per_query(4, window=2) == 1.75


def test_matmul_weights_are_the_params_minus_norms_and_padding_rows():
  cfg = preset("gemma-7b")
  norms = cfg.num_layers * 2 * cfg.d_model + cfg.d_model
  padding = (cfg.num_embed_rows - cfg.vocab_size) * cfg.d_model
  assert matmul_params(cfg) == cfg.param_count() - norms - padding


def test_gemma_7b_at_8192_tokens():
  cfg = preset("gemma-7b")
  attention = 12 * 16 * 256 * 4096.5 * 28
  assert model_flops_per_token(cfg, 8192) == pytest.approx(
    6 * matmul_params(cfg) + attention
  )


def test_sliding_window_layers_cost_less_attention():
  local = preset("gemma2-9b")
  every_global = preset("gemma2-9b", attention_pattern=("global",))
  saved = model_flops_per_token(every_global, 8192) - model_flops_per_token(
    local, 8192
  )
  per_layer = 12 * 16 * 256 * (4096.5 - mean_keys_per_query(8192, 4096))
  assert saved == pytest.approx(21 * per_layer)
