"""Official Flax (Kaggle) checkpoints of Gemma 3 <-> native params, and the
export of every family to that layout.

Key names and layouts are those of the official `gemma` package 3.3.0
(gm/nn/_modules.py, gm/ckpts/_checkpoint.py): QK-norm as attn/_query_norm and
attn/_key_norm, gating [2, F, D], and in the multimodal releases a vision
encoder beside the text model, which is not read.
"""

import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemma_jax.checkpoint import kaggle
from gemma_jax.checkpoint.testing import official_checkpoint, random_params
from gemma_jax.errors import CheckpointError
from gemma_jax.model import preset

GEMMA3 = preset(
  "tiny-gemma3",
  num_layers=7,
  d_model=32,
  mlp_dim=48,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  vocab_size=128,
  sliding_window=4,
)


def test_gemma3_official_layout_loads_each_tensor_in_place(tmp_path):
  flat = official_checkpoint(tmp_path / "text", GEMMA3, transposed_gating=True)
  # As a multimodal release: vision encoder tensors beside the text model.
  with_vision = dict(flat)
  with_vision["SigLiPFromPatches_0/siglip_encoder/embedding"] = {
    "kernel": np.ones((2, 2, 3, 4), np.float32)
  }
  with_vision["transformer/embedder/mm_input_projection"] = {
    "w": np.ones((4, 32), np.float32)
  }
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(tmp_path / "mm", args=ocp.args.PyTreeSave(with_vision))
  for name in ("text", "mm"):
    params = kaggle.load(tmp_path / name, GEMMA3)
    attn, mlp = params["layers"]["attn"], params["layers"]["mlp"]
    for i in range(GEMMA3.num_layers):
      p = f"transformer/layer_{i}/"
      np.testing.assert_array_equal(
        attn["query_norm"]["scale"][i], flat[p + "attn/_query_norm"]["scale"]
      )
      np.testing.assert_array_equal(
        attn["key_norm"]["scale"][i], flat[p + "attn/_key_norm"]["scale"]
      )
      np.testing.assert_array_equal(
        mlp["gating_einsum"]["w"][i],
        flat[p + "mlp/gating_einsum"]["w"].transpose(0, 2, 1),
      )
      np.testing.assert_array_equal(
        params["layers"]["post_ffw_norm"]["scale"][i],
        flat[p + "post_ffw_norm"]["scale"],
      )
    np.testing.assert_array_equal(
      params["embedder"]["embedding"],
      flat["transformer/embedder"]["input_embedding"],
    )


def test_official_gemma3_table_fills_the_hf_sized_one():
  # The official 4B holds 262,144 rows; the preset (HF's text config) has
  # 262,208: the stored rows are expected, the rest stay zero.
  cfg = preset("gemma3-4b")
  found = {kaggle.EMBEDDING: (262_144, cfg.d_model)}
  assert kaggle._embed_rows(cfg, found) == 262_144
  assert kaggle._embed_rows(cfg, {}) == 262_208
  gemma2 = preset("gemma2-2b")
  assert kaggle._embed_rows(gemma2, {kaggle.EMBEDDING: (256_000, 1)}) == 256_128


@pytest.mark.parametrize(
  "cfg",
  [
    GEMMA3,
    # Gemma 1 7B style: kv heads == heads, written as one qkv_einsum.
    preset("tiny-gemma", d_model=32, mlp_dim=48, num_heads=2, num_kv_heads=2),
    preset("tiny-gemma2", d_model=32, mlp_dim=48, embed_rows=2112),
  ],
  ids=["gemma3", "gemma1-mha", "gemma2"],
)
def test_export_loads_back_exactly(tmp_path, cfg):
  params = random_params(cfg, seed=3)
  kaggle.save(tmp_path / "official", params, cfg)
  flat = kaggle.official_flat(params, cfg)
  fused = cfg.num_heads == cfg.num_kv_heads
  assert ("transformer/layer_0/attn/qkv_einsum" in flat) == fused
  # Gemma 3's official gating is [2, F, D].
  gating = flat["transformer/layer_0/mlp/gating_einsum"]["w"]
  assert gating.shape[1] == (cfg.mlp_dim if cfg.qk_norm else cfg.d_model)
  again = kaggle.load(tmp_path / "official", cfg)
  for (p, a), (q, b) in zip(
    sorted(_flat(params)), sorted(_flat(again)), strict=True
  ):
    assert p == q
    np.testing.assert_array_equal(a, b, err_msg=p)
  with pytest.raises(Exception, match="already exists"):
    kaggle.save(tmp_path / "official", params, cfg)


def _flat(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", np.asarray(v)


def test_cli_converts_hf_gemma3_to_the_official_layout(hf_dir, tmp_path):
  from gemma_jax import cli
  from gemma_jax.checkpoint import hf

  src, _, _ = hf_dir("gemma3_mqa_wide_heads")
  dst = tmp_path / "official"
  args = ["convert", "--from", "hf", "--to", "kaggle", str(src), str(dst)]
  assert cli.main(args) == 0
  params, cfg = hf.load(src)
  again = kaggle.load(dst, cfg)
  for (p, a), (q, b) in zip(
    sorted(_flat(params)), sorted(_flat(again)), strict=True
  ):
    assert p == q
    np.testing.assert_array_equal(a, b, err_msg=p)


def test_export_of_a_nan_tensor_writes_nothing(tmp_path):
  params = random_params(GEMMA3, seed=3)
  table = np.array(params["embedder"]["embedding"])
  table[1, 2] = np.nan
  params["embedder"]["embedding"] = table
  with pytest.raises(CheckpointError, match="holds NaN or inf; nothing was"):
    kaggle.save(tmp_path / "official", params, GEMMA3)
  assert list(tmp_path.iterdir()) == []
