"""Official Flax (Kaggle) Gemma 3 checkpoints -> native params.

Key names and layouts are those of the official `gemma` package 3.3.0
(gm/nn/_modules.py, gm/ckpts/_checkpoint.py): QK-norm as attn/_query_norm and
attn/_key_norm, gating [2, F, D], and in the multimodal releases a vision
encoder beside the text model, which is not read.
"""

import numpy as np
import orbax.checkpoint as ocp

from gemma_jax.checkpoint import kaggle
from gemma_jax.checkpoint.testing import official_checkpoint
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
