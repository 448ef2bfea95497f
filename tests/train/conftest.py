"""Fixtures for the trainer tests; helpers live in gemma_jax.train.testing."""

import pytest
import yaml

from gemma_jax.train.testing import (subprocess_env, texts, tiny_config_dict,
                                     train_process, write_config)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
  from gemma_jax.tokenizer import train_tokenizer
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  train_tokenizer(texts(0, 300, "prose") + texts(1, 300, "code"),
                  vocab_size=400, out_path=str(path))
  return str(path)


@pytest.fixture
def tiny_config_path(tiny_tokenizer, tmp_path):
  path = tmp_path / "tiny.yaml"
  path.write_text(yaml.safe_dump(tiny_config_dict(tiny_tokenizer), sort_keys=False))
  return str(path)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache shared by this area's runs and subprocesses:
  identical programs compile once per session."""
  import jax
  path = str(tmp_path_factory.mktemp("xla_cache"))
  old = {k: jax.config.values[k] for k in (
      "jax_compilation_cache_dir",
      "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield path
  for k, v in old.items():
    jax.config.update(k, v)


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_tokenizer, compile_cache, tmp_path_factory):
  """The reference: one process, 2 CPU devices, no interruption. Started
  in the background; the fixture value waits for it."""
  root = tmp_path_factory.mktemp("reference")
  config = write_config(root / "run.yaml", tiny_tokenizer)
  proc = train_process(config, root / "run", subprocess_env(compile_cache))

  def result():
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return root / "run"
  return config, result
