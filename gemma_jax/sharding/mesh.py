"""Builds a `jax.sharding.Mesh` with axes (data, fsdp, tensor) from MeshConfig.

Each axis has a size inside a slice (ICI) and across slices (DCN); the mesh
axis of size dcn * ici is laid out slice-major, so that neighbours along an
axis are in the same slice and only the outer (DCN) stride crosses slices.
With the default rules only data-parallel traffic (gradient reductions) then
crosses the data-centre network.

Devices without a `slice_index` (CPU, or a single TPU slice) that are asked
for several slices are cut into that many consecutive, equal groups: this is
how tests emulate multi-slice training on 8 fake CPU devices.
"""

import collections
import math

import numpy as np
import jax
from jax.experimental import mesh_utils

from gemma_jax.errors import ConfigError
from gemma_jax.sharding.config import MESH_AXES, MeshConfig


class MeshError(ConfigError):
  """The mesh sizes do not match the devices present."""


def _resolve(sizes: dict[str, int], total: int, group: str) -> dict[str, int]:
  """Replaces a -1 size by what is left of `total`; checks the product."""
  known = math.prod(s for s in sizes.values() if s != -1)
  shown = ", ".join(f"{group}_{a}={s}" for a, s in sizes.items())
  what = "devices per slice" if group == "ici" else "slices"
  if total % known:
    raise MeshError(f"mesh: {shown} (product {known}) does not divide the "
                    f"{total} {what}")
  sizes = {a: (total // known if s == -1 else s) for a, s in sizes.items()}
  if math.prod(sizes.values()) != total:
    raise MeshError(f"mesh: {shown} (product {known}) must equal the "
                    f"{total} {what}; set one size to -1 to take what is left")
  return sizes


def _slices(devices, num_slices: int | None) -> list[list]:
  """Groups devices by slice_index, or cuts them into `num_slices` groups."""
  by_slice = collections.defaultdict(list)
  for d in devices:
    by_slice[getattr(d, "slice_index", 0)].append(d)
  groups = [by_slice[k] for k in sorted(by_slice)]
  if len(groups) == 1 and num_slices and num_slices > 1:
    # Emulated slices (CPU tests): consecutive equal groups.
    if len(devices) % num_slices:
      raise MeshError(f"mesh: {len(devices)} devices cannot be cut into "
                      f"{num_slices} equal slices")
    n = len(devices) // num_slices
    groups = [list(devices[i * n:(i + 1) * n]) for i in range(num_slices)]
  if len({len(g) for g in groups}) != 1:
    raise MeshError(f"mesh: slices have unequal device counts "
                    f"{[len(g) for g in groups]}")
  return groups


def mesh_shape(cfg: MeshConfig, num_devices: int,
               num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
  """Resolved (ici, dcn) sizes per axis for this many devices and slices."""
  if num_devices % num_slices:
    raise MeshError(f"mesh: {num_devices} devices do not split into "
                    f"{num_slices} slices")
  ici = _resolve({a: getattr(cfg, f"ici_{a}") for a in MESH_AXES},
                 num_devices // num_slices, "ici")
  dcn = _resolve({a: getattr(cfg, f"dcn_{a}") for a in MESH_AXES},
                 num_slices, "dcn")
  return ici, dcn


def _dcn_product(cfg: MeshConfig) -> int:
  return math.prod(max(getattr(cfg, f"dcn_{a}"), 1) for a in MESH_AXES)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """A Mesh over `devices` (default: all) with axes ('data', 'fsdp', 'tensor').

  Raises MeshError, stating the sizes and the device count, when the sizes
  do not multiply to the devices present.
  """
  devices = list(jax.devices() if devices is None else devices)
  groups = _slices(devices, _dcn_product(cfg))
  ici, dcn = mesh_shape(cfg, len(devices), len(groups))
  ici_shape = [ici[a] for a in MESH_AXES]
  dcn_shape = [dcn[a] for a in MESH_AXES]
  if len(groups) > 1 and all(hasattr(d, "slice_index") for d in devices):
    array = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, allow_split_physical_axes=True)
  else:
    per_slice = np.stack([_slice_mesh(ici_shape, g) for g in groups])
    # [S, *ici] -> [*dcn, *ici] -> interleave (dcn_a, ici_a) -> merge.
    array = per_slice.reshape(dcn_shape + ici_shape)
    n = len(MESH_AXES)
    array = array.transpose([i for a in range(n) for i in (a, n + a)])
    array = array.reshape([d * i for d, i in zip(dcn_shape, ici_shape)])
  return jax.sharding.Mesh(array, MESH_AXES)


def _slice_mesh(shape, devices) -> np.ndarray:
  """Devices of one slice arranged for the ICI topology where known."""
  try:
    return mesh_utils.create_device_mesh(shape, devices,
                                         allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices, dtype=object).reshape(shape)
