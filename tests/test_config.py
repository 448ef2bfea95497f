"""The run config: YAML + dotted overrides -> typed, validated, frozen data."""

import dataclasses
import os

import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.train.config import config_from_dict, load_config, to_dict


def write(tmp_path, text):
  path = tmp_path / "run.yaml"
  path.write_text(text)
  return path


def test_loads_sections_from_yaml_and_applies_overrides(tmp_path):
  path = write(
    tmp_path,
    """
model: {preset: tiny-gemma2, num_layers: 2}
optimizer: {learning_rate: 0.001, schedule: wsd}
train: {steps: 20, batch_size: 4}
mesh: {ici_data: 2, ici_tensor: -1}
""",
  )
  cfg = load_config(
    path, ["train.steps=30", "optimizer.b2=0.99", "model.dtype=bfloat16"]
  )
  assert cfg.model.num_layers == 2 and cfg.model.dtype == "bfloat16"
  assert cfg.model.d_model == 128  # from the preset
  assert cfg.optimizer.learning_rate == 0.001 and cfg.optimizer.b2 == 0.99
  assert cfg.train.steps == 30 and cfg.train.batch_size == 4
  assert (cfg.mesh.ici_data, cfg.mesh.ici_tensor) == (2, -1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.train.steps = 1


def test_round_trips_through_plain_data(tmp_path):
  cfg = load_config(None, ["model=gemma2-27b", "train.steps=7"])
  again = config_from_dict(to_dict(cfg))
  assert again == cfg
  assert isinstance(to_dict(cfg)["model"]["attention_pattern"], list)


def test_an_integer_is_accepted_where_a_float_is_expected():
  cfg = load_config(None, ["model=tiny-gemma", "optimizer.learning_rate=1"])
  assert cfg.optimizer.learning_rate == 1.0
  assert isinstance(cfg.optimizer.learning_rate, float)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["train.steps=20"], "missing required key 'model'"),
    (
      ["model=tiny-gemma", "trian.steps=3"],
      "unknown key 'trian'; valid keys under '<top>': checkpoint, "
      "continual, data",
    ),
    (
      ["model=tiny-gemma", "train.steps=many"],
      "train.steps: expected an integer, got 'many'",
    ),
    (
      ["model=tiny-gemma", "train.steps=true"],
      "train.steps: expected an integer, got True",
    ),
    (
      ["model=tiny-gemma", "optimizer.schedule=cosin"],
      "optimizer.schedule: 'cosin' is not a valid choice; valid choices: "
      "'cosine', 'wsd'",
    ),
    (
      ["model=tiny-gemma", "train.batch_size=6", "train.microbatches=4"],
      "train.batch_size (6) must be divisible by train.microbatches (4)",
    ),
    (
      ["model=tiny-gemma", "mesh.ici_data=-1", "mesh.ici_fsdp=-1"],
      "at most one ici_* size may be -1",
    ),
    (
      ["model=tiny-gemma", "train=3"],
      "train: expected a mapping for TrainConfig, got 3",
    ),
    (["model=tiny-gemma", "train.steps"], "is not of the form key.path=value"),
  ],
)
def test_bad_values_fail_at_load_naming_the_key(overrides, message):
  with pytest.raises(ConfigError) as info:
    load_config(None, overrides)
  assert message in str(info.value)


def test_missing_or_malformed_file_is_named(tmp_path):
  with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
    load_config(tmp_path / "nope.yaml")
  with pytest.raises(ConfigError, match="is not valid YAML"):
    load_config(write(tmp_path, "model: [unclosed"))
  with pytest.raises(ConfigError, match="top level must be a mapping"):
    load_config(write(tmp_path, "- a\n- b\n"))


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
  from gemma_jax import cli

  path = write(tmp_path, "model: {preset: tiny-gemma, num_kv_heads: 3}\n")
  rc = cli.main(["compile", str(path), "--topology", "v5e:2x2"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "num_heads (4) must be divisible by num_kv_heads (3)" in err
  assert "Traceback" not in err


def test_the_q4_0_qat_recipe_distils_the_float_model_it_starts_from():
  # configs/qat/tiny-q4_0.yaml: Gemma 3's QAT recipe (docs/quantization.md)
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "qat")
  cfg = load_config(os.path.join(path, "tiny-q4_0.yaml"))
  assert cfg.model.quant is not None
  assert cfg.model.quant.scheme == "q4_0"
  assert cfg.model.quant.targets == ("attn", "mlp")  # the embedding: float
  assert cfg.distill.teacher == cfg.checkpoint.init_from
  assert cfg.distill.alpha == 1.0 and cfg.distill.teacher_dtype == "float32"
