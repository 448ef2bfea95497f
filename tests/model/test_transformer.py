"""The transformer: shapes, logical names, masks and numerics rules."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gemma_jax.model import PRESETS, Transformer, init_cache, preset
from gemma_jax.model.attention import apply_layer_rope, rope_settings
from gemma_jax.model.layers import Embedder, apply_rope
from gemma_jax.model.testing import TINY_GEMMA2_WIDE, init_params

TINY2 = TINY_GEMMA2_WIDE


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, segment_ids):
  return Transformer(cfg).apply(
    {"params": params}, tokens, positions, segment_ids
  )


def forward(cfg, params, tokens, positions=None, segment_ids=None):
  return _forward(cfg, params, jnp.asarray(tokens), positions, segment_ids)


@pytest.mark.parametrize(
  "name",
  [
    "gemma-2b",
    "gemma-7b",
    "gemma2-2b",
    "gemma2-9b",
    "gemma2-27b",
    "gemma3-1b",
    "gemma3-4b",
    "gemma3-12b",
    "gemma3-27b",
  ],
)
def test_traced_param_count_equals_config_count(name):
  cfg = PRESETS[name]
  shapes = jax.eval_shape(
    Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
  )["params"]
  assert (
    sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == cfg.param_count()
  )


@pytest.mark.slow
def test_every_param_has_logical_axis_names():
  # Names and shapes only: traced, not run.
  boxed = jax.eval_shape(
    Transformer(TINY2).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)
  )["params"]
  leaves = jax.tree.leaves(
    boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  layer_leaves = jax.tree.leaves(
    boxed["layers"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert all(
    x.names[0] == "layers" and x.value.shape[0] == 2 for x in layer_leaves
  )


@pytest.mark.slow
def test_padding_rows_of_the_embedding_never_reach_the_logits():
  cfg = dataclasses.replace(TINY2, embed_rows=300)
  params = init_params(cfg)
  tokens = np.arange(8)[None] % cfg.vocab_size
  logits = forward(cfg, params, tokens)
  assert logits.shape == (1, 8, cfg.vocab_size)
  table = params["embedder"]["embedding"]
  params["embedder"]["embedding"] = table.at[cfg.vocab_size :].set(1e3)
  np.testing.assert_array_equal(forward(cfg, params, tokens), logits)


@pytest.mark.slow
def test_sliding_window_sees_exactly_window_keys():
  """Query i sees key j iff i - W < j <= i; a key exactly W back is masked."""
  cfg = dataclasses.replace(TINY2, num_layers=1, attention_pattern=("local",))
  params = init_params(cfg)
  tokens = np.arange(1, 13)[None]
  base = forward(cfg, params, tokens)
  i, w = 10, cfg.sliding_window
  exactly_w_back = tokens.copy()
  exactly_w_back[0, i - w] = 200
  inside = tokens.copy()
  inside[0, i - w + 1] = 200
  np.testing.assert_array_equal(
    forward(cfg, params, exactly_w_back)[0, i], base[0, i]
  )
  assert np.abs(forward(cfg, params, inside)[0, i] - base[0, i]).max() > 1e-3
  # A global layer sees everything before it.
  global_cfg = dataclasses.replace(cfg, attention_pattern=("global",))
  assert (
    np.abs(
      forward(global_cfg, params, exactly_w_back)[0, i]
      - forward(global_cfg, params, tokens)[0, i]
    ).max()
    > 1e-3
  )


@pytest.mark.slow
def test_packed_documents_do_not_see_each_other():
  cfg = TINY2
  params = init_params(cfg)
  doc_a, doc_b = np.arange(2, 9), np.arange(20, 25)
  row = np.concatenate([doc_a, doc_b])[None]
  segments = np.array([[1] * 7 + [2] * 5])
  positions = np.array([list(range(7)) + list(range(5))])
  packed = forward(cfg, params, row, segment_ids=segments, positions=positions)
  alone_a = forward(cfg, params, doc_a[None])
  alone_b = forward(cfg, params, doc_b[None])
  np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 7:], alone_b[0], atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _mean_square_and_grad(cfg, params):
  """One compile per config: the base is shared by every policy's test."""
  tokens = jnp.asarray(np.arange(8)[None] % 256)
  return jax.value_and_grad(
    lambda p: jnp.mean(_forward(cfg, p, tokens, None, None) ** 2)
  )(params)


# "full" drops every activation; "qkv_proj" keeps named ones: the two kinds of
# policy. The other names select other built-in jax policies the same way.
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "qkv_proj"])
def test_remat_policy_changes_neither_logits_nor_gradients(policy):
  params = init_params(TINY2)
  base_loss, base_grad = _mean_square_and_grad(TINY2, params)
  cfg = dataclasses.replace(TINY2, remat_policy=policy)
  remat_loss, remat_grad = _mean_square_and_grad(cfg, params)
  np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grad), jax.tree.leaves(base_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "d_model, factor",
  [(2048, 45.25), (3072, 55.5), (2304, 48.0), (3584, 59.75), (4608, 68.0)],
)
def test_embedding_scale_is_rounded_in_bf16(d_model, factor):
  cfg = preset("tiny-gemma", d_model=d_model, dtype="bfloat16", vocab_size=4)
  table = jnp.ones((4, d_model), jnp.float32)
  x = Embedder(cfg).apply(
    {"params": {"embedding": table}},
    jnp.zeros((1, 1), jnp.int32),
    method="encode",
  )
  assert x.dtype == jnp.bfloat16 and float(x[0, 0, 0]) == factor


@pytest.mark.slow
def test_param_dtype_and_compute_dtype_are_separate():
  cfg = dataclasses.replace(TINY2, param_dtype="float32", dtype="bfloat16")
  params = init_params(cfg)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  logits = forward(cfg, params, np.arange(8)[None])
  assert logits.dtype == jnp.float32  # logits and loss stay float32
  f32 = forward(
    dataclasses.replace(cfg, dtype="float32"), params, np.arange(8)[None]
  )
  assert 0 < np.abs(logits - f32).max() < 0.5


def _losses_and_grads(cfg, params, tokens, targets, pos, seg):
  def loss(p):
    ce, lse = Transformer(cfg).apply(
      {"params": p}, tokens, targets, pos, seg, method=Transformer.token_losses
    )
    # Both outputs get gradient: the z-loss differentiates the lse.
    return jnp.sum(ce) + 1e-2 * jnp.sum(lse**2), (ce, lse)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.slow
def test_fused_mlp_and_chunked_loss_equal_the_plain_path():
  # Plain: autodiff of the GeGLU einsums, the [B, T, V] logits stored and
  # their cross-entropy. Fused: kernels.geglu_mlp and kernels.cross_entropy,
  # loss_chunk 10 over 2 rows: 5 positions a chunk, so 4, the largest
  # divisor of T = 12.
  plain = dataclasses.replace(TINY2, fused_mlp=False, loss_chunk=0)
  params = init_params(plain)
  rng = np.random.default_rng(0)
  tokens, targets = (
    jnp.asarray(rng.integers(0, 256, (2, 12)), jnp.int32) for _ in range(2)
  )
  pos = jnp.asarray([list(range(12)), list(range(5)) + list(range(7))])
  seg = jnp.asarray([[1] * 12, [1] * 5 + [2] * 7])
  (_, (ce, lse)), grads = _losses_and_grads(
    plain, params, tokens, targets, pos, seg
  )
  logits = forward(plain, params, tokens, pos, seg)
  np.testing.assert_allclose(
    lse - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0],
    ce,
    atol=1e-5,
  )
  fused = dataclasses.replace(TINY2, fused_mlp=True, loss_chunk=10)
  (_, (ce_f, lse_f)), grads_f = _losses_and_grads(
    fused, params, tokens, targets, pos, seg
  )
  np.testing.assert_allclose(ce_f, ce, atol=1e-5)
  np.testing.assert_allclose(lse_f, lse, atol=1e-5)
  for path, a, b in zip(
    jax.tree_util.tree_leaves_with_path(grads),
    jax.tree.leaves(grads_f),
    jax.tree.leaves(grads),
  ):
    np.testing.assert_allclose(
      a,
      b,
      atol=1e-5 * float(jnp.abs(b).max()),
      err_msg=jax.tree_util.keystr(path[0]),
    )


TINY3 = preset(
  "tiny-gemma3",
  num_layers=7,
  d_model=64,
  mlp_dim=128,
  head_dim=16,
  vocab_size=256,
  sliding_window=4,
)


@pytest.mark.slow
def test_gemma3_decoding_with_a_cache_equals_the_forward_pass():
  # Per-layer RoPE and QK-norm take the same path with a cache: token by
  # token, past the window, equals the whole row at once.
  params = init_params(TINY3)
  tokens = np.arange(3, 15)[None]
  want = forward(TINY3, params, tokens)
  cache = init_cache(TINY3, 1, tokens.shape[1])
  step = jax.jit(
    lambda p, t, c: Transformer(TINY3).apply(
      {"params": p}, t, c, method=Transformer.decode
    )
  )
  got = []
  for i in range(tokens.shape[1]):
    logits, cache = step(params, jnp.asarray(tokens[:, i : i + 1]), cache)
    got.append(logits[:, 0])
  np.testing.assert_allclose(np.stack(got, 1), want, atol=2e-5, rtol=0)


def test_layer_rope_picks_each_layers_base_and_scale():
  x = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
  pos = jnp.arange(5)[None] * 1000
  settings = rope_settings(TINY3)
  assert settings == ((1e4, 1.0), (1e6, 8.0))
  for i, (base, scale) in enumerate(settings):
    got = apply_layer_rope(x, pos, jnp.int32(i), TINY3)
    np.testing.assert_array_equal(got, apply_rope(x, pos, base, scale))
  # Linear scaling: position p with factor 8 is position p / 8 unscaled.
  np.testing.assert_allclose(
    apply_rope(x, pos, 1e6, 8.0), apply_rope(x, pos / 8, 1e6), atol=1e-5
  )


def test_qk_norm_normalises_each_heads_queries_and_keys():
  params = init_params(TINY3)
  attn = params["layers"]["attn"]
  assert attn["query_norm"]["scale"].shape == (7, 16)
  assert attn["key_norm"]["scale"].shape == (7, 16)
  # Without QK-norm (and no soft-caps), scaling q and k scales the scores;
  # with it, their norms are undone.
  tokens = np.arange(3, 15)[None]
  base = forward(TINY3, params, tokens)
  scaled = jax.tree.map(lambda x: x, params)
  q = scaled["layers"]["attn"]["q_einsum"]["w"]
  scaled["layers"]["attn"]["q_einsum"]["w"] = q * 7.0
  kv = scaled["layers"]["attn"]["kv_einsum"]["w"]
  scaled["layers"]["attn"]["kv_einsum"]["w"] = kv.at[:, 0].multiply(3.0)
  np.testing.assert_allclose(
    forward(TINY3, scaled, tokens), base, atol=1e-4, rtol=0
  )
