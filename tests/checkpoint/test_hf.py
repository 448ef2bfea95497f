"""Hugging Face directories <-> native params (gemma_jax.checkpoint.hf)."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma_jax.checkpoint import hf, hf_config
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model import preset


def read_hf_dir(directory):
  """{name: array} of every safetensors file in an HF directory."""
  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    out.update(load_file(str(f)))
  return out


@pytest.mark.parametrize("name", ["gemma1_mqa", "gemma1_mha_wide_heads",
                                  "gemma2_gqa_window",
                                  "gemma2_27b_query_scale"])
def test_export_gives_back_the_hf_tensors_exactly(hf_dir, tmp_path, name):
  src, data, state = hf_dir(name)
  params, cfg = hf.load(src)
  hf.save(tmp_path / "out", params, cfg)
  exported = read_hf_dir(tmp_path / "out")
  assert sorted(exported) == sorted(state)
  for key, value in state.items():
    assert exported[key].dtype == value.dtype
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # The exported config describes the same model.
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert hf_config.from_hf(config) == cfg


def test_sharded_export_has_an_index(hf_dir, tmp_path):
  src, _, state = hf_dir()
  params, cfg = hf.load(src)
  hf.save(tmp_path / "out", params, cfg, max_shard_bytes=40_000)
  index = json.loads((tmp_path / "out" / hf.INDEX).read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert sorted(index["weight_map"]) == sorted(state)
  # A sharded directory loads back into the same params.
  again, cfg2 = hf.load(tmp_path / "out")
  assert cfg2 == cfg
  for (p, a), (q, b) in zip(sorted(_flat(params)), sorted(_flat(again))):
    assert p == q
    np.testing.assert_array_equal(a, b)


def _flat(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs the optional `hf` extra (torch, transformers)")
def test_exported_directory_runs_in_transformers(hf_dir, tmp_path):
  import torch
  import transformers
  src, data, _ = hf_dir("gemma2_27b_query_scale")
  params, cfg = hf.load(src)
  hf.save(tmp_path / "out", params, cfg)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(data["tokens"], dtype=torch.long),
                   attention_mask=torch.tensor(data["mask"])).logits.numpy()
  real = data["mask"].astype(bool)
  np.testing.assert_allclose(logits[real], data["logits"][real], atol=1e-5)


def test_both_config_spellings_give_the_same_model():
  new = {"model_type": "gemma2", "vocab_size": 128, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 8,
         "sliding_window": 8, "attn_logit_softcapping": 50.0,
         "final_logit_softcapping": 30.0,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
         "layer_types": ["sliding_attention", "full_attention"] * 2}
  old = {k: v for k, v in new.items()
         if k not in ("rope_parameters", "layer_types", "hidden_activation")}
  old.update(rope_theta=10000.0, hidden_act="gelu_pytorch_tanh")
  cfg = hf_config.from_hf(new)
  assert hf_config.from_hf(old) == cfg
  assert cfg.attention_pattern == ("local", "global")
  assert cfg.layer_windows == (8, 0, 8, 0)
  # Gemma 1 releases say "gelu" and mean the tanh approximation.
  gemma = dict(old, model_type="gemma", hidden_act="gelu")
  assert not hf_config.from_hf(gemma).sandwich_norms


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     "rope type 'linear'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
])
def test_unsupported_configs_are_named(edit, message):
  base = {"model_type": "gemma2", "vocab_size": 8, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 2,
          "num_attention_heads": 2}
  with pytest.raises(CheckpointError, match=message):
    hf_config.from_hf(base | edit)


def test_wrong_shape_names_the_tensor_and_both_shapes(hf_dir):
  src, _, state = hf_dir()
  state["model.layers.1.mlp.up_proj.weight"] = np.zeros((63, 32), np.float32)
  from safetensors.numpy import save_file
  save_file(state, str(src / hf.WEIGHTS))
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj"
                     r"\.weight: expected shape \(64, 32\), found \(63, 32\)"):
    hf.load(src)


def test_config_that_does_not_match_the_weights(hf_dir):
  def more_layers(config):
    config["num_hidden_layers"] = 4
    config["layer_types"] += ["full_attention"]
  src, _, _ = hf_dir(config_edit=more_layers)
  with pytest.raises(CheckpointError,
                     match=r"missing tensors: model\.layers\.3\."):
    hf.load(src)


def test_given_model_config_pads_the_embedding_and_must_agree(hf_dir):
  src, _, state = hf_dir()
  cfg = hf.load_config(src)
  padded = dataclasses.replace(cfg, embed_rows=160, name="padded")
  params, got = hf.load(src, padded)
  emb = params["embedder"]["embedding"]
  assert got == padded and emb.shape == (160, 32)
  np.testing.assert_array_equal(emb[:128], state["model.embed_tokens.weight"])
  assert not emb[128:].any()
  wrong = dataclasses.replace(cfg, sliding_window=16)
  with pytest.raises(ConfigError, match=r"layer_windows: --model x has "
                     r"\(16, 0, 16\), .*config.json has \(8, 0, 8\)"):
    hf.load(src, wrong, model_name="--model x")


def test_gemma1_export_refuses_gemma2_only_features(tmp_path):
  cfg = preset("tiny-gemma", attn_logit_softcap=50.0)
  with pytest.raises(ConfigError, match="attn_logit_softcap=50.0"):
    hf_config.to_hf(cfg, "float32")


def test_refuses_to_overwrite(hf_dir, tmp_path):
  src, _, _ = hf_dir()
  params, cfg = hf.load(src)
  (tmp_path / "out").mkdir()
  with pytest.raises(ConfigError, match="already exists"):
    hf.save(tmp_path / "out", params, cfg)
  hf.save(tmp_path / "out", params, cfg, force=True)
  assert (tmp_path / "out" / hf.WEIGHTS).exists()


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
  """An HF export of a small random model together with its tokenizer."""
  from gemma_jax.checkpoint import layout
  from gemma_jax.data import testing
  from gemma_jax.tokenizer import Tokenizer
  tmp = tmp_path_factory.mktemp("tok")
  tok = Tokenizer.load(testing.tiny_tokenizer(tmp / "tok.model"))
  cfg = preset("tiny-gemma", num_layers=1, vocab_size=tok.vocab_size)
  params = layout.unflatten({p: np.zeros(s, np.float32) for p, s in
                             layout.param_shapes(cfg).items()})
  hf.save(tmp / "out", params, cfg, tokenizer=tok)
  return tmp / "out", tok


def test_export_with_a_tokenizer_writes_gemma_tokenizer_files(with_tokenizer):
  out, tok = with_tokenizer
  assert (out / "tokenizer.model").read_bytes() == tok.serialized()
  config = json.loads((out / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "GemmaTokenizer"
  assert config["add_bos_token"] is True and config["add_eos_token"] is False
  assert json.loads((out / "special_tokens_map.json").read_text()) == {
      "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
      "unk_token": "<unk>"}
  assert [tok.id_to_piece(i) for i in range(4)] == [
      "<pad>", "<eos>", "<bos>", "<unk>"]


def test_tokenizer_larger_than_the_model_is_refused(with_tokenizer, tmp_path):
  _, tok = with_tokenizer
  cfg = preset("tiny-gemma", num_layers=1, vocab_size=256)
  with pytest.raises(ConfigError, match="has 512 pieces but model.vocab_size "
                     "is 256"):
    hf.save(tmp_path / "out", {}, cfg, tokenizer=tok)
  assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs the optional `hf` extra (transformers)")
def test_auto_tokenizer_loads_the_export_offline_and_encodes_like_ours(
    with_tokenizer, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import transformers
  out, tok = with_tokenizer
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id,
          theirs.unk_token_id) == (2, 1, 0, 3)
  for text in ["Question: What is 12 + 30?\nAnswer: 42", " A", "",
               "def f(x):\n    return x  + 1\n\n", "  two spaces",
               "é ✓ 😀"]:
    ids = tok.encode(text, add_bos=True).tolist()
    assert theirs.encode(text) == ids, text
    assert theirs.decode(ids, skip_special_tokens=True) == text
