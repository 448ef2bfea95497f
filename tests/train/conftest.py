"""Fixtures for the trainer tests; helpers live in gemma_jax.train.testing.
(`tiny_tokenizer` and `compile_cache` are suite-wide: tests/conftest.py.)"""

import pytest
import yaml

import gemma_jax.features  # noqa: F401  (registers them with the core)
from gemma_jax.train.testing import (
  RUN_TIMEOUT_S,
  subprocess_env,
  tiny_config_dict,
  train_process,
  write_config,
)


@pytest.fixture
def tiny_config_path(tiny_tokenizer, tmp_path):
  path = tmp_path / "tiny.yaml"
  path.write_text(
    yaml.safe_dump(tiny_config_dict(tiny_tokenizer), sort_keys=False)
  )
  return str(path)


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_tokenizer, compile_cache, tmp_path_factory):
  """The reference: one process, 2 CPU devices, no interruption. Started
  in the background; the fixture value waits for it."""
  root = tmp_path_factory.mktemp("reference")
  config = write_config(root / "run.yaml", tiny_tokenizer)
  proc = train_process(config, root / "run", subprocess_env(compile_cache))

  def result():
    out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, out
    return root / "run"

  return config, result
