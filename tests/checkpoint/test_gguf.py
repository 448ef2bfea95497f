"""GGUF export: the names, metadata and vocabulary llama.cpp's Gemma loaders
read, tensors equal to GGML's own quantiser (`gguf.quants`) bit for bit, a
QAT model's Q4_0 tensors equal to its forward pass's weights, and bad input
refused before anything is written. (Running the files in llama.cpp itself:
tests/checkpoint/test_gguf_llama_cpp.py.)"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.checkpoint import hf, layout
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.data.testing import tiny_tokenizer
from gemma_jax.errors import ConfigError
from gemma_jax.model import quant
from gemma_jax.model.config import PRESETS
from gemma_jax.model.quant import QuantConfig
from gemma_jax.tokenizer import Tokenizer

gguf_lib = pytest.importorskip("gguf")
from gemma_jax.checkpoint import gguf  # noqa: E402  (needs the package)

T = gguf_lib.GGMLQuantizationType


def _small(name, **kw):
  base = dict(num_layers=2, d_model=64, mlp_dim=128, head_dim=32)
  return dataclasses.replace(
    PRESETS[name], vocab_size=512, **(base | kw), name=name
  )


GEMMA1 = _small("tiny-gemma", num_heads=2, num_kv_heads=1)
GEMMA2 = _small("tiny-gemma2", num_heads=2, num_kv_heads=1, sliding_window=8)
GEMMA3 = _small(
  "tiny-gemma3", num_layers=3, num_heads=2, num_kv_heads=1, sliding_window=8
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return Tokenizer.load(tiny_tokenizer(path))


def _read(path):
  reader = gguf_lib.GGUFReader(str(path))
  fields = {name: f.contents() for name, f in reader.fields.items() if f.types}
  return reader, fields, {t.name: t for t in reader.tensors}


def _hf_tensors(params, cfg) -> dict[str, np.ndarray]:
  flat = dict(layout.flatten(params))
  return {
    e.hf_name: np.ascontiguousarray(e.to_hf(np.asarray(flat[e.path][e.index])))
    for e in hf.tensor_map(cfg)
  }


@pytest.mark.parametrize(
  "cfg,arch", [(GEMMA1, "gemma"), (GEMMA2, "gemma2"), (GEMMA3, "gemma3")]
)
def test_f32_file_has_llama_cpp_names_metadata_and_the_weights(
  cfg, arch, tok, tmp_path
):
  params = random_params(cfg)
  gguf.save(tmp_path / "m.gguf", params, cfg, tok, "f32")
  _, kv, tensors = _read(tmp_path / "m.gguf")
  assert kv["general.architecture"] == arch
  assert kv[f"{arch}.block_count"] == cfg.num_layers
  assert kv[f"{arch}.embedding_length"] == 64
  assert kv[f"{arch}.feed_forward_length"] == 128
  assert kv[f"{arch}.attention.head_count"] == 2
  assert kv[f"{arch}.attention.head_count_kv"] == 1
  assert kv[f"{arch}.attention.key_length"] == 32
  assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
  if arch == "gemma2":
    assert kv["gemma2.attn_logit_softcapping"] == 50.0
    assert kv["gemma2.final_logit_softcapping"] == 30.0
    assert kv["gemma2.attention.sliding_window"] == 8
    assert kv["gemma2.attention.sliding_window_pattern"] == [True, False]
  if arch == "gemma3":
    assert "gemma3.attn_logit_softcapping" not in kv
    assert kv["gemma3.attention.sliding_window_pattern"] == [True] * 3
    assert kv["gemma3.rope.freq_base_swa"] == 10_000.0
  # The tensors llama.cpp's loader creates, [out, in] (ne0 = in).
  names = {"token_embd.weight", "output_norm.weight"}
  per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
  per_layer += ["ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
  if arch != "gemma":
    per_layer += ["post_attention_norm", "post_ffw_norm"]
  if arch == "gemma3":
    per_layer += ["attn_q_norm", "attn_k_norm"]
  names |= {
    f"blk.{i}.{n}.weight" for i in range(cfg.num_layers) for n in per_layer
  }
  assert set(tensors) == names
  hf_tensors = _hf_tensors(params, cfg)
  emb = tensors["token_embd.weight"]
  assert emb.tensor_type == T.F32 and list(emb.shape) == [64, 512]
  np.testing.assert_array_equal(
    emb.data, hf_tensors["model.embed_tokens.weight"]
  )
  np.testing.assert_array_equal(
    tensors["blk.1.ffn_down.weight"].data,
    hf_tensors["model.layers.1.mlp.down_proj.weight"],
  )
  # Gemma's RMSNorm multiplies by 1 + w; llama.cpp's by the stored weight.
  np.testing.assert_array_equal(
    tensors["output_norm.weight"].data,
    hf_tensors["model.norm.weight"] + np.float32(1),
  )


def test_the_vocabulary_is_sentencepieces_padded_as_llama_cpp_pads(
  tok, tmp_path
):
  cfg = dataclasses.replace(GEMMA2, vocab_size=640)
  gguf.save(tmp_path / "m.gguf", random_params(cfg), cfg, tok, "f32")
  _, kv, tensors = _read(tmp_path / "m.gguf")
  tokens = kv["tokenizer.ggml.tokens"]
  assert len(tokens) == 640 == tensors["token_embd.weight"].shape[1]
  assert tokens[:512] == [tok.id_to_piece(i) for i in range(512)]
  assert tokens[512:] == [f"[PAD{i}]" for i in range(512, 640)]
  types = kv["tokenizer.ggml.token_type"]
  assert types[:4] == [3, 3, 3, 2]  # pad eos bos control, unk unknown
  assert set(types[512:]) == {5}  # unused
  assert kv["tokenizer.ggml.model"] == "llama"
  assert (
    kv["tokenizer.ggml.bos_token_id"],
    kv["tokenizer.ggml.eos_token_id"],
    kv["tokenizer.ggml.unknown_token_id"],
    kv["tokenizer.ggml.padding_token_id"],
  ) == (2, 1, 3, 0)
  assert kv["tokenizer.ggml.add_bos_token"] is True
  assert kv["tokenizer.ggml.add_eos_token"] is False
  assert len(kv["tokenizer.ggml.scores"]) == 640


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0"])
def test_tensors_equal_ggmls_own_quantiser_bit_for_bit(kind, tok, tmp_path):
  cfg = GEMMA2
  params = random_params(cfg, scale=0.05)
  gguf.save(tmp_path / "m.gguf", params, cfg, tok, kind)
  _, _, tensors = _read(tmp_path / "m.gguf")
  qtype = getattr(T, kind.upper())
  hf_tensors = _hf_tensors(params, cfg)
  for t in gguf.plan(cfg, kind):
    name = t.entry.hf_name
    got, w = tensors[t.name], hf_tensors[name]
    if w.ndim == 1:
      assert got.tensor_type == T.F32
      continue
    assert got.tensor_type == qtype, name
    want = gguf_lib.quants.quantize(w, qtype)
    np.testing.assert_array_equal(
      np.asarray(got.data).view(np.uint8).reshape(-1),
      np.asarray(want).view(np.uint8).reshape(-1),
      err_msg=name,
    )


def test_a_qat_models_q4_0_tensors_are_its_forward_weights(tok, tmp_path):
  # QAT with targets attn + mlp: those are Q4_0 and dequantize to exactly
  # the fake-quantized weights the forward pass used; the embedding, not
  # quantized in training, stays F32.
  qat = QuantConfig(scheme="q4_0", targets=("attn", "mlp"))
  cfg = dataclasses.replace(GEMMA3, quant=qat)
  params = random_params(cfg, scale=0.05)
  gguf.save(tmp_path / "m.gguf", params, cfg, tok)  # type: q4_0 is the default
  _, kv, tensors = _read(tmp_path / "m.gguf")
  assert kv["general.file_type"] == int(gguf_lib.LlamaFileType.MOSTLY_Q4_0)
  assert tensors["token_embd.weight"].tensor_type == T.F32
  forward = dict(params)
  # Under jit: one compile per weight shape, not one per eager op.
  fake_quant = jax.jit(quant.fake_quant, static_argnums=(1, 2, 3, 4))
  for path, (in_axis, _) in quant.quantized_leaves(cfg).items():
    w = jnp.asarray(quant.get_path(params, path))
    forward = quant.with_paths(
      forward, {path: np.asarray(fake_quant(w, in_axis, 4, 32, "q4_0"))}
    )
  want = _hf_tensors(forward, cfg)
  for planned in gguf.plan(cfg, "q4_0"):
    e = planned.entry
    if len(e.hf_shape) == 1 or "embed" in e.hf_name:
      continue
    t = tensors[planned.name]
    assert t.tensor_type == T.Q4_0
    got = gguf_lib.quants.dequantize(np.asarray(t.data), T.Q4_0)
    np.testing.assert_array_equal(got, want[e.hf_name], err_msg=e.hf_name)


@pytest.mark.parametrize(
  "cfg,kind,message",
  [
    (
      dataclasses.replace(GEMMA2, attn_logit_softcap=None),
      "f32",
      "model.attn_logit_softcap is null; llama.cpp's gemma2 always",
    ),
    (
      dataclasses.replace(GEMMA2, query_pre_attn_scalar=40.0),
      "f32",
      "model.query_pre_attn_scalar gives query scale 0.158114",
    ),
    (
      dataclasses.replace(GEMMA1, final_logit_softcap=30.0),
      "f32",
      "model.final_logit_softcap is set; llama.cpp's gemma applies no",
    ),
    (
      dataclasses.replace(
        GEMMA3, rope_scale_factor=8.0, local_rope_scale_factor=2.0
      ),
      "f32",
      "model.local_rope_scale_factor is 2.0; llama.cpp's gemma3 scales",
    ),
    (
      dataclasses.replace(GEMMA2, mlp_dim=48),
      "q4_0",
      "blocks of 32 do not divide the contraction axis of "
      "blk.0.ffn_down.weight (size 48",
    ),
    (
      dataclasses.replace(GEMMA2, quant=QuantConfig(bits=4, block_size=16)),
      "q4_0",
      "the model trained with quant scheme symmetric (bits 4)",
    ),
    (dataclasses.replace(GEMMA2, vocab_size=256), "f32", "has 512 pieces"),
  ],
)
def test_what_llama_cpp_would_run_differently_is_refused_before_writing(
  cfg, kind, message, tok, tmp_path
):
  with pytest.raises(ConfigError, match=re.escape(message)) as e:
    gguf.save(tmp_path / "m.gguf", random_params(cfg), cfg, tok, kind)
  assert "\n" not in str(e.value)
  assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_kept_without_force(tok, tmp_path):
  path = tmp_path / "m.gguf"
  path.write_bytes(b"keep")
  with pytest.raises(ConfigError, match="already exists; pass --force"):
    gguf.save(path, random_params(GEMMA1), GEMMA1, tok)
  assert path.read_bytes() == b"keep"
  # A failure while writing leaves the old file and no temporary behind.
  params = random_params(GEMMA1)
  params["final_norm"]["scale"] = np.full(64, np.nan, np.float32)
  with pytest.raises(Exception, match="final_norm"):
    gguf.save(path, params, GEMMA1, tok, force=True)
  assert path.read_bytes() == b"keep"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
