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


@pytest.fixture
def hf_dir(tmp_path):
  """Writes a Hugging Face directory from a committed parity fixture."""
  from gemma_jax.checkpoint.testing import write_hf_dir

  def make(name="gemma2_gqa_window", config_edit=None, sub="hf"):
    data, state = write_hf_dir(PARITY_FIXTURES / f"{name}.npz", tmp_path / sub,
                               config_edit)
    return tmp_path / sub, data, state
  return make
