"""Gemma 3 Hugging Face layouts <-> native params (gemma_jax.checkpoint.hf).

Gemma3ForCausalLM both ways; Gemma3ForConditionalGeneration (the released
4B/12B/27B) by its language model. The parity fixtures are Gemma3ForCausalLM
models; a multimodal directory is built from one by renaming its tensors the
way transformers saves them and adding vision tensors, which are not read.
"""

import functools
import importlib.util
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gemma_jax.checkpoint import hf, hf_config
from gemma_jax.errors import ConfigError
from gemma_jax.model import Transformer, preset

CASES = ["gemma3_gqa_window_rope_scaling", "gemma3_mqa_wide_heads"]
needs_transformers = pytest.mark.skipif(
  importlib.util.find_spec("transformers") is None,
  reason="needs the optional `hf` extra (torch, transformers)",
)


@functools.cache
def _jitted_apply(cfg):
  """One compile per model, not one per eager op (and per call)."""
  return jax.jit(Transformer(cfg).apply)


def logits(params, cfg, data):
  with jax.default_matmul_precision("highest"):
    return np.asarray(
      _jitted_apply(cfg)(
        {"params": params}, data["tokens"], segment_ids=data["mask"]
      )
    )


def assert_same_logits(got, data, atol=1e-4):
  real = data["mask"].astype(bool)
  np.testing.assert_allclose(got[real], data["logits"][real], atol=atol)


def read_hf_dir(directory):
  out = {}
  for f in sorted(directory.glob("*.safetensors")):
    out.update(load_file(str(f)))
  return out


@pytest.mark.parametrize("name", CASES)
def test_export_gives_back_the_hf_tensors_exactly(hf_dir, tmp_path, name):
  src, _, state = hf_dir(name)
  params, cfg = hf.load(src)
  assert cfg.qk_norm and len(set(cfg.layer_ropes)) == 2
  hf.save(tmp_path / "out", params, cfg)
  exported = read_hf_dir(tmp_path / "out")
  assert sorted(exported) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["architectures"] == ["Gemma3ForCausalLM"]
  assert hf_config.from_hf(config) == cfg


def _as_multimodal(src, prefix, tmp_path):
  """The Gemma3ForCausalLM directory `src` rewritten as a
  Gemma3ForConditionalGeneration one: language-model tensors under
  `prefix`, a vision tower and projector beside them, `text_config`."""
  text = json.loads((src / "config.json").read_text())
  config = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": text,
    "vision_config": {"model_type": "siglip_vision_model"},
    "image_token_index": 262_144,
  }
  state = load_file(str(src / "model.safetensors"))
  state = {prefix + k.removeprefix("model."): v for k, v in state.items()}
  vision = (
    "model.vision_tower." if prefix.startswith("model.") else "vision_tower."
  )
  state[vision + "vision_model.embeddings.patch_embedding.weight"] = np.ones(
    (4, 3, 2, 2), np.float32
  )
  state["multi_modal_projector.mm_input_projection_weight"] = np.ones(
    (4, 32), np.float32
  )
  out = tmp_path / "multimodal"
  out.mkdir()
  (out / "config.json").write_text(json.dumps(config))
  save_file(state, str(out / "model.safetensors"))
  return out


@pytest.mark.parametrize("prefix", hf.MULTIMODAL_PREFIXES)
def test_multimodal_checkpoint_imports_its_language_model(
  hf_dir, tmp_path, prefix
):
  src, data, _ = hf_dir("gemma3_gqa_window_rope_scaling")
  _, text_cfg = hf.load(src)
  params, cfg = hf.load(_as_multimodal(src, prefix, tmp_path))
  assert cfg == text_cfg
  assert_same_logits(logits(params, cfg, data), data)


def test_released_multimodal_configs_give_the_presets():
  # gemma-3-4b-it's config.json names only these text fields; the rest are
  # Gemma3TextConfig's defaults.
  released = {
    "model_type": "gemma3",
    "text_config": {
      "hidden_size": 2560,
      "intermediate_size": 10240,
      "model_type": "gemma3_text",
      "num_hidden_layers": 34,
      "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
      "sliding_window": 1024,
    },
    "vision_config": {"model_type": "siglip_vision_model"},
  }
  cfg = hf_config.from_hf(released)
  hf_config.check_same_architecture(
    preset("gemma3-4b"), cfg, "gemma3-4b", "config.json"
  )
  # gemma-3-27b's text_config, and gemma-3-1b's config.json (transformers
  # 4.50 fields: rope_theta, rope_local_base_freq, sliding_window_pattern).
  released["text_config"] = {
    "head_dim": 128,
    "hidden_size": 5376,
    "intermediate_size": 21504,
    "model_type": "gemma3_text",
    "num_attention_heads": 32,
    "num_hidden_layers": 62,
    "num_key_value_heads": 16,
    "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
  }
  hf_config.check_same_architecture(
    preset("gemma3-27b"), hf_config.from_hf(released), "27b", "config.json"
  )
  legacy_1b = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "rope_theta": 1000000,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "max_position_embeddings": 32768,
  }
  hf_config.check_same_architecture(
    preset("gemma3-1b"), hf_config.from_hf(legacy_1b), "1b", "config.json"
  )
  # The 1B (Gemma3ForCausalLM), as transformers >= 5 writes it.
  one_b = hf_config.to_hf(preset("gemma3-1b"), "bfloat16")
  assert one_b["architectures"] == ["Gemma3ForCausalLM"]
  assert one_b["rope_scaling"] is None
  hf_config.check_same_architecture(
    preset("gemma3-1b"), hf_config.from_hf(one_b), "gemma3-1b", "config.json"
  )
  for name in ("gemma3-4b", "gemma3-12b", "gemma3-27b"):
    again = hf_config.from_hf(hf_config.to_hf(preset(name), "bfloat16"))
    hf_config.check_same_architecture(preset(name), again, name, "export")


def test_exports_that_hf_cannot_express_are_refused():
  cfg = preset("tiny-gemma3", local_rope_scale_factor=2.0)
  with pytest.raises(ConfigError, match="local_rope_scale_factor=2.0"):
    hf_config.to_hf(cfg, "float32")
  two_ropes = preset(
    "tiny-gemma2", rope_max_wavelength=1e6, local_rope_max_wavelength=1e4
  )
  with pytest.raises(ConfigError, match="RoPE per layer"):
    hf_config.to_hf(two_ropes, "float32")


@pytest.mark.slow
@needs_transformers
@pytest.mark.parametrize("name", CASES)
def test_exported_directory_runs_in_transformers_as_gemma3(
  hf_dir, tmp_path, name
):
  import torch
  import transformers

  src, data, _ = hf_dir(name)
  params, cfg = hf.load(src)
  hf.save(tmp_path / "out", params, cfg)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / "out", attn_implementation="eager", dtype=torch.float32
  )
  assert type(model).__name__ == "Gemma3ForCausalLM"
  with torch.no_grad():
    got = model(
      input_ids=torch.tensor(data["tokens"], dtype=torch.long),
      attention_mask=torch.tensor(data["mask"]),
    ).logits.numpy()
  assert_same_logits(got, data, atol=1e-5)
  assert_same_logits(logits(params, cfg, data), data)


@pytest.mark.slow
@needs_transformers
def test_transformers_multimodal_save_imports_with_equal_logits(tmp_path):
  # A tiny Gemma3ForConditionalGeneration saved by transformers itself.
  import torch
  import transformers

  torch.manual_seed(0)
  text = transformers.Gemma3TextConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=7,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=8,
    sliding_window=4,
    max_position_embeddings=64,
    rope_parameters={
      "full_attention": {
        "rope_type": "linear",
        "factor": 8.0,
        "rope_theta": 1e6,
      },
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    },
  )
  vision = transformers.SiglipVisionConfig(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
  )
  config = transformers.Gemma3Config(
    text_config=text,
    vision_config=vision,
    mm_tokens_per_image=4,
    boi_token_index=120,
    eoi_token_index=121,
    image_token_index=122,
  )
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.5 if "norm" in name else 0.3)
  model.save_pretrained(tmp_path / "mm")
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 100, size=(2, 16))
  mask = np.ones_like(tokens)
  mask[1, 11:] = 0
  model.config._attn_implementation = "eager"
  model.model.language_model.config._attn_implementation = "eager"
  with torch.no_grad():
    want = (
      model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
      .logits.float()
      .numpy()
    )
  params, cfg = hf.load(tmp_path / "mm")
  assert cfg.qk_norm and cfg.layer_windows == (4,) * 5 + (0, 4)
  data = {"tokens": tokens, "mask": mask, "logits": want}
  assert_same_logits(logits(params, cfg, data), data)
