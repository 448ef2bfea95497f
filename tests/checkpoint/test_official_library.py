"""The official `gemma` library and our official-layout converter, both ways.

Import: a tiny checkpoint built by the library itself (its own init, saved
in the flat layout of the releases by its own converter) loads with
`kaggle.load` and gives the library's logits. Export: `kaggle.save` writes
a checkpoint that the library's own loader (`gm.ckpts.load_params`) reads
and runs to our logits. Gemma 1 (MQA, and MHA's fused qkv), Gemma 2 and
Gemma 3.

Skipped unless `gemma` (3.3.0) imports: it is no dependency of ours. What
makes it import next to our jax 0.10 / flax 0.12: sentencepiece 0.2.1 (0.2.3
needs protobuf 7, which the tensorflow that kauldron pulls in does not
allow), and kauldron 1.4.2, which renamed the `AbstractPartialLoader` base
class that `gm.ckpts` subclasses to `InitTransform` (older kauldrons do not
import with jax 0.10): the old name is set to the new class below. Run in
a side environment that sees ours, so nothing here changes:

    python3 -m venv /tmp/gv
    echo "$PWD/.venv/lib/python3.11/site-packages" \
      > /tmp/gv/lib/python3.11/site-packages/base.pth
    /tmp/gv/bin/pip install gemma==3.3.0 sentencepiece==0.2.1
    JAX_PLATFORMS=cpu /tmp/gv/bin/python -m pytest \
      tests/checkpoint/test_official_library.py
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemma_jax.checkpoint import kaggle
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.model import Transformer, preset

pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    importlib.util.find_spec("gemma") is None,
    reason="needs the official `gemma` library (not a dependency)",
  ),
]

SMALL = dict(d_model=32, mlp_dim=48, head_dim=8, vocab_size=128)
CONFIGS = {
  "gemma1-mqa": preset("tiny-gemma", num_layers=2, **SMALL),
  "gemma1-mha": preset(
    "tiny-gemma", num_layers=2, num_heads=2, num_kv_heads=2, **SMALL
  ),
  "gemma2": preset(
    "tiny-gemma2", num_layers=3, sliding_window=6, embed_rows=160, **SMALL
  ),
  "gemma3": preset("tiny-gemma3", num_layers=7, sliding_window=6, **SMALL),
}
T = 24


@pytest.fixture(scope="module")
def gm():
  import kauldron.checkpoints as kd_ckpts

  if not hasattr(kd_ckpts, "AbstractPartialLoader"):
    kd_ckpts.AbstractPartialLoader = kd_ckpts.InitTransform
  from gemma import gm

  return gm


def library_model(gm, cfg):
  """The library's Transformer for our config (float32)."""
  nn = gm.nn
  kinds = nn.config.AttentionType
  norm = nn.config.QueryPreAttentionNormalisation
  scalar = cfg.query_pre_attn_scalar or cfg.head_dim
  assert scalar in (cfg.head_dim, cfg.d_model // cfg.num_heads)
  local = cfg.local_rope_max_wavelength or cfg.rope_max_wavelength
  local_scale = cfg.local_rope_scale_factor or cfg.rope_scale_factor
  config = nn.config.TransformerConfig(
    num_embed=cfg.num_embed_rows,
    embed_dim=cfg.d_model,
    hidden_dim=cfg.mlp_dim,
    num_heads=cfg.num_heads,
    head_dim=cfg.head_dim,
    num_kv_heads=cfg.num_kv_heads,
    final_logit_softcap=cfg.final_logit_softcap,
    use_post_attn_norm=cfg.sandwich_norms,
    use_post_ffw_norm=cfg.sandwich_norms,
    attention_types=tuple(
      kinds.LOCAL_SLIDING if w else kinds.GLOBAL for w in cfg.layer_windows
    ),
    query_pre_attn_norm=(
      norm.BY_ONE_OVER_SQRT_HEAD_DIM
      if scalar == cfg.head_dim
      else norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
    ),
    attn_logits_soft_cap=cfg.attn_logit_softcap,
    sliding_window_size=cfg.sliding_window,
    transpose_gating_einsum=cfg.qk_norm,  # as kaggle.save writes it
    use_qk_norm=cfg.qk_norm,
    local_base_frequency=int(local),
    global_base_frequency=int(cfg.rope_max_wavelength),
    local_scale_factor=local_scale,
    global_scale_factor=cfg.rope_scale_factor,
  )
  return nn.Transformer(config=config, dtype=jnp.float32)


def tokens():
  # No 0: the library masks pad (0) tokens out of attention.
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(1, 128, size=(2, T)), jnp.int32)


def library_logits(model, params, cfg):
  with jax.default_matmul_precision("highest"):
    out = model.apply({"params": params}, tokens(), return_last_only=False)
  return np.asarray(out.logits)[..., : cfg.vocab_size]


def our_logits(params, cfg):
  with jax.default_matmul_precision("highest"):
    return np.asarray(Transformer(cfg).apply({"params": params}, tokens()))


def assert_close(got, want):
  scale = np.abs(want).max()
  print(
    f"max |ours - library| {np.abs(got - want).max():.2e}, |logits| {scale:.1f}"
  )
  np.testing.assert_allclose(got, want, atol=1e-5 * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_library_checkpoint_imports_with_the_librarys_logits(
  gm, tmp_path, name
):
  from gemma.gm.ckpts import _checkpoint

  cfg = CONFIGS[name]
  model = library_model(gm, cfg)
  params = model.init(jax.random.key(0), tokens())["params"]
  # Norm scales start at 0: draw every leaf so that each one matters.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
    tree,
    [
      jax.random.normal(k, x.shape, jnp.float32) * (0.3 if x.ndim > 1 else 0.5)
      for k, x in zip(keys, leaves)
    ],
  )
  # The releases' flat layout, by the library's own converter.
  flat = _checkpoint._nested_to_flat(params)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(tmp_path / "official", args=ocp.args.PyTreeSave(flat))
  ours = kaggle.load(tmp_path / "official", cfg)
  assert_close(our_logits(ours, cfg), library_logits(model, params, cfg))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_our_export_runs_in_the_library_with_our_logits(gm, tmp_path, name):
  cfg = CONFIGS[name]
  params = random_params(cfg, seed=2, scale=0.3)
  kaggle.save(tmp_path / "official", params, cfg)
  loaded = gm.ckpts.load_params(tmp_path / "official")
  model = library_model(gm, cfg)
  assert_close(library_logits(model, loaded, cfg), our_logits(params, cfg))
