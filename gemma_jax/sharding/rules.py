"""Logical axis names -> shardings, from the rules table in MeshConfig.

The model names every parameter dimension ('embed', 'mlp', ...) and every
activation dimension ('act_batch', ...). Flax's logical partitioning turns a
name into mesh axes with `MeshConfig.rules`; this module adds two things flax
does not do:

* `fit`: a dimension whose size is not divisible by its mesh axes is left
  unsharded on the axes that do not divide it (e.g. one MQA kv head on an
  8-way tensor axis). Every such case is recorded, never silent:
  `unsharded_report` lists them and `gemma-jax compile` prints them.
* `zero_spec`: ZeRO-style sharding of optimizer state over the data axis
  (where the parameter itself is replicated over it), on the largest
  dimension that stays divisible.
"""

import contextlib
import math

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax.sharding.config import MeshConfig


def flax_rules(cfg: MeshConfig) -> tuple:
  """MeshConfig.rules in flax's format ((name, axis | tuple | None), ...)."""
  return tuple(
    (name, None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    for name, axes in cfg.rules
  )


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, cfg: MeshConfig):
  """Binds the model's nn.with_logical_constraint calls to `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(cfg)):
    yield


def axes_of(entry) -> tuple[str, ...]:
  """Mesh axes of one PartitionSpec entry (None, a name or a tuple)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def fit(spec: P, shape: tuple[int, ...], mesh) -> tuple[P, list[str]]:
  """Drops trailing mesh axes of a dimension until they divide its size
  (and axes of size 1, which shard nothing).

  Returns the spec and a list of 'dim i: dropped (axes)' notes.
  """
  entries, notes = [], []
  padded = tuple(spec) + (None,) * (len(shape) - len(spec))
  for i, (entry, size) in enumerate(zip(padded, shape)):
    # Size-1 axes shard nothing; leaving them out keeps specs readable.
    axes = [a for a in axes_of(entry) if mesh.shape[a] > 1]
    dropped: list[str] = []
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      dropped.insert(0, axes.pop())
    if dropped:
      notes.append(f"dim {i} (size {size}) not sharded over {tuple(dropped)}")
    entries.append(_entry(tuple(axes)))
  return P(*entries), notes


def zero_spec(
  spec: P, shape: tuple[int, ...], mesh, axes: tuple[str, ...] = ("data",)
) -> P:
  """Adds the unused `axes` to the largest dimension they still divide."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries for a in axes_of(e)}
  extra = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
  if not extra:
    return P(*entries)
  extra_size = math.prod(mesh.shape[a] for a in extra)
  best, best_size = None, 0
  for i, (entry, size) in enumerate(zip(entries, shape)):
    shards = math.prod(mesh.shape[a] for a in axes_of(entry))
    if size % (shards * extra_size) == 0 and size // shards > best_size:
      best, best_size = i, size // shards
  if best is None:
    return P(*entries)
  entries[best] = _entry(axes_of(entries[best]) + extra)
  return P(*entries)


def values(boxed_tree):
  """Strips nn.Partitioned boxes without adding sharding constraints."""
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    boxed_tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def logical_specs(boxed_tree):
  """Tree of logical PartitionSpecs of a tree with nn.Partitioned boxes."""
  return nn.get_partition_spec(boxed_tree)


def mesh_specs(boxed_tree, mesh, cfg: MeshConfig):
  """(tree of fitted mesh PartitionSpecs, {path: notes}) for boxed params."""
  logical = logical_specs(boxed_tree)
  shapes = values(boxed_tree)
  rules = flax_rules(cfg)
  notes = {}

  def one(path, lspec, leaf):
    mspec = nn.logical_to_mesh_axes(tuple(lspec), rules)
    spec, why = fit(mspec, leaf.shape, mesh)
    if why:
      notes[jax.tree_util.keystr(path, simple=True, separator="/")] = why
    return spec

  specs = jax.tree_util.tree_map_with_path(
    one, logical, shapes, is_leaf=lambda x: isinstance(x, P)
  )
  return specs, notes


def named(mesh, spec_tree):
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s),
    spec_tree,
    is_leaf=lambda x: isinstance(x, P),
  )


def batch_spec(cfg: MeshConfig) -> P:
  """Rows of a batch are split over the mesh axes of 'act_batch'."""
  spec = nn.logical_to_mesh_axes(("act_batch",), flax_rules(cfg))
  assert spec is not None  # None only for no dimension names
  return P(spec[0])


def unsharded_report(notes: dict[str, list[str]]) -> list[str]:
  return [f"{path}: {n}" for path, why in sorted(notes.items()) for n in why]
