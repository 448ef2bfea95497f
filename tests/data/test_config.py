"""Data config: bad weights and stages fail at load time, naming the key."""

import pytest

from gemma_jax import configlib
from gemma_jax.errors import ConfigError
from gemma_jax.data import DataConfig

SOURCES = {"a": {"kind": "memory", "texts": ["x"]},
           "b": {"kind": "memory", "texts": ["y"]}}


def load(stages, sources=SOURCES):
  return configlib.from_dict(DataConfig, {"sources": sources,
                                          "stages": stages}, "data")


def test_valid_stages_load_and_normalise_to_shares():
  cfg = load([{"start_step": 0, "weights": {"a": 3, "b": 1}},
              {"start_step": 10, "weights": {"b": 1}}])
  assert cfg.stages[0].shares() == {"a": 0.75, "b": 0.25}
  default = load([]).resolved_stages()
  assert default[0].shares() == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize("stages, message", [
    ([{"start_step": 0, "weights": {"a": -1, "b": 1}}],
     r"data.stages\[0\].weights.a: must be a finite number >= 0"),
    ([{"start_step": 0, "weights": {"a": 0, "b": 0}}],
     r"data.stages\[0\].weights: stage at step 0 has no positive weight"),
    ([{"start_step": 0, "weights": {"a": 1, "zzz": 1}}],
     r"data.stages\[0\].weights: unknown source 'zzz'; sources: a, b"),
    ([{"start_step": 0, "weights": {"a": 1}},
      {"start_step": 20, "weights": {"b": 1}},
      {"start_step": 10, "weights": {"a": 1}}],
     r"data.stages\[2\].start_step: stages must start at increasing steps, "
     "got 10 after 20"),
    ([{"start_step": 5, "weights": {"a": 1}}],
     r"data.stages\[0\].start_step must be 0"),
])
def test_bad_stages_are_refused_with_the_key(stages, message):
  with pytest.raises(ConfigError, match=message):
    load(stages)


def test_bad_sources_are_refused_with_the_key():
  with pytest.raises(ConfigError, match=r"data.sources.m.texts: a memory"):
    load([], {"m": {"kind": "memory"}})
  with pytest.raises(ConfigError, match=r"data.sources.f.paths"):
    load([], {"f": {"kind": "files"}})
  with pytest.raises(ConfigError, match="data.seq_len must be > 1"):
    configlib.from_dict(DataConfig, {"seq_len": 1}, "data")


def test_removed_block_size_is_refused_with_the_reason():
  with pytest.raises(ConfigError, match=r"^data.block_size was removed: every "
                     r"global batch is now mixed exactly"):
    configlib.from_dict(DataConfig, {"sources": SOURCES, "block_size": 256},
                        "data")
