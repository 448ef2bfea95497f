"""Suite-wide setup: 8 fake CPU devices, so multi-device code paths run here.

Set before jax is imported anywhere. JAX_PLATFORMS=cpu keeps an installed
libtpu (the `tpu` extra, used only for ahead-of-time compiles) from probing
for TPU hardware.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# Tests compile many small programs and run each briefly: skipping LLVM's
# optimisations makes CPU compiles ~2-3x faster.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import pathlib  # noqa: E402  (after the environment is set)

import pytest  # noqa: E402

PARITY_FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
  """The tiny trainer runs' tokenizer (gemma_jax.train.testing texts)."""
  from gemma_jax.tokenizer import train_tokenizer
  from gemma_jax.train.testing import texts
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  train_tokenizer(texts(0, 300, "prose") + texts(1, 300, "code"),
                  vocab_size=400, out_path=str(path))
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


@pytest.fixture
def hf_dir(tmp_path):
  """Writes a Hugging Face directory from a committed parity fixture."""
  from gemma_jax.checkpoint.testing import write_hf_dir

  def make(name="gemma2_gqa_window", config_edit=None, sub="hf"):
    data, state = write_hf_dir(PARITY_FIXTURES / f"{name}.npz", tmp_path / sub,
                               config_edit)
    return tmp_path / sub, data, state
  return make
