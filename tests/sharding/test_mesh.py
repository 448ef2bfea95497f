"""make_mesh: axis sizes from config, checked against the devices present."""

import jax
import numpy as np
import pytest

from gemma_jax.sharding.config import MeshConfig
from gemma_jax.sharding.mesh import MeshError, make_mesh, mesh_shape


def test_minus_one_takes_the_devices_left():
  mesh = make_mesh(MeshConfig(ici_data=-1, ici_tensor=2))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert mesh.axis_names == ("data", "fsdp", "tensor")


def test_sizes_that_do_not_match_the_devices_name_sizes_and_count():
  with pytest.raises(MeshError, match=r"ici_data=3.*8 devices per slice"):
    make_mesh(MeshConfig(ici_data=3, ici_tensor=1))
  with pytest.raises(MeshError, match=r"ici_fsdp=2.*product 4.*8 devices"):
    make_mesh(MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=1))


def test_a_subset_of_devices_makes_a_one_device_mesh():
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  assert mesh.devices.size == 1


def test_dcn_sizes_must_multiply_to_the_slice_count():
  with pytest.raises(MeshError, match=r"dcn_data=3.*2 slices"):
    mesh_shape(MeshConfig(dcn_data=3), 8, num_slices=2)


def _slice_of(device, per_slice=4):
  return device.id // per_slice  # emulated slices: consecutive devices


def test_two_emulated_slices_only_the_data_axis_crosses_slices():
  mesh = make_mesh(MeshConfig(ici_data=1, ici_fsdp=2, ici_tensor=2, dcn_data=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  slices = np.vectorize(_slice_of)(mesh.devices)
  # Fixing the data index fixes the slice: fsdp and tensor stay inside.
  for d in range(2):
    assert (slices[d] == slices[d].flat[0]).all()
  assert slices[0, 0, 0] != slices[1, 0, 0]


def test_hybrid_data_axis_is_slice_major():
  mesh = make_mesh(MeshConfig(ici_data=4, dcn_data=2))
  slices = np.vectorize(_slice_of)(mesh.devices[:, 0, 0])
  assert slices.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
