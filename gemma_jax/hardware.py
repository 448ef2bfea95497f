"""Accelerators: one table of what each chip can do, and TPU slice shapes.

Peak FLOP/s are dense bf16 per JAX device (per chip; per TensorCore on v2/v3
where JAX shows one device per core), from Cloud TPU's and NVIDIA's data
sheets. HBM is per device as the XLA TPU compiler reports it (its
`RESOURCE_EXHAUSTED` message states the available bytes), which is what a
step must fit in.

    chip = chip_of(jax.devices()[0])            # by device_kind
    chip, sizes = parse_topology("v5e:16x16")   # Cloud TPU slice names
"""

import dataclasses
import math

from gemma_jax.errors import ConfigError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator generation.

  device_kinds: lower-case substrings of `jax.Device.device_kind`.
  TPU slices: `dims` 2 (torus) or 3 (twisted torus of 4x4x4 cubes), the
  largest single slice in chips, the shapes allowed below full cubes, and
  the chip configuration the topology needs (v4 and v5p: 'megacore', one JAX
  device per chip). `named_shapes`: the shape each accelerator type (one
  per chip count) stands for.
  `cloud`: how Cloud TPU, GKE and xpk name the generation (TPUs only).
  """

  name: str
  device_kinds: tuple[str, ...]
  peak_flops: float
  hbm_bytes: int | None = None
  dims: int = 0
  max_chips: int = 0
  shapes: tuple[str, ...] = ()
  chip_config: str | None = None
  cloud: "CloudNames | None" = None
  named_shapes: tuple[str, ...] = ()

  @property
  def is_tpu(self) -> bool:
    return self.dims > 0


@dataclasses.dataclass(frozen=True)
class CloudNames:
  """A TPU generation's names in Cloud TPU, GKE and xpk.

  accelerator_prefix + count is gcloud's --accelerator-type: v4 and v5p count
  TensorCores, two per chip (v4-8 is 4 chips), v5e (`v5litepod-N`) and v6e
  count chips (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e). The runtime
  (software) version for JAX is from cloud.google.com/tpu/docs/runtimes; the
  GKE accelerator node selector and machine type (4 chips per node) from
  cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus; the Pathways
  instance type as xpk names it (src/xpk/core/system_characteristics.py).
  `zones`: where Cloud TPU offers the generation.
  """

  accelerator_prefix: str
  cores_per_chip: int
  runtime_version: str
  gke_accelerator: str
  gke_machine_type: str
  pathways_type: str
  zones: tuple[str, ...] = ()


# Slice shapes, from the Cloud TPU pages per generation
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e and /types-topologies) and
# xpk's src/xpk/core/system_characteristics.py, which lists the same names:
# - v5e and v6e are 2D, one shape per chip count up to 256 chips. The
#   single-chip 1x1 slices exist (v5litepod-1, v6e-1) but are left out: the
#   JAX topology compile starts at a 2x2 host.
# - v4 and v5p are 3D, written AxBxC with A <= B <= C: a small shape below
#   one 4x4x4 cube, or whole cubes (every axis a multiple of 4). A v4 pod is
#   4096 chips (64 cubes); a v5p pod holds 8960 chips, but the largest job
#   that can be scheduled is 96 cubes, 6144 chips (its biggest listed shape
#   is 16x16x24).
_2D = ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4")
# The shape each accelerator type names (v4-8 is 2x2x1, v5p-12288 is
# 16x16x24), from the same pages' tables. Any other shape of the same chip
# count (v5p:8x24x32 is 6144 chips too) is requested as --type and
# --topology, never by the accelerator type.
_V4_NAMED = _3D + (
  "4x4x4",
  "4x4x8",
  "4x8x8",
  "8x8x8",
  "8x8x12",
  "8x8x16",
  "8x16x16",
)
_V5P_NAMED = _3D + (
  "4x4x4",
  "4x4x8",
  "4x8x8",
  "8x8x8",
  "8x8x16",
  "8x16x16",
  "16x16x16",
  "16x16x24",
)
# Zones per generation, from the Cloud TPU "TPU regions and zones" page
# (cloud.google.com/tpu/docs/regions-zones), the versions of 2025-2026,
# single-tenant zones included. Checked in dry runs only: a real run lets
# gcloud decide, so a zone added since still works. Outside the US:
# - europe-west4-b, v5e: the page's Europe table ("v5lite-1 ...
#   europe-west4-b"). v5p: its Europe table has a v5p row, and TPUs in
#   Europe are in europe-west4; Google's own TPU test DAGs run v5p there
#   (GoogleCloudPlatform/ml-auto-solutions, dags/common/vm_resource.py).
# - asia-northeast1-b, v6e: the page's Asia Pacific table has a v6e row
#   (its only TPU row besides v2), the zone letter not in the copy we
#   read; public labs create v6e spot nodes (ct6e-standard-1t) there.
# - asia-southeast1-b was listed for v5e and is not: the Asia Pacific table
#   has no v5e row.
_V4_ZONES = ("us-central2-b",)
_V5E_ZONES = (
  "us-central1-a",
  "us-south1-a",
  "us-west1-c",
  "us-west4-a",
  "us-west4-b",
  "us-east5-a",
  "us-east5-b",
  "us-east5-c",
  "europe-west4-b",
)
_V5P_ZONES = (
  "us-central1-a",
  "us-east5-a",
  "us-east5-b",
  "us-east5-c",
  "us-south1-a",
  "us-east1-d",
  "europe-west4-b",
)
_V6E_ZONES = (
  "us-central1-b",
  "us-east1-d",
  "us-east5-a",
  "us-east5-b",
  "us-east5-c",
  "us-east4-a",
  "us-east4-b",
  "us-west1-c",
  "europe-west4-a",
  "asia-northeast1-b",
)

CHIPS = {
  c.name: c
  for c in (
    Chip("v2", ("tpu v2",), 22.5e12),
    Chip("v3", ("tpu v3",), 61.5e12),
    Chip(
      "v4",
      ("tpu v4",),
      275e12,
      int(30.75 * GiB),
      3,
      4096,
      _3D,
      "megacore",
      CloudNames(
        "v4",
        2,
        "tpu-ubuntu2204-base",
        "tpu-v4-podslice",
        "ct4p-hightpu-4t",
        "tpuv4",
        _V4_ZONES,
      ),
      _V4_NAMED,
    ),
    Chip(
      "v5e",
      ("tpu v5 lite", "tpu v5e"),
      197e12,
      int(15.75 * GiB),
      2,
      256,
      _2D,
      None,
      CloudNames(
        "v5litepod",
        1,
        "v2-alpha-tpuv5-lite",
        "tpu-v5-lite-podslice",
        "ct5lp-hightpu-4t",
        "tpuv5e",
        _V5E_ZONES,
      ),
      _2D,
    ),
    Chip(
      "v5p",
      ("tpu v5p", "tpu v5"),
      459e12,
      int(95.74 * GiB),
      3,
      6144,
      _3D,
      "megacore",
      CloudNames(
        "v5p",
        2,
        "v2-alpha-tpuv5",
        "tpu-v5p-slice",
        "ct5p-hightpu-4t",
        "tpuv5",
        _V5P_ZONES,
      ),
      _V5P_NAMED,
    ),
    Chip(
      "v6e",
      ("tpu v6 lite", "tpu v6e"),
      918e12,
      int(31.25 * GiB),
      2,
      256,
      _2D,
      None,
      CloudNames(
        "v6e",
        1,
        "v2-alpha-tpuv6e",
        "tpu-v6e-slice",
        "ct6e-standard-4t",
        "tpuv6e",
        _V6E_ZONES,
      ),
      _2D,
    ),
    Chip("tpu7x", ("tpu7x",), 2307e12),
    Chip("a100", ("a100",), 312e12),
    Chip("l4", ("l4",), 121e12),
    Chip("h100", ("h100", "h200", "h800"), 989e12),
    Chip("b200", ("b200",), 2250e12),
  )
}


def chip_of(device) -> Chip | None:
  """The table entry for a JAX device (longest matching kind), or None."""
  kind = device.device_kind.lower()
  matches = [
    (len(k), c) for c in CHIPS.values() for k in c.device_kinds if k in kind
  ]
  return max(matches, key=lambda m: m[0])[1] if matches else None


def peak_flops_per_device(device, configured: float | None = None):
  """Configured value, else the table's peak for the device, else None."""
  if configured:
    return float(configured)
  chip = chip_of(device)
  return chip.peak_flops if chip else None


def _sizes(shape: str) -> tuple[int, ...]:
  return tuple(int(s) for s in shape.split("x"))


def is_slice(chip: Chip, sizes: tuple[int, ...]) -> bool:
  """Whether `sizes` is a slice shape of `chip` as the docs write it."""
  shape = "x".join(map(str, sizes))
  if len(sizes) != chip.dims or shape in chip.shapes:
    return shape in chip.shapes
  return (
    chip.dims == 3
    and all(s > 0 and s % 4 == 0 for s in sizes)
    and list(sizes) == sorted(sizes)
    and math.prod(sizes) <= chip.max_chips
  )


def _all_shapes(chip: Chip) -> list[tuple[int, ...]]:
  """Every slice shape of `chip` (3D: the small ones and all cube shapes)."""
  shapes = [_sizes(s) for s in chip.shapes]
  if chip.dims == 3:
    cubes = chip.max_chips // 64
    shapes += [
      (4 * a, 4 * b, 4 * c)
      for a in range(1, cubes + 1)
      for b in range(a, cubes // a + 1)
      for c in range(b, cubes // (a * b) + 1)
    ]
  return shapes


def nearest_shapes(chip: Chip, sizes: tuple[int, ...], n: int = 3) -> list:
  """Up to n valid shapes closest to `sizes`: axis by axis (sorted, so the
  same axes reordered come first), then by chip count (log scale)."""
  want = sorted(sizes) if len(sizes) == chip.dims else []
  chips = max(math.prod(sizes), 1) if sizes else 1

  def distance(shape):
    return (
      sum(abs(a - b) for a, b in zip(shape, want)),  # 0 without `want`
      abs(math.log(math.prod(shape) / chips)),
      math.prod(shape),
    )

  return [
    "x".join(map(str, s)) for s in sorted(_all_shapes(chip), key=distance)[:n]
  ]


def named_shape(chip: Chip, chips: int) -> str | None:
  """The shape the accelerator type of `chips` chips stands for, if any."""
  for shape in chip.named_shapes:
    if math.prod(_sizes(shape)) == chips:
      return shape
  return None


def _rule(chip: Chip) -> str:
  if chip.dims == 2:
    return f"{chip.name} slices are one of {', '.join(chip.shapes)}"
  return (
    f"{chip.name} slices are {', '.join(chip.shapes)} or AxBxC with "
    f"A <= B <= C, each a multiple of 4, at most {chip.max_chips} chips "
    f"({chip.max_chips // 64} cubes)"
  )


def accelerator_hint(name: str) -> str:
  """' (the accelerator type v5p-12288 is v5p:16x16x24)' for an accelerator
  type given as a topology (v5e-256 read as v5litepod-256), else ''."""
  prefix, _, count = name.rpartition("-")
  for chip in CHIPS.values():
    cloud = chip.cloud
    if cloud and prefix in (cloud.accelerator_prefix, chip.name):
      chips = int(count) // cloud.cores_per_chip if count.isdigit() else 0
      shape = named_shape(chip, chips)
      if shape:
        return (
          f" (the accelerator type {cloud.accelerator_prefix}-{count} is "
          f"{chip.name}:{shape})"
        )
  return ""


def parse_topology(
  name: str, flag: str = "--topology"
) -> tuple[Chip, tuple[int, ...]]:
  """'v5e:16x16' -> (chip, (16, 16)); ConfigError for slices that do not
  exist, naming the nearest ones that do.

  2D generations (v5e, v6e) come in the listed shapes only. 3D generations
  (v4, v5p) are either a listed small shape or built from 4x4x4 cubes, axes
  in non-decreasing order, up to the generation's largest slice.
  """
  gen, _, shape = name.partition(":")
  tpus = [c for c in CHIPS.values() if c.is_tpu]
  if gen not in CHIPS or not CHIPS[gen].is_tpu or not shape:
    raise ConfigError(
      f"{flag} {name!r}: expected GENERATION:SHAPE such as v5e:16x16 "
      f"or v5p:4x4x8{accelerator_hint(name)}; generations: "
      f"{', '.join(c.name for c in tpus)}"
    )
  chip = CHIPS[gen]
  try:
    sizes = _sizes(shape)
  except ValueError:
    sizes = ()
  if not is_slice(chip, sizes):
    why = ""
    if sizes == (1, 1) and chip.dims == 2:
      why = "; a single chip cannot be compiled for (the topologies start "
      why += "at one 2x2 host)"
    elif len(sizes) == chip.dims and math.prod(sizes) > chip.max_chips:
      why = f"; {math.prod(sizes)} chips is more than one slice (--slices N)"
    nearest = ", ".join(f"{gen}:{s}" for s in nearest_shapes(chip, sizes))
    raise ConfigError(
      f"{flag} {name!r}: {_rule(chip)}{why}; nearest: {nearest}"
    )
  return chip, sizes
