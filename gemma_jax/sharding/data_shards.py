"""Which rows of the global batch each JAX process must read.

A batch array is put on the devices with
`jax.make_array_from_process_local_data(sharding, local_rows)`: every process
passes the rows its own (addressable) devices hold. When a batch shard spans
several hosts (a tensor or fsdp axis wider than one host's chips), several
processes hold the same rows and must read the same data. So the input is
split into one block per distinct row range of the processes, not one per
process: `data_shard` derives (this process's block, the number of blocks)
from the batch sharding itself, through its public `devices_indices_map`.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gemma_jax.errors import ConfigError


def _rows(index: tuple, global_rows: int) -> tuple[int, int]:
  start, stop, step = index[0].indices(global_rows)
  assert step == 1, index
  return start, stop


def process_row_blocks(
  device_rows: Mapping[Any, tuple[int, int]],
  process_of: Callable[[Any], int],
  global_rows: int,
) -> dict[int, tuple[int, int]]:
  """{process: its contiguous row range [start, stop)} from {device: its
  rows}; ConfigError if a process's devices need rows that are not one
  block, or the processes' blocks do not tile the batch in equal parts."""
  held: dict[int, set[tuple[int, int]]] = {}
  for device, rows in device_rows.items():
    held.setdefault(process_of(device), set()).add(rows)
  blocks = {}
  for process, ranges in held.items():
    ordered = sorted(ranges)
    start, stop = ordered[0]
    for a, b in ordered[1:]:
      if a > stop:
        raise ConfigError(
          f"the batch sharding gives process {process} the rows "
          f"{ordered}, not one contiguous block; the input pipeline feeds "
          "each process one block: change mesh so that a host's chips hold "
          "neighbouring rows"
        )
      stop = max(stop, b)
    blocks[process] = (start, stop)
  _check_tiling(sorted(set(blocks.values())), global_rows)
  return blocks


def _check_tiling(blocks: list[tuple[int, int]], global_rows: int) -> None:
  size = blocks[0][1] - blocks[0][0]
  expected = [(i * size, (i + 1) * size) for i in range(len(blocks))]
  if blocks != expected or len(blocks) * size != global_rows:
    raise ConfigError(
      f"the processes' row blocks {blocks} of the {global_rows}-row batch "
      "are not equal, disjoint parts; the input pipeline cannot feed them"
    )


def shard_of(
  blocks: Mapping[int, tuple[int, int]], process: int
) -> tuple[int, int]:
  """(index, count): `process` reads data shard `index` of `count`; the
  processes whose devices hold the same rows read the same shard."""
  distinct = sorted(set(blocks.values()))
  return distinct.index(blocks[process]), len(distinct)


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
  blocks = process_row_blocks(device_rows, process_of, global_rows)
  return {p: shard_of(blocks, p) for p in processes or blocks}


def data_shard(sharding, global_rows: int) -> tuple[int, int]:
  """(shard index, shard count) of this JAX process under the batch
  `sharding`: what `pipeline_for(cfg, index, count)` takes."""
  import jax

  p = jax.process_index()
  return data_shards(sharding, global_rows, [p])[p]
