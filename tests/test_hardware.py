"""The accelerator table: peak FLOP/s, HBM and the TPU slices that exist."""

import pytest

from gemma_jax import hardware
from gemma_jax.errors import ConfigError


def test_peak_flops_by_device_kind_and_override():
  class Dev:
    device_kind = "TPU v5 lite"
  assert hardware.peak_flops_per_device(Dev()) == 197e12
  Dev.device_kind = "NVIDIA H100 80GB HBM3"
  assert hardware.peak_flops_per_device(Dev()) == 989e12
  Dev.device_kind = "TPU v5p"
  assert hardware.peak_flops_per_device(Dev()) == 459e12
  Dev.device_kind = "cpu"
  assert hardware.peak_flops_per_device(Dev()) is None
  assert hardware.peak_flops_per_device(Dev(), configured=5e9) == 5e9


@pytest.mark.parametrize("name", ["v5e:32x32", "v5e-256", "v4:4x4x6",
                                  "v6e:4x4x4", "v6e:1x1", "v7:2x2", "v5p:16x24x32"])
def test_topologies_that_are_not_real_products_are_rejected(name):
  with pytest.raises(ConfigError, match="--topology"):
    hardware.parse_topology(name)


@pytest.mark.parametrize("name,chips", [("v5e:16x16", 256), ("v6e:8x16", 128),
                                        ("v4:2x2x1", 4), ("v4:8x16x32", 4096),
                                        ("v5p:8x24x32", 6144)])
def test_real_topologies_parse(name, chips):
  _, sizes = hardware.parse_topology(name)
  assert sizes[0] * sizes[1] * (sizes[2] if len(sizes) > 2 else 1) == chips


def test_hbm_per_device_as_the_compiler_reports_it():
  assert hardware.CHIPS["v5e"].hbm_bytes == int(15.75 * 2**30)
  assert hardware.CHIPS["v4"].chip_config == "megacore"
