"""The accelerator table: peak FLOP/s, HBM and the TPU slices that exist."""

import math

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


@pytest.mark.parametrize(
  "name",
  [
    "v5e:32x32",
    "v5e-256",
    "v4:4x4x6",
    "v6e:4x4x4",
    "v6e:1x1",
    "v7:2x2",
    "v5p:16x24x32",
  ],
)
def test_topologies_that_are_not_real_products_are_rejected(name):
  with pytest.raises(ConfigError, match="--topology"):
    hardware.parse_topology(name)


@pytest.mark.parametrize(
  "name,chips",
  [
    ("v5e:16x16", 256),
    ("v6e:8x16", 128),
    ("v4:2x2x1", 4),
    ("v4:8x16x32", 4096),
    ("v5p:8x24x32", 6144),
  ],
)
def test_real_topologies_parse(name, chips):
  _, sizes = hardware.parse_topology(name)
  assert sizes[0] * sizes[1] * (sizes[2] if len(sizes) > 2 else 1) == chips


def test_hbm_per_device_as_the_compiler_reports_it():
  assert hardware.CHIPS["v5e"].hbm_bytes == int(15.75 * 2**30)
  assert hardware.CHIPS["v4"].chip_config == "megacore"


# The Cloud TPU pages (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e,
# /types-topologies): 3D slices are written A <= B <= C, v5p jobs stop at
# 96 cubes (6144 chips), v4 at its 4096-chip pod.
@pytest.mark.parametrize(
  "name, nearest",
  [
    ("v5p:16x24x32", "v5p:8x24x32"),  # 12288 chips: two 6144-chip slices
    ("v5p:16x24x24", "v5p:16x16x24"),  # 9216 chips: above 96 cubes
    ("v5p:32x24x8", "v5p:8x24x32"),  # axes out of order
    ("v4:8x8x4", "v4:4x8x8"),
    ("v4:16x16x32", "v4:8x16x32"),  # 8192 chips: two v4 pods
    ("v4:4x4x6", "v4:4x4x8"),  # not whole cubes
    ("v5e:8x4", "v5e:4x8"),
    ("v5e:32x32", "v5e:16x16"),
    ("v6e:1x1", "v6e:2x2"),
    ("v6e:4x4x4", "v6e:8x8"),  # 64 chips in 2D
  ],
)
def test_a_refused_topology_names_the_nearest_valid_ones(name, nearest):
  with pytest.raises(ConfigError) as e:
    hardware.parse_topology(name)
  message = str(e.value)
  assert message.startswith(f"--topology {name!r}: ")
  assert f"; nearest: {nearest}" in message  # the best one first
  for shape in message.split("; nearest: ")[1].split(", "):
    hardware.parse_topology(shape)  # every one offered is valid


def test_the_largest_slices_are_the_documented_ones():
  assert hardware.CHIPS["v5p"].max_chips == 6144
  assert hardware.CHIPS["v4"].max_chips == 4096
  hardware.parse_topology("v5p:16x16x24")
  hardware.parse_topology("v5p:8x24x32")  # the Gemma 2 27B paper's slice
  hardware.parse_topology("v4:16x16x16")
  with pytest.raises(ConfigError, match=r"at most 6144 chips \(96 cubes\)"):
    hardware.parse_topology("v5p:16x16x28")
  with pytest.raises(
    ConfigError, match=r"is more than one slice \(--slices N\)"
  ):
    hardware.parse_topology("v5p:16x16x32")


def test_an_accelerator_type_names_one_shape():
  v4, v5p, v5e = (hardware.CHIPS[g] for g in ("v4", "v5p", "v5e"))
  assert hardware.named_shape(v5p, 6144) == "16x16x24"  # v5p-12288
  assert hardware.named_shape(v5p, 4) == "2x2x1"  # v5p-8
  assert hardware.named_shape(v4, 4) == "2x2x1"  # v4-8
  assert hardware.named_shape(v4, 768) == "8x8x12"  # v4-1536
  assert hardware.named_shape(v5e, 256) == "16x16"  # v5litepod-256
  assert hardware.named_shape(v5p, 96) is None  # no v5p-192 in the docs
  with pytest.raises(
    ConfigError,
    match=r"expected GENERATION:SHAPE .*\(the accelerator type v5p-12288 "
    r"is v5p:16x16x24\)",
  ):
    hardware.parse_topology("v5p-12288")
  with pytest.raises(ConfigError, match=r"v5litepod-256 is v5e:16x16"):
    hardware.parse_topology("v5e-256")


def test_every_named_shape_and_zone_is_well_formed():
  for chip in hardware.CHIPS.values():
    if not chip.is_tpu:
      continue
    counts = [math.prod(map(int, s.split("x"))) for s in chip.named_shapes]
    assert len(set(counts)) == len(counts), chip.name  # one shape per name
    for shape in chip.named_shapes:
      hardware.parse_topology(f"{chip.name}:{shape}")
    assert chip.cloud and chip.cloud.zones, chip.name
    for zone in chip.cloud.zones:
      region, _, letter = zone.rpartition("-")
      assert region.count("-") == 1 and letter.isalpha(), zone
