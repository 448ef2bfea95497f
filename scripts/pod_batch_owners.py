"""Which rows of the global batch each JAX process reads, per pod config.

    JAX_PLATFORMS=cpu python scripts/pod_batch_owners.py

For every configs/pods/*.yaml, on the devices of the TPU topology its header
names (libtpu's topology description, as `gemma-jax compile` uses; each
device knows its host, i.e. its process), lays out the train batch as the
trainer does (the mesh from the config, the batch sharded by the mesh
rules) and prints the data shards the trainer feeds
(gemma_jax.sharding.data_shards, what `gemma-jax train` uses): their count,
rows each, and how many processes read each one (more than one where a
batch shard spans hosts: a tensor axis wider than one host's chips).
"""

import collections
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.sharding import NamedSharding

  from gemma_jax.errors import ConfigError
  from gemma_jax.sharding import rules
  from gemma_jax.sharding.data_shards import data_shards
  from gemma_jax.sharding.mesh import make_mesh
  from gemma_jax.train import aot
  from gemma_jax.train.config import load_config

  for path in sorted(glob.glob(os.path.join(ROOT, "configs/pods/*.yaml"))):
    with open(path) as f:
      launch = re.search(r"--topology (\S+)(?: --slices (\d+))?", f.read())
    assert launch, f"{path}: its header names no --topology"
    cfg = load_config(path)
    mesh = make_mesh(
      cfg.mesh, aot.topology_devices(launch[1], int(launch[2] or 1))
    )
    batch = cfg.train.batch_size
    sharding = NamedSharding(mesh, rules.batch_spec(cfg.mesh))
    name = f"{os.path.basename(path):32s}"
    try:
      shards = data_shards(sharding, batch)
    except ConfigError as e:
      print(f"{name} error: {e}")
      continue
    count = next(iter(shards.values()))[1]
    readers = collections.Counter(shards.values())
    print(
      f"{name} {len(shards):5d} processes, {count:5d} data shards of "
      f"{batch // count} rows, each read by {max(readers.values())} "
      "processes"
    )


if __name__ == "__main__":
  main()
