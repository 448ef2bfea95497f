"""Which JAX processes hold which rows of the global batch, per pod config.

    JAX_PLATFORMS=cpu python scripts/pod_batch_owners.py

For every configs/pods/*.yaml, on the devices of the TPU topology its header
names (libtpu's topology description, as `gemma-jax compile` uses; each
device knows its host, i.e. its process), lays out the train batch as the
trainer does (the mesh from the config, the batch sharded by the mesh
rules) and prints how many processes hold each row range. More than one
means processes share a batch shard (a tensor axis wider than one host's
chips); they must then be given the same rows, which the input pipeline,
handing process p rows [p*B/P, (p+1)*B/P), does not do.
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

  from gemma_jax.sharding import rules
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
    held = collections.defaultdict(set)  # process -> row ranges
    for device, index in sharding.devices_indices_map((batch, 1)).items():
      rows = index[0].indices(batch)[:2]
      held[device.process_index].add(rows)
    owners = collections.Counter(r for rs in held.values() for r in rs)
    print(
      f"{os.path.basename(path):32s} {len(held):5d} processes, "
      f"{len(owners):5d} row ranges of {batch // len(owners)} rows, held "
      f"by up to {max(owners.values())} processes each"
    )


if __name__ == "__main__":
  main()
