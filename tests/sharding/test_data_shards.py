"""The data shard of each process, from the batch sharding: processes whose
devices hold the same rows (a batch shard spanning hosts) read the same
rows; the shard count is the number of distinct row blocks.

The 8 CPU devices of the test session stand in for hosts of 2 or 4 chips:
`process_of` maps a device to its "host" as libtpu's device descriptions
do on a pod (scripts/pod_batch_owners.py does it on the real topologies).
"""

import jax
import pytest
from jax.sharding import NamedSharding

from gemma_jax import configlib
from gemma_jax.errors import ConfigError
from gemma_jax.sharding import rules
from gemma_jax.sharding.config import MeshConfig
from gemma_jax.sharding.data_shards import (
  data_shard,
  data_shards,
  process_rows,
)
from gemma_jax.sharding.mesh import make_mesh


def batch_sharding(**mesh) -> NamedSharding:
  cfg = configlib.from_dict(MeshConfig, mesh, "mesh")
  return NamedSharding(make_mesh(cfg), rules.batch_spec(cfg))


def hosts_of(chips: int):
  return lambda device: device.id // chips


@pytest.mark.parametrize(
  "mesh, chips, expected",
  [
    # Every host's chips hold rows of their own: one shard per host.
    (dict(ici_data=8), 2, [(0, 4), (1, 4), (2, 4), (3, 4)]),
    (dict(ici_data=4, ici_tensor=2), 2, [(0, 4), (1, 4), (2, 4), (3, 4)]),
    (dict(ici_data=2, ici_fsdp=4), 4, [(0, 2), (1, 2)]),
    # The tensor axis spans 2 hosts: hosts 0, 1 read rows [0, B/2).
    (dict(ici_data=2, ici_tensor=4), 2, [(0, 2), (0, 2), (1, 2), (1, 2)]),
    (dict(ici_fsdp=2, ici_tensor=4), 2, [(0, 2), (0, 2), (1, 2), (1, 2)]),
    # ... all 4 hosts: one shard, every host reads the whole batch.
    (dict(ici_data=1, ici_tensor=8), 2, [(0, 1)] * 4),
    (dict(ici_data=1, ici_tensor=8), 4, [(0, 1)] * 2),
    # fsdp spans hosts, a tensor pair within each: every host its rows.
    (dict(ici_data=1, ici_fsdp=4, ici_tensor=2), 2, [(i, 4) for i in range(4)]),
    # Several shards per host, a tensor pair spanning none.
    (dict(ici_data=2, ici_fsdp=2, ici_tensor=2), 4, [(0, 2), (1, 2)]),
  ],
)
def test_processes_holding_the_same_rows_read_the_same_shard(
  mesh, chips, expected
):
  for rows in (8, 16):
    shards = data_shards(batch_sharding(**mesh), rows, None, hosts_of(chips))
    assert [shards[h] for h in range(8 // chips)] == expected


def test_each_process_reads_the_rows_its_devices_hold():
  """Shard s of S is a set of B/S rows: the union of the rows of the
  process's devices, the same set for every process reading shard s."""
  sharding, rows = batch_sharding(ici_data=2, ici_tensor=4), 8
  shards = data_shards(sharding, rows, None, hosts_of(2))
  held = {}
  for device, index in sharding.devices_indices_map((rows,)).items():
    shard = shards[hosts_of(2)(device)]
    held.setdefault(shard, set()).update(range(rows)[index[0]])
  assert sorted(held) == [(0, 2), (1, 2)]
  assert [sorted(held[s]) for s in sorted(held)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_hosts_rows_need_not_be_neighbours():
  """On a TPU pod a host's chips sit at several places of the mesh (v5e
  2x2 chips: rows 0, 1, 16, 17 of gemma-2b-v5e's 256):
  make_array_from_process_local_data places its rows there in order."""
  shards = data_shards(batch_sharding(ici_data=8), 8, None, lambda d: d.id % 4)
  assert [shards[h] for h in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_one_process_is_shard_0_of_1():
  assert jax.process_count() == 1
  for mesh in (dict(ici_data=8), dict(ici_data=2, ici_tensor=4)):
    assert data_shard(batch_sharding(**mesh), 8) == (0, 1)


def test_rows_a_pipeline_cannot_feed_are_a_clear_error():
  # Hosts of unequal parts of the batch.
  with pytest.raises(ConfigError, match="not equal, disjoint parts"):
    data_shards(batch_sharding(ici_data=8), 8, None, lambda d: d.id // 5)
  # Overlapping sets.
  overlapping = {0: range(0, 2), 1: range(1, 3), 2: range(2, 4)}
  with pytest.raises(ConfigError, match="not equal, disjoint parts"):
    process_rows(overlapping, lambda d: d, 4)
