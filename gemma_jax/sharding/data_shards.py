"""Which rows of the global batch each JAX process must read.

A batch array is put on the devices with
`jax.make_array_from_process_local_data(sharding, local_rows)`: every process
passes the rows its own (addressable) devices hold, in the order of their
global index (they need not be neighbours: on a TPU pod a host's 4 chips sit
at 2 or 4 places of the mesh's batch order). When a batch shard spans
several hosts (a tensor or fsdp axis wider than one host's chips), several
processes hold the same rows and must pass the same data (JAX's docstring:
"if any two hosts are replicas, host_local_data should be identical"). So
the input is split into one block of pipeline rows per distinct row set of
the processes, not one per process: `data_shard` derives (this process's
block, the number of blocks) from the batch sharding itself, through its
public `devices_indices_map`. The global batch is the pipeline's rows in
the order the sharding places them; the set of rows is the same for any
mesh."""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gemma_jax.errors import ConfigError


def _rows(index: tuple, global_rows: int) -> range:
  return range(global_rows)[index[0]]


def process_rows(
  device_rows: Mapping[Any, range],
  process_of: Callable[[Any], int],
  global_rows: int,
) -> dict[int, frozenset[int]]:
  """{process: the rows its devices hold} from {device: its rows};
  ConfigError unless the processes' distinct row sets split the batch into
  equal, disjoint parts (what one block of pipeline rows per process can
  fill)."""
  held: dict[int, set[int]] = {}
  for device, rows in device_rows.items():
    held.setdefault(process_of(device), set()).update(rows)
  sets = {p: frozenset(rows) for p, rows in held.items()}
  distinct = set(sets.values())
  sizes = {len(rows) for rows in distinct}
  covered = frozenset().union(*distinct)
  parts = sum(map(len, distinct))
  if len(sizes) > 1 or not parts == len(covered) == global_rows:
    raise ConfigError(
      f"the batch sharding gives the processes {len(distinct)} different "
      f"sets of rows of the {global_rows}-row batch, of sizes "
      f"{sorted(sizes)}, that are not equal, disjoint parts of it; the "
      "input pipeline cannot feed them (change mesh)"
    )
  return sets


def shard_of(
  sets: Mapping[int, frozenset[int]], process: int
) -> tuple[int, int]:
  """(index, count): `process` reads data shard `index` of `count` (the
  distinct row sets in the order of their first row); the processes whose
  devices hold the same rows read the same shard."""
  distinct = sorted(set(sets.values()), key=min)
  return distinct.index(sets[process]), len(distinct)


def data_shards(
  sharding,
  global_rows: int,
  processes: Iterable[int] | None = None,
  process_of: Callable[[Any], int] = lambda d: d.process_index,
) -> dict[int, tuple[int, int]]:
  """{process: (shard index, shard count)} of a batch `sharding` (a
  jax.sharding.Sharding of the rows) over all its devices, for `processes`
  (default: all); `process_of(device)` is its JAX process (its host)."""
  indices = sharding.devices_indices_map((global_rows,))
  device_rows = {d: _rows(i, global_rows) for d, i in indices.items()}
  sets = process_rows(device_rows, process_of, global_rows)
  return {p: shard_of(sets, p) for p in processes or sets}


def data_shard(sharding, global_rows: int) -> tuple[int, int]:
  """(shard index, shard count) of this JAX process under the batch
  `sharding`: what `pipeline_for(cfg, index, count)` takes."""
  import jax

  p = jax.process_index()
  return data_shards(sharding, global_rows, [p])[p]
