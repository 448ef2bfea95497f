"""Slice names for gcloud and GKE, from the Cloud TPU documentation:
accelerator types count TensorCores on v4 and v5p (2 per chip) and chips on
v5e and v6e (https://cloud.google.com/tpu/docs/v4, .../v5p, .../v5e,
.../v6e); JAX runtime versions from https://cloud.google.com/tpu/docs/runtimes;
GKE labels as xpk names them (src/xpk/core/system_characteristics.py)."""

import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.launch.slices import check_mesh, check_zone, parse_tpu
from gemma_jax.sharding.config import MeshConfig


@pytest.mark.parametrize(
  "spec, accelerator, runtime, gke, xpk",
  [
    ("v4:2x2x1", "v4-8", "tpu-ubuntu2204-base", "tpu-v4-podslice", "v4-2x2x1"),
    (
      "v4:8x16x32",
      "v4-8192",
      "tpu-ubuntu2204-base",
      "tpu-v4-podslice",
      "v4-8x16x32",
    ),
    ("v5p:2x2x4", "v5p-32", "v2-alpha-tpuv5", "tpu-v5p-slice", "v5p-2x2x4"),
    (
      "v5p:8x24x32",
      "v5p-12288",
      "v2-alpha-tpuv5",
      "tpu-v5p-slice",
      "v5p-8x24x32",
    ),
    (
      "v5e:16x16",
      "v5litepod-256",
      "v2-alpha-tpuv5-lite",
      "tpu-v5-lite-podslice",
      "v5litepod-16x16",
    ),
    (
      "v5e:2x4",
      "v5litepod-8",
      "v2-alpha-tpuv5-lite",
      "tpu-v5-lite-podslice",
      "v5litepod-2x4",
    ),
    ("v6e:8x16", "v6e-128", "v2-alpha-tpuv6e", "tpu-v6e-slice", "v6e-8x16"),
  ],
)
def test_names_per_generation(spec, accelerator, runtime, gke, xpk):
  tpu = parse_tpu(spec)
  assert tpu.accelerator_type == accelerator
  assert tpu.runtime_version == runtime
  assert tpu.gke_accelerator == gke
  assert tpu.xpk_tpu_type == xpk
  assert str(tpu) == spec


def test_gke_nodes_hold_four_chips():
  tpu = parse_tpu("v5e:16x16")
  assert (tpu.gke_nodes, tpu.chips_per_gke_node) == (64, 4)
  assert parse_tpu("v5p:8x24x32").gke_nodes == 1536
  assert parse_tpu("v4:2x2x1").gke_nodes == 1
  assert parse_tpu("v5e:16x16").pathways_instance_type == "tpuv5e:16x16"


def test_a_generation_alone_takes_the_chip_count_from_the_mesh():
  assert parse_tpu("v5e", MeshConfig(1, 16, 16)).topology == "16x16"
  assert parse_tpu("v5p", MeshConfig(1, 32, 4)).topology == "4x4x8"
  assert parse_tpu("v4", MeshConfig(4, 256, 4)).topology == "16x16x16"
  with pytest.raises(
    ConfigError,
    match=r"an ici_\* size is -1\); give the "
    r"shape, e.g. --tpu v5e:16x16",
  ):
    parse_tpu("v5e", MeshConfig(ici_data=1, ici_fsdp=-1))
  with pytest.raises(ConfigError, match="no usual v5e slice has 24 chips"):
    parse_tpu("v5e", MeshConfig(1, 24, 1))
  with pytest.raises(ConfigError, match="expected GENERATION:SHAPE"):
    parse_tpu("v5litepod-256")
  with pytest.raises(ConfigError, match="v5e slices are one of"):
    parse_tpu("v5e:32x32")


def test_the_mesh_must_fill_the_slices():
  tpu = parse_tpu("v5e:16x16")
  assert check_mesh(MeshConfig(1, 16, 16), tpu, 1) == (
    {"data": 1, "fsdp": 16, "tensor": 16},
    {"data": 1, "fsdp": 1, "tensor": 1},
  )
  ici, dcn = check_mesh(MeshConfig(1, -1, 1, dcn_data=2), tpu, 2)
  assert ici["fsdp"] == 256 and dcn["data"] == 2
  with pytest.raises(
    ConfigError,
    match=r"^c.yaml does not fit 1 x "
    r"v5litepod-256 \(v5e:16x16, 256 chips per slice\): "
    r"mesh: ici_data=1, ici_fsdp=16, ici_tensor=8",
  ):
    check_mesh(MeshConfig(1, 16, 8), tpu, 1, what="c.yaml")
  with pytest.raises(
    ConfigError,
    match=r"does not fit 2 x v5litepod-256 .*"
    r"dcn_data=1, dcn_fsdp=1, dcn_tensor=1 \(product 1\) "
    r"must equal the 2 slices",
  ):
    check_mesh(MeshConfig(1, -1, 1), tpu, 2)


@pytest.mark.parametrize(
  "spec, flags, label",
  [
    # The accelerator type names the shape: gcloud gets it.
    (
      "v5e:16x16",
      {"accelerator_type": "v5litepod-256"},
      "v5litepod-256 (v5e:16x16, 256 chips per slice)",
    ),
    (
      "v4:2x2x1",
      {"accelerator_type": "v4-8"},
      "v4-8 (v4:2x2x1, 4 chips per slice)",
    ),
    (
      "v5p:16x16x24",
      {"accelerator_type": "v5p-12288"},
      "v5p-12288 (v5p:16x16x24, 6144 chips per slice)",
    ),
    # Another shape of as many chips: v5p-12288 would be 16x16x24.
    (
      "v5p:8x24x32",
      {"type": "v5p", "topology": "8x24x32"},
      "v5p:8x24x32 (6144 chips per slice)",
    ),
    (
      "v4:8x16x32",
      {"type": "v4", "topology": "8x16x32"},
      "v4:8x16x32 (4096 chips per slice)",
    ),
    (
      "v5p:4x4x12",
      {"type": "v5p", "topology": "4x4x12"},
      "v5p:4x4x12 (192 chips per slice)",
    ),
  ],
)
def test_gcloud_gets_the_accelerator_type_only_where_it_means_the_shape(
  spec, flags, label
):
  tpu = parse_tpu(spec)
  assert tpu.gcloud_shape == flags
  assert tpu.named == ("accelerator_type" in flags)
  assert tpu.label == label


def test_the_paper_slice_that_does_not_fit_names_no_accelerator_type():
  with pytest.raises(
    ConfigError, match=r"^c.yaml does not fit 1 x v5p:8x24x32 \(6144 chips"
  ):
    check_mesh(MeshConfig(1, 16, 8), parse_tpu("v5p:8x24x32"), 1, what="c.yaml")


def test_zones_are_checked_against_the_generation():
  check_zone(parse_tpu("v4:4x4x8"), "us-central2-b", "fix")
  check_zone(parse_tpu("v5p:8x24x32"), "us-east5-a", "fix")
  with pytest.raises(
    ConfigError,
    match=r"^--zone 'us-central2-a': Cloud TPU offers v4 in us-central2-b "
    r"\(cloud.google.com/tpu/docs/regions-zones\); fix$",
  ):
    check_zone(parse_tpu("v4:4x4x8"), "us-central2-a", "fix")
  # Zones in the same region first; all of them when the region has none.
  with pytest.raises(ConfigError, match=r"offers v5e in europe-west4-b \("):
    check_zone(parse_tpu("v5e:16x16"), "europe-west4-a", "fix")
