"""LoRA adapters: a fresh adapter changes nothing, merging equals adapting,
and bad configs name the valid choices."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gemma_jax.errors import ConfigError
from gemma_jax.model import PRESETS, Transformer, lora
from gemma_jax.model.lora import LoraConfig
from gemma_jax.model.testing import TINY_GEMMA2_WIDE, init_params

TINY = dataclasses.replace(
  TINY_GEMMA2_WIDE,
  # An MLP with adapters computes by the plain einsums (the fused kernel
  # has no adapter term): the base is compared on the same path, bitwise.
  fused_mlp=False,
)
ADAPTED = dataclasses.replace(TINY, lora=LoraConfig(rank=4, alpha=8.0))


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens):
  return Transformer(cfg).apply({"params": params}, tokens)


TOKENS = jax.random.randint(jax.random.key(3), (2, 12), 0, 256)


@pytest.mark.slow
def test_adapters_at_their_zero_init_leave_the_logits_unchanged():
  params = init_params(ADAPTED)
  adapters, base = lora.split(params)
  # B starts at zero and A random, so the adapters are live but silent.
  assert all(
    not np.any(b)
    for p, b in jax.tree_util.tree_leaves_with_path(adapters)
    if jax.tree_util.keystr(p).endswith("_b']")
  )
  assert all(
    np.any(a)
    for p, a in jax.tree_util.tree_leaves_with_path(adapters)
    if jax.tree_util.keystr(p).endswith("_a']")
  )
  np.testing.assert_array_equal(
    _logits(ADAPTED, params, TOKENS), _logits(TINY, base, TOKENS)
  )


@pytest.mark.slow
def test_merged_weights_equal_the_adapted_forward_on_every_target():
  params = init_params(ADAPTED)
  adapters, base = lora.split(params)
  # numpy draws: an eager jax.random call compiles a program per shape.
  rng = np.random.default_rng(1)
  adapters = jax.tree.map(
    lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32),
    adapters,
  )
  adapted = _logits(ADAPTED, lora.combine(base, adapters), TOKENS)
  merged = jax.jit(lora.merge_params, static_argnums=2)(base, adapters, ADAPTED)
  assert lora.merged_config(ADAPTED) == TINY
  assert np.abs(adapted - _logits(TINY, base, TOKENS)).max() > 0.1
  np.testing.assert_allclose(_logits(TINY, merged, TOKENS), adapted, atol=2e-4)


def test_adapter_shapes_and_axes_keep_the_rank_replicated():
  boxed = jax.eval_shape(
    Transformer(ADAPTED).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
  )["params"]
  adapters, _ = lora.split(boxed)
  found = {
    jax.tree_util.keystr(p, simple=True, separator="/"): x
    for p, x in jax.tree_util.tree_leaves_with_path(
      adapters, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
  }
  assert {p: x.value.shape for p, x in found.items()} == lora.adapter_paths(
    ADAPTED
  )
  # A: the weight's fan-in axes, then the rank; B: the rank, then fan-out.
  assert found["layers/attn/q_einsum/lora_q_a"].names == (
    "layers",
    "embed",
    None,
  )
  assert found["layers/attn/q_einsum/lora_q_b"].names == (
    "layers",
    None,
    "heads",
    "head_dim",
  )
  assert found["layers/attn/attn_vec_einsum/lora_o_a"].names == (
    "layers",
    "heads",
    "head_dim",
    None,
  )
  assert found["layers/mlp/gating_einsum/lora_up_b"].names == (
    "layers",
    None,
    "mlp",
  )


@pytest.mark.slow
def test_an_adapter_on_one_slot_of_a_fused_weight_leaves_the_other():
  only_k = dataclasses.replace(TINY, lora=LoraConfig(rank=2, targets=("k",)))
  _, base = lora.split(init_params(ADAPTED))
  adapters = {}
  for path, shape in lora.adapter_paths(only_k).items():
    *parents, leaf = path.split("/")
    node = adapters
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.ones(shape)
  assert list(adapters["layers"]) == ["attn"]
  merged = jax.jit(lora.merge_params, static_argnums=2)(base, adapters, only_k)
  kv, kv0 = (t["layers"]["attn"]["kv_einsum"]["w"] for t in (merged, base))
  np.testing.assert_array_equal(kv[:, 1], kv0[:, 1])  # v untouched
  # All-ones A and B: each entry gains rank (2) x alpha/rank (1).
  np.testing.assert_allclose(kv[:, 0] - kv0[:, 0], 2.0, rtol=1e-6)


def test_bad_lora_configs_are_config_errors_that_name_the_choices():
  with pytest.raises(
    ConfigError,
    match="unknown target 'qkv'; valid targets: q, k, v, o, gate, up, down",
  ):
    LoraConfig(rank=4, targets=("q", "qkv"))
  with pytest.raises(ConfigError, match="rank must be positive, got 0"):
    LoraConfig(rank=0)
  # k and v project 64 -> 2 heads x 16 = 32: rank 33 cannot exist.
  with pytest.raises(
    ConfigError,
    match=r"lora.rank: 33 is larger than "
    r"projection 'k' \(64 in, 32 out\)",
  ):
    dataclasses.replace(TINY, lora=LoraConfig(rank=33))


def test_adapter_size_scales_with_the_rank_on_gemma2_9b():
  cfg = dataclasses.replace(PRESETS["gemma2-9b"], lora=LoraConfig(rank=16))
  count = sum(np.prod(s) for s in lora.adapter_paths(cfg).values())
  d, f, h, n, k, layers = 3584, 14336, 256, 16, 8, 42
  # Each target adds rank x (in + out): q, o; k, v; gate, up, down.
  per_rank = layers * (2 * (d + n * h) + 2 * (d + k * h) + 3 * (d + f))
  assert count == 16 * per_rank
  assert count / cfg.param_count() < 0.01
