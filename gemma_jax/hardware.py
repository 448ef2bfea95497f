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

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator generation.

  device_kinds: lower-case substrings of `jax.Device.device_kind`.
  TPU slices: `dims` 2 (torus) or 3 (twisted torus of 4x4x4 cubes), the
  largest pod in chips, the shapes allowed below full cubes, and the chip
  configuration the topology needs (v4 and v5p: 'megacore', one JAX device
  per chip).
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
  """
  accelerator_prefix: str
  cores_per_chip: int
  runtime_version: str
  gke_accelerator: str
  gke_machine_type: str
  pathways_type: str


_2D = ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4")

CHIPS = {c.name: c for c in (
    Chip("v2", ("tpu v2",), 22.5e12),
    Chip("v3", ("tpu v3",), 61.5e12),
    Chip("v4", ("tpu v4",), 275e12, int(30.75 * GiB), 3, 4096, _3D,
         "megacore", CloudNames("v4", 2, "tpu-ubuntu2204-base",
                                "tpu-v4-podslice", "ct4p-hightpu-4t",
                                "tpuv4")),
    Chip("v5e", ("tpu v5 lite", "tpu v5e"), 197e12, int(15.75 * GiB), 2, 256,
         _2D, None, CloudNames("v5litepod", 1, "v2-alpha-tpuv5-lite",
                               "tpu-v5-lite-podslice", "ct5lp-hightpu-4t",
                               "tpuv5e")),
    Chip("v5p", ("tpu v5p", "tpu v5"), 459e12, int(95.74 * GiB), 3, 8960, _3D,
         "megacore", CloudNames("v5p", 2, "v2-alpha-tpuv5", "tpu-v5p-slice",
                                "ct5p-hightpu-4t", "tpuv5")),
    Chip("v6e", ("tpu v6 lite", "tpu v6e"), 918e12, int(31.25 * GiB), 2, 256,
         _2D, None, CloudNames("v6e", 1, "v2-alpha-tpuv6e", "tpu-v6e-slice",
                               "ct6e-standard-4t", "tpuv6e")),
    Chip("tpu7x", ("tpu7x",), 2307e12),
    Chip("a100", ("a100",), 312e12),
    Chip("l4", ("l4",), 121e12),
    Chip("h100", ("h100", "h200", "h800"), 989e12),
    Chip("b200", ("b200",), 2250e12),
)}


def chip_of(device) -> Chip | None:
  """The table entry for a JAX device (longest matching kind), or None."""
  kind = device.device_kind.lower()
  matches = [(len(k), c) for c in CHIPS.values() for k in c.device_kinds
             if k in kind]
  return max(matches, key=lambda m: m[0])[1] if matches else None


def peak_flops_per_device(device, configured: float | None = None):
  """Configured value, else the table's peak for the device, else None."""
  if configured:
    return float(configured)
  chip = chip_of(device)
  return chip.peak_flops if chip else None


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5e:16x16' -> (chip, (16, 16)); ConfigError for slices that do not exist.

  2D generations (v5e, v6e) come in the listed shapes only (single-chip
  slices exist but libtpu does not compile for them: its hosts are 2x2). 3D
  generations (v4, v5p) are either a listed small shape or built from 4x4x4
  cubes: every dimension a multiple of 4, up to the generation's largest pod.
  """
  gen, _, shape = name.partition(":")
  tpus = [c for c in CHIPS.values() if c.is_tpu]
  if gen not in CHIPS or not CHIPS[gen].is_tpu or not shape:
    raise ConfigError(
        f"--topology {name!r}: expected GENERATION:SHAPE such as v5e:16x16 "
        f"or v5p:4x4x8; generations: {', '.join(c.name for c in tpus)}")
  chip = CHIPS[gen]
  try:
    sizes = tuple(int(s) for s in shape.split("x"))
  except ValueError:
    sizes = ()
  cube = (len(sizes) == 3 and all(s % 4 == 0 for s in sizes)
          and math.prod(sizes) <= chip.max_chips)
  if len(sizes) != chip.dims or not (shape in chip.shapes or
                                     (chip.dims == 3 and cube)):
    rule = (f"one of {', '.join(chip.shapes)}" if chip.dims == 2 else
            f"{', '.join(chip.shapes)} or AxBxC with A, B, C multiples of "
            f"4 and at most {chip.max_chips} chips")
    raise ConfigError(f"--topology {name!r}: {gen} slices are {rule}")
  return chip, sizes
