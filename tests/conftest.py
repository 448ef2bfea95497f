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
