"""The run config: small typed sub-configs composed into one, from YAML.

    config = load_config("configs/tiny.yaml", ["train.steps=10"])

The model section may name a preset and override any of its fields:

    model: {preset: gemma2-2b, remat_policy: full}
"""

import dataclasses

from gemma_jax import configlib
from gemma_jax.errors import ConfigError
from gemma_jax.data.config import DataConfig
from gemma_jax.model.config import PRESETS, ModelConfig
from gemma_jax.sharding.config import MeshConfig
from gemma_jax.train.config import (CheckpointConfig, OptimizerConfig,
                                    TrainConfig)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()


def model_config_from_dict(data: dict, path: str = "model") -> ModelConfig:
  """A model section: all fields, or `preset:` plus fields to override."""
  data = dict(data)
  name = data.pop("preset", None)
  if name is not None:
    if name not in PRESETS:
      raise ConfigError(f"{path}.preset: unknown preset {name!r}; valid "
                        f"choices: {', '.join(PRESETS)}")
    data = {**configlib.to_dict(PRESETS[name]), **data}
  return configlib.from_dict(ModelConfig, data, path)


def config_from_dict(data: dict) -> RunConfig:
  data = dict(data)
  if "model" not in data:
    raise ConfigError("missing required key 'model' (a preset name or fields)")
  model = data.pop("model")
  if isinstance(model, str):
    model = {"preset": model}
  if not isinstance(model, dict):
    raise ConfigError(f"model: expected a preset name or a mapping, "
                      f"got {model!r}")
  return configlib.from_dict(RunConfig,
                             data | {"model": model_config_from_dict(model)})


def load_config(path=None, overrides=()) -> RunConfig:
  """Loads a YAML run config and applies `key.path=value` overrides."""
  data = configlib.load_yaml(path) if path else {}
  for override in overrides:
    # `model: gemma2-2b` is short for `model: {preset: gemma2-2b}`; expand it
    # so that `model.num_layers=2` can override a field of the preset.
    if isinstance(data.get("model"), str):
      data["model"] = {"preset": data["model"]}
    data = configlib.apply_overrides(data, [override])
  return config_from_dict(data)


def to_dict(config: RunConfig) -> dict:
  return configlib.to_dict(config)
