"""ModelConfig: presets match the published sizes; bad values fail at load."""

import dataclasses

import pytest

from gemma_jax.checkpoint import hf_config, layout
from gemma_jax.errors import ConfigError
from gemma_jax.model.config import PRESETS, SHAPE_FIELDS, SIZE_FIELDS, preset
from gemma_jax.train.config import load_config

# The published counts with the 256128-row embedding (docs/checkpoints.md).
PUBLISHED = {
  "gemma-2b": (2_506_434_560, 524_550_144),
  "gemma-7b": (8_538_074_112, 786_825_216),
  "gemma2-2b": (2_614_636_800, 590_118_912),
  "gemma2-9b": (9_242_164_736, 917_962_752),
  "gemma2-27b": (27_227_718_144, 1_180_237_824),
}

# Gemma 3 text models: the official configs' shapes (the `gemma` package
# 3.3.0, Gemma3_1B ... Gemma3_27B) with the embedding rows of the HF
# releases (262,144 for the 1B; 262,208 in the 4B/12B/27B text config).
# The 1B's total is gemma-3-1b's published 999,885,952.
PUBLISHED |= {
  "gemma3-1b": (999_885_952, 301_989_888),
  "gemma3-4b": (3_880_263_168, 671_252_480),
  "gemma3-12b": (11_766_034_176, 1_006_878_720),
  "gemma3-27b": (27_009_346_304, 1_409_630_208),
}
# Gemma 3 report (arXiv 2503.19786) Table 1, non-embedding parameters in
# millions.
GEMMA3_NON_EMBEDDING_M = {
  "gemma3-1b": 698,
  "gemma3-4b": 3_209,
  "gemma3-12b": 10_759,
  "gemma3-27b": 25_600,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_equals_published(name):
  cfg = PRESETS[name]
  total, embedding = PUBLISHED[name]
  assert cfg.param_count() == total
  assert cfg.num_embed_rows * cfg.d_model == embedding


@pytest.mark.parametrize("name", sorted(GEMMA3_NON_EMBEDDING_M))
def test_gemma3_non_embedding_count_equals_the_report(name):
  cfg = PRESETS[name]
  non_embedding = cfg.param_count() - cfg.num_embed_rows * cfg.d_model
  assert round(non_embedding / 1e6) == GEMMA3_NON_EMBEDDING_M[name]


def test_gemma3_layers_five_local_to_one_global():
  cfg = preset("gemma3-4b")
  windows = cfg.layer_windows
  assert len(windows) == 34
  # transformers' Gemma3TextConfig: layer i is global iff (i + 1) % 6 == 0.
  assert windows == tuple(0 if (i + 1) % 6 == 0 else 1024 for i in range(34))
  assert cfg.layer_ropes == tuple(
    (1e6, 8.0) if w == 0 else (1e4, 1.0) for w in windows
  )
  assert set(preset("gemma3-1b").layer_windows) == {0, 512}
  assert set(preset("gemma3-1b").layer_ropes) == {(1e6, 1.0), (1e4, 1.0)}
  assert preset("gemma3-27b").query_scale == 168**-0.5
  for name in ("gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b"):
    cfg = preset(name)
    assert cfg.qk_norm and cfg.sandwich_norms
    assert cfg.attn_logit_softcap is None and cfg.final_logit_softcap is None


def test_one_rope_for_every_layer_unless_set_per_type():
  assert set(preset("gemma2-2b").layer_ropes) == {(10_000.0, 1.0)}
  with pytest.raises(ConfigError, match="rope_scale_factor must be positive"):
    preset("gemma2-2b", rope_scale_factor=0.0)


def test_tiny_presets_are_small():
  for name in ("tiny-gemma", "tiny-gemma2", "tiny-gemma3"):
    assert 100_000 <= PRESETS[name].param_count() <= 5_000_000


def test_query_scale_rule():
  assert preset("gemma-7b").query_scale == 256**-0.5  # head_dim, not D/N
  assert preset("gemma2-27b").query_scale == 144**-0.5  # query_pre_attn_scalar
  assert preset("gemma2-9b").query_scale == 256**-0.5


def test_gemma2_layers_alternate_local_and_global():
  windows = preset("gemma2-2b").layer_windows
  assert len(windows) == 26
  assert windows[0::2] == (4096,) * 13 and windows[1::2] == (0,) * 13
  assert set(preset("gemma-7b").layer_windows) == {0}


@pytest.mark.parametrize(
  "override, message",
  [
    (
      "model.num_kv_heads=3",
      "num_heads (8) must be divisible by num_kv_heads (3)",
    ),
    (
      "model.remat_policy=some",
      "model.remat_policy: 'some' is not a valid choice; valid choices: "
      "'none', 'full'",
    ),
    (
      "model.num_layer=3",
      "unknown key 'model.num_layer'; valid keys under 'model'",
    ),
    ("model.d_model=1.5", "model.d_model: expected an integer"),
    (
      "model.preset=gemma3",
      "model.preset: unknown preset 'gemma3'; valid choices: gemma-2b",
    ),
    (
      "model.attention_pattern=[local]",
      "'local' layers but sliding_window is not set",
    ),
    ("model.embed_rows=10", "embed_rows (10) must be >= vocab_size"),
    ("model.norm_eps=0", "norm_eps must be positive and finite, got 0"),
    ("model.norm_eps=.nan", "model.norm_eps: must be a finite number, got nan"),
    (
      "model.attn_logit_softcap=-50",
      "attn_logit_softcap must be positive and finite, got -50",
    ),
    (
      "model.final_logit_softcap=.inf",
      "model.final_logit_softcap: must be a finite number, got inf",
    ),
    (
      "model.query_pre_attn_scalar=0",
      "query_pre_attn_scalar must be positive and finite, got 0",
    ),
    (
      "model.lora={rank: 4, alpha: .nan}",
      "model.lora.alpha: must be a finite number, got nan",
    ),
    (
      "model.lora={rank: 4, alpha: -2}",
      "alpha must be a positive number (or null: the rank), got -2",
    ),
  ],
)
def test_invalid_model_config_names_the_key(override, message):
  base = "model=gemma-2b" if "preset" not in override else "model={}"
  with pytest.raises(ConfigError, match=None) as info:
    load_config(
      None,
      [base, override]
      if "attention_pattern" not in override
      else ["model=gemma-7b", override],
    )
  assert message in str(info.value)


def test_overrides_apply_to_a_preset():
  cfg = load_config(
    None, ["model=gemma2-2b", "model.num_layers=2", "model.dtype=bfloat16"]
  ).model
  assert (cfg.num_layers, cfg.dtype, cfg.d_model) == (2, "bfloat16", 2304)


def _changed(cfg, field):
  """`cfg` with only `field` changed, still a valid config."""
  value = getattr(cfg, field)
  if field == "embed_rows":
    return dataclasses.replace(cfg, embed_rows=cfg.vocab_size + 64)
  if isinstance(value, bool):
    return dataclasses.replace(cfg, **{field: not value})
  return dataclasses.replace(cfg, **{field: 2 * value})


@pytest.mark.parametrize("field", SHAPE_FIELDS)
def test_every_shape_field_decides_a_parameter_shape(field):
  """checkpoint.layout reads every field of the one SHAPE_FIELDS tuple."""
  cfg = preset("tiny-gemma2")
  assert layout.SHAPE_FIELDS is SHAPE_FIELDS
  assert layout.param_shapes(_changed(cfg, field)) != layout.param_shapes(cfg)


@pytest.mark.parametrize("field", SIZE_FIELDS)
def test_every_size_is_mapped_to_and_from_hf_and_checked(field):
  cfg = preset("tiny-gemma2")
  other = _changed(cfg, field)
  assert hf_config.to_hf(other, "float32") != hf_config.to_hf(cfg, "float32")
  back = hf_config.from_hf(hf_config.to_hf(other, "float32"), "config.json")
  assert getattr(back, field) == getattr(other, field)
  with pytest.raises(ConfigError, match=f"{field}: given has"):
    hf_config.check_same_architecture(other, cfg, "given", "found")
  with pytest.raises(ConfigError, match=f"{field} must be positive"):
    dataclasses.replace(cfg, **{field: 0})
