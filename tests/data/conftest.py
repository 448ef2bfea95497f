"""Shared data fixtures: one tiny tokenizer and one tiny corpus per session."""

import pytest

from gemma_jax import configlib
from gemma_jax.data import DataConfig, testing


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
  return testing.tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model")


@pytest.fixture(scope="session")
def corpus_config(tmp_path_factory):
  """Data config dict of a tiny default corpus (tfds ArrayRecord sources)."""
  return testing.tiny_corpus(tmp_path_factory.mktemp("corpus"))


def memory_texts(prefix: str, n: int, seed: int) -> list[str]:
  return [f"{prefix} {t}" for t in testing.sample_texts(n, seed)]


@pytest.fixture
def make_config(tokenizer_path):
  """DataConfig of three memory sources a, b, c; keyword args override."""
  def make(**overrides):
    data = {
        "seq_len": 32, "tokenizer": tokenizer_path,
        "sources": {
            "a": {"kind": "memory", "texts": memory_texts("alpha", 120, 1),
                  "eval_texts": memory_texts("alpha", 15, 2)},
            "b": {"kind": "memory", "texts": memory_texts("beta", 80, 3)},
            "c": {"kind": "memory", "texts": memory_texts("gamma", 40, 4)}},
        "stages": [{"start_step": 0, "weights": {"a": 0.5, "b": 0.3, "c": 0.2}},
                   {"start_step": 20, "weights": {"a": 0.1, "b": 0.2, "c": 0.7}}],
    }
    data.update(overrides)
    return configlib.from_dict(DataConfig, data, "data")
  return make
