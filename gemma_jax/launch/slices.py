"""A Cloud TPU slice as each tool names it, and the check that a config's mesh
fits it.

    tpu = parse_tpu("v5e:16x16")        # or "v5e" with a mesh that says 256
    tpu.gcloud_shape                    # {'accelerator_type': 'v5litepod-256'}
    tpu.runtime_version                 # 'v2-alpha-tpuv5-lite'
    tpu.gke_accelerator, tpu.topology   # 'tpu-v5-lite-podslice', '16x16'
    check_mesh(cfg.mesh, tpu, slices=2) # ConfigError before any capacity
    parse_tpu("v5p:8x24x32").gcloud_shape  # {'type': 'v5p', 'topology': ...}

Topologies count chips, as `gemma-jax compile --topology` does (one JAX
device per chip; v4 and v5p in megacore mode). The names per generation
(accelerator type, runtime version, GKE and Pathways names), the shapes and
the zones are in gemma_jax.hardware.CHIPS, with their sources.
"""

import dataclasses
import math

from gemma_jax.errors import ConfigError
from gemma_jax.hardware import (
  CHIPS,
  CloudNames,
  accelerator_hint,
  named_shape,
  parse_topology,
)

# The generations Cloud TPU rents out.
GENERATIONS = tuple(name for name, c in CHIPS.items() if c.cloud)
CHIPS_PER_GKE_NODE = 4


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One slice: its generation and shape in chips, e.g. v5e 16x16."""

  generation: str
  shape: tuple[int, ...]

  @property
  def gen(self) -> CloudNames:
    cloud = CHIPS[self.generation].cloud
    if cloud is None:  # not a generation that parse_tpu accepts
      raise ConfigError(
        f"--tpu {self}: Cloud TPU does not rent "
        f"{self.generation}; generations: "
        f"{', '.join(GENERATIONS)}"
      )
    return cloud

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology(self) -> str:
    return "x".join(map(str, self.shape))

  @property
  def accelerator_type(self) -> str:
    """The accelerator type of this many chips. It stands for one shape
    (`named`); v5p-12288 is 16x16x24, not 8x24x32."""
    return (
      f"{self.gen.accelerator_prefix}-{self.chips * self.gen.cores_per_chip}"
    )

  @property
  def named(self) -> bool:
    """Whether `accelerator_type` means exactly this shape."""
    return named_shape(CHIPS[self.generation], self.chips) == self.topology

  @property
  def gcloud_shape(self) -> dict[str, str]:
    """gcloud's flags for this slice: --accelerator-type where the name means
    the shape, else --type and --topology (queued-resources create and
    tpu-vm create take either: cloud.google.com/sdk/gcloud/reference/
    compute/tpus/queued-resources/create)."""
    if self.named:
      return {"accelerator_type": self.accelerator_type}
    return {"type": self.gen.accelerator_prefix, "topology": self.topology}

  @property
  def short_name(self) -> str:
    """The accelerator type where it means the shape, else 'v5p:8x24x32'."""
    return self.accelerator_type if self.named else str(self)

  @property
  def label(self) -> str:
    """'v5litepod-256 (v5e:16x16, 256 chips per slice)' or, where no
    accelerator type means the shape, 'v5p:8x24x32 (6144 chips per slice)'."""
    name = f"{self.accelerator_type} ({self}, " if self.named else f"{self} ("
    return f"{name}{self.chips} chips per slice)"

  @property
  def runtime_version(self) -> str:
    return self.gen.runtime_version

  @property
  def gke_accelerator(self) -> str:
    return self.gen.gke_accelerator

  @property
  def gke_nodes(self) -> int:
    """Pods (= GKE nodes = JAX processes) per slice."""
    return max(1, self.chips // CHIPS_PER_GKE_NODE)

  @property
  def chips_per_gke_node(self) -> int:
    return min(self.chips, CHIPS_PER_GKE_NODE)

  @property
  def xpk_tpu_type(self) -> str:
    """xpk's --tpu-type: the prefix and the exact topology."""
    return f"{self.gen.accelerator_prefix}-{self.topology}"

  @property
  def pathways_instance_type(self) -> str:
    return f"{self.gen.pathways_type}:{self.topology}"

  def __str__(self) -> str:
    return f"{self.generation}:{self.topology}"


def _default_shape(generation: str, chips: int) -> tuple[int, ...] | None:
  """The usual shape of a `chips`-chip slice, None if there is none."""
  product = CHIPS[generation]
  shape = named_shape(product, chips)
  if shape:
    return tuple(int(s) for s in shape.split("x"))
  if product.dims == 3:
    # Cubes: 4x4x4, 4x4x8, 4x8x8, 8x8x8, 8x8x16, ... (the documented v4
    # and v5p shapes of each power-of-two size).
    cube = [4, 4, 4]
    while math.prod(cube) < min(chips, product.max_chips):
      i = max(k for k in range(3) if cube[k] == min(cube))
      cube[i] *= 2
    if math.prod(cube) == chips:
      return tuple(sorted(cube))
  return None


def parse_tpu(spec: str, mesh=None) -> TpuSlice:
  """'v5e:16x16' (a real slice, checked), or 'v5e' with the chip count taken
  from a mesh whose ici_* sizes are all given."""
  if ":" in spec:
    product, sizes = parse_topology(spec, flag="--tpu")
    return TpuSlice(product.name, tuple(sizes))
  if spec not in GENERATIONS:
    raise ConfigError(
      f"--tpu {spec!r}: expected GENERATION:SHAPE such as "
      f"v5e:16x16{accelerator_hint(spec)}, or a generation: "
      f"{', '.join(GENERATIONS)}"
    )
  ici = (
    [getattr(mesh, f"ici_{a}") for a in ("data", "fsdp", "tensor")]
    if mesh is not None
    else [-1]
  )
  if -1 in ici:
    raise ConfigError(
      f"--tpu {spec}: the mesh does not fix the chips per "
      f"slice (an ici_* size is -1); give the shape, e.g. "
      f"--tpu {spec}:{CHIPS[spec].shapes[-1]}"
    )
  shape = _default_shape(spec, math.prod(ici))
  if shape is None:
    raise ConfigError(
      f"--tpu {spec}: no usual {spec} slice has "
      f"{math.prod(ici)} chips (the mesh's ici_* "
      f"product); give the shape, e.g. --tpu {spec}:AxB"
    )
  return TpuSlice(spec, shape)


def check_mesh(mesh, tpu: TpuSlice, slices: int, what: str = "config"):
  """ConfigError unless the mesh's ici_* sizes fill one slice and its dcn_*
  sizes multiply to `slices`. Returns the resolved (ici, dcn) sizes."""
  from gemma_jax.sharding import mesh as mesh_lib

  if slices < 1:
    raise ConfigError(f"--slices must be >= 1, got {slices}")
  try:
    return mesh_lib.mesh_shape(mesh, tpu.chips * slices, slices)
  except ConfigError as e:
    raise ConfigError(
      f"{what} does not fit {slices} x {tpu.label}: {e}"
    ) from None


def check_zone(tpu: TpuSlice, zone: str, fix: str) -> None:
  """ConfigError unless Cloud TPU documents `zone` for the slice's
  generation (hardware.CHIPS, from the regions-and-zones page); the message
  ends with `fix`."""
  zones = tpu.gen.zones
  if zone not in zones:
    region = zone.rpartition("-")[0]
    near = [z for z in zones if z.startswith(region + "-")] or list(zones)
    raise ConfigError(
      f"--zone {zone!r}: Cloud TPU offers {tpu.generation} in "
      f"{', '.join(near)} (cloud.google.com/tpu/docs/regions-zones); "
      f"{fix}"
    )
