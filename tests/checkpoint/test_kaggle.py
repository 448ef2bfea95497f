"""Official Flax (Kaggle) checkpoints -> native, checked against the
official -> HF mapping of docs/checkpoints.md, written out independently
here."""

import dataclasses

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from gemma_jax.checkpoint import hf, kaggle
from gemma_jax.checkpoint.testing import official_checkpoint
from gemma_jax.errors import CheckpointError
from gemma_jax.model.testing import TINY_GEMMA1_MHA, TINY_GEMMA2_PADDED

# Gemma 2 style: GQA, sandwich norms; vocab 128 padded to 160 rows.
GEMMA2 = TINY_GEMMA2_PADDED
# Gemma 1 7B style: kv heads == heads -> fused qkv_einsum.
GEMMA1_MHA = TINY_GEMMA1_MHA


def official_to_hf(flat, cfg, transposed_gating):
  """The official -> HF mapping of docs/checkpoints.md, written
  independently."""
  N, H, D = cfg.num_heads, cfg.head_dim, cfg.d_model
  out = {
    "model.embed_tokens.weight": flat["transformer/embedder"][
      "input_embedding"
    ][: cfg.vocab_size],
    "model.norm.weight": flat["transformer/final_norm"]["scale"],
  }
  proj = lambda w: w.transpose(0, 2, 1).reshape(-1, D)
  for i in range(cfg.num_layers):
    p, o = f"transformer/layer_{i}/", f"model.layers.{i}."
    if f"{p}attn/qkv_einsum" in flat:
      q, k, v = flat[f"{p}attn/qkv_einsum"]["w"]
    else:
      q = flat[f"{p}attn/q_einsum"]["w"]
      k, v = flat[f"{p}attn/kv_einsum"]["w"]
    out[o + "self_attn.q_proj.weight"] = proj(q)
    out[o + "self_attn.k_proj.weight"] = proj(k)
    out[o + "self_attn.v_proj.weight"] = proj(v)
    out[o + "self_attn.o_proj.weight"] = (
      flat[f"{p}attn/attn_vec_einsum"]["w"].reshape(N * H, D).T
    )
    g = flat[f"{p}mlp/gating_einsum"]["w"]
    gate, up = (g[0], g[1]) if transposed_gating else (g[0].T, g[1].T)
    out[o + "mlp.gate_proj.weight"], out[o + "mlp.up_proj.weight"] = gate, up
    out[o + "mlp.down_proj.weight"] = flat[f"{p}mlp/linear"]["w"].T
    out[o + "input_layernorm.weight"] = flat[f"{p}pre_attention_norm"]["scale"]
    if cfg.sandwich_norms:
      out[o + "post_attention_layernorm.weight"] = flat[
        f"{p}post_attention_norm"
      ]["scale"]
      out[o + "pre_feedforward_layernorm.weight"] = flat[f"{p}pre_ffw_norm"][
        "scale"
      ]
      out[o + "post_feedforward_layernorm.weight"] = flat[f"{p}post_ffw_norm"][
        "scale"
      ]
    else:  # Gemma 1 naming trap: the pre-MLP norm
      out[o + "post_attention_layernorm.weight"] = flat[f"{p}pre_ffw_norm"][
        "scale"
      ]
  return out


@pytest.mark.parametrize(
  "cfg, transposed", [(GEMMA2, True), (GEMMA2, False), (GEMMA1_MHA, False)]
)
def test_matches_the_reference_mapping(tmp_path, cfg, transposed):
  flat = official_checkpoint(tmp_path / "kaggle", cfg, transposed)
  params = kaggle.load(tmp_path / "kaggle", cfg)  # layout read from shapes
  hf.save(tmp_path / "hf", params, cfg)
  exported = load_file(str(tmp_path / "hf" / hf.WEIGHTS))
  expected = official_to_hf(flat, cfg, transposed)
  assert sorted(exported) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_gating_layout_when_the_shape_cannot_tell(tmp_path):
  square = dataclasses.replace(GEMMA2, mlp_dim=32)
  official_checkpoint(tmp_path / "k", square, transposed_gating=True)
  with pytest.raises(CheckpointError, match="pass --kaggle-gating"):
    kaggle.load(tmp_path / "k", square)
  params = kaggle.load(tmp_path / "k", square, transposed_gating=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    g = ckptr.restore(tmp_path / "k")["transformer/layer_1/mlp/gating_einsum"]
  np.testing.assert_array_equal(
    params["layers"]["mlp"]["gating_einsum"]["w"][1], g["w"].transpose(0, 2, 1)
  )
  # The 9B / 27B preset names imply the transposed layout.
  named = dataclasses.replace(square, name="gemma2-9b")
  np.testing.assert_array_equal(
    kaggle.load(tmp_path / "k", named)["layers"]["mlp"]["gating_einsum"]["w"],
    params["layers"]["mlp"]["gating_einsum"]["w"],
  )


def test_stated_gating_must_agree_with_the_shape(tmp_path):
  official_checkpoint(tmp_path / "k", GEMMA2, transposed_gating=False)
  with pytest.raises(
    CheckpointError,
    match=r"gating_einsum/w: shape "
    r"\(2, 32, 48\) is \[2, D, F\] but .* given as FD",
  ):
    kaggle.load(tmp_path / "k", GEMMA2, transposed_gating=True)


def test_config_that_does_not_match_names_tensors(tmp_path):
  official_checkpoint(tmp_path / "k", GEMMA2, transposed_gating=False)
  wrong = dataclasses.replace(GEMMA2, embed_rows=None, num_layers=3)
  with pytest.raises(CheckpointError) as e:
    kaggle.load(tmp_path / "k", wrong)
  assert (
    "transformer/embedder/input_embedding: expected shape (128, 32), "
    "found (160, 32)"
  ) in str(e.value)
  assert "missing tensors: transformer/layer_2/" in str(e.value)


def test_checkpoint_without_tree_metadata_is_read_whole(tmp_path, monkeypatch):
  official_checkpoint(tmp_path / "k", GEMMA1_MHA, transposed_gating=False)
  expected = kaggle.load(tmp_path / "k", GEMMA1_MHA)
  # Older writers: metadata this orbax cannot describe.
  monkeypatch.setattr(
    ocp.PyTreeCheckpointer, "metadata", lambda self, path: None
  )
  got = kaggle.load(tmp_path / "k", GEMMA1_MHA)
  for key in ("embedder", "final_norm", "layers"):
    assert_trees_equal(got[key], expected[key])


def assert_trees_equal(a, b):
  if isinstance(a, dict):
    assert sorted(a) == sorted(b)
    for k in a:
      assert_trees_equal(a[k], b[k])
  else:
    np.testing.assert_array_equal(a, b)
