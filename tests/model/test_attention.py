"""Every attention_impl computes the model's one attention rule.

blockwise and splash (Pallas, interpreted on CPU) are compared with the
plain XLA einsums through the whole model, logits and every parameter's
gradient, in float32 to 1e-5 of the largest value: GQA and MQA, a local
window smaller than one 128-token block beside a global layer, packed rows
(several documents and trailing padding) and a query scale other than
1/sqrt(head_dim) (Gemma 2 27B's); and Gemma 3's layers: QK-norm, no caps,
five local layers to one global, RoPE base and scaling per layer.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from gemma_jax.model import Transformer
from gemma_jax.model import attention as attention_lib
from gemma_jax.model.testing import TINY_GEMMA2_GQA, init_params
from gemma_jax.sharding import rules
from gemma_jax.sharding.config import MeshConfig

pytestmark = pytest.mark.slow

T = 256  # two 128-token blocks
TOL = 1e-5
BASE = dataclasses.replace(
  TINY_GEMMA2_GQA,
  head_dim=16,
  vocab_size=64,
  sliding_window=40,
  query_pre_attn_scalar=24.0,
)


def batch(rows=2):
  """Row 0 one document; the others several, the last ending in padding
  (segment 0); positions restart at 0 in each document."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, BASE.vocab_size, size=(rows, T))
  seg = np.ones((rows, T), np.int32)
  pos = np.tile(np.arange(T, dtype=np.int32), (rows, 1))
  for row in range(1, rows):
    bounds = [0, 20 + 9 * row, 150, 200, T]
    for doc, (a, b) in enumerate(itertools.pairwise(bounds)):
      seg[row, a:b], pos[row, a:b] = doc + 1, np.arange(b - a)
  seg[-1, 230:] = 0
  return (jnp.asarray(tokens, jnp.int32), jnp.asarray(pos), jnp.asarray(seg))


# Gemma 3 rules on the same sizes: 7 layers (local x5, global, local), RoPE
# 10k on local and 1M with linear scaling 8 on the global layer.
GEMMA3 = dataclasses.replace(
  BASE,
  num_layers=7,
  attention_pattern=("local",) * 5 + ("global",),
  attn_logit_softcap=None,
  final_logit_softcap=None,
  qk_norm=True,
  rope_max_wavelength=1e6,
  rope_scale_factor=8.0,
  local_rope_max_wavelength=1e4,
  local_rope_scale_factor=1.0,
)
CONFIGS = {"gemma2": BASE, "gemma3": GEMMA3}


def logits_and_grads(cfg, params, tokens, pos, seg):
  def loss(params):
    logits = Transformer(cfg).apply({"params": params}, tokens, pos, seg)
    w = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32))
    return jnp.sum(logits * w.reshape(logits.shape)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def assert_close(got, want, what):
  flat = jax.tree_util.tree_leaves_with_path(want)
  for (path, w), g in zip(flat, jax.tree.leaves(got), strict=True):
    # numpy, not jnp: an eager jnp op compiles one program per shape.
    w, g = np.asarray(w), np.asarray(g)
    scale = max(float(np.max(np.abs(w))), 1e-6)
    np.testing.assert_allclose(
      g,
      w,
      atol=TOL * scale,
      rtol=0,
      err_msg=f"{what} {jax.tree_util.keystr(path)}",
    )


@functools.cache
def reference(num_kv_heads, family="gemma2"):
  cfg = dataclasses.replace(
    CONFIGS[family],
    num_kv_heads=num_kv_heads,
    attention_impl="xla",
    fused_mlp=False,
  )
  params = init_params(cfg)
  return params, logits_and_grads(cfg, params, *batch())


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_impl_matches_xla_logits_and_gradients(impl, kv_heads):
  params, want = reference(kv_heads)
  cfg = dataclasses.replace(
    BASE, num_kv_heads=kv_heads, attention_impl=impl, fused_mlp=False
  )
  got = logits_and_grads(cfg, params, *batch())
  assert_close(got, want, impl)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_impl_matches_xla_on_gemma3_layers(impl):
  params, want = reference(2, "gemma3")
  assert "query_norm" in params["layers"]["attn"]
  cfg = dataclasses.replace(GEMMA3, attention_impl=impl, fused_mlp=False)
  got = logits_and_grads(cfg, params, *batch())
  assert_close(got, want, impl)


def test_splash_under_the_program_mesh_splits_batch_and_heads():
  # How TrainProgram traces the model: jax.set_mesh plus the logical rules;
  # rows over data x fsdp, heads over tensor.
  mesh = Mesh(
    np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor")
  )
  params, (want, _) = reference(2)
  cfg = dataclasses.replace(BASE, attention_impl="splash", fused_mlp=False)
  tokens, pos, seg = (jnp.tile(x, (2, 1)) for x in batch())
  with rules.sharding_context(mesh, MeshConfig()):
    # One trace: its text is checked and its compiled program run.
    lowered = jax.jit(
      lambda p: Transformer(cfg).apply({"params": p}, tokens, pos, seg)
    ).lower(params)
    got = lowered.compile()(params)
  text = lowered.as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  assert_close(got, jnp.tile(want, (2, 1, 1)), "sharded splash")


def test_auto_is_splash_on_tpu_blockwise_elsewhere_xla_with_a_cache(
  monkeypatch,
):
  cfg = BASE  # attention_impl defaults to auto
  assert attention_lib.resolve_impl(cfg, 256, cached=False) == "blockwise"
  assert attention_lib.resolve_impl(cfg, 256, cached=True) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention_lib.resolve_impl(cfg, 256, cached=False) == "splash"
  # The kernel's blocks are 128 tokens: other lengths take blockwise.
  assert attention_lib.resolve_impl(cfg, 200, cached=False) == "blockwise"
  splash = dataclasses.replace(cfg, attention_impl="splash")
  assert attention_lib.resolve_impl(splash, 8, cached=True) == "xla"


@pytest.mark.tpu_compile
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_auto_compiles_the_splash_kernel_for_a_tpu_topology(family):
  # Ahead of time for 4 v5e chips (libtpu, no TPU): auto picks splash from
  # the mesh's devices, and the step holds the Mosaic kernel, not the
  # interpreter, forward and backward.
  from gemma_jax.train import aot

  mesh = Mesh(
    np.asarray(aot.topology_devices("v5e:2x2")).reshape(1, 2, 2),
    ("data", "fsdp", "tensor"),
  )
  cfg = dataclasses.replace(CONFIGS[family], fused_mlp=False)
  # Shapes only: traced, neither compiled nor run.
  abstract = jax.eval_shape(lambda: init_params(cfg))
  tokens, pos, seg = batch()

  def loss(p):
    return jnp.sum(Transformer(cfg).apply({"params": p}, tokens, pos, seg))

  with rules.sharding_context(mesh, MeshConfig()):
    hlo = jax.jit(jax.grad(loss)).lower(abstract).compile().as_text()
  assert hlo.count("tpu_custom_call") >= 2
