"""Where converted tensors go: host numpy arrays, or their device shards.

The converters (hf, kaggle) read a checkpoint one tensor at a time and write
each into the native tree with `target.set(path, index, value)`, meaning
`leaf[path][index] = value`. Two targets:

    HostTree()              numpy leaves (converting to files)
    DeviceTree(shardings)   jax.Arrays in their sharded layout (training)

A DeviceTree never assembles a leaf on the host: each tensor is cut into the
shards of its region of the leaf, sent to the devices that hold them, and
written in place (`lax.dynamic_update_slice`, the leaf donated). Host memory
is one checkpoint tensor at a time; device memory is the params plus that
tensor. Each process sends only its own devices' shards, so every process of
a multi-host job calls `set` with the same values.
"""

import functools
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma_jax.checkpoint import layout


def _region(index, leaf_ndim: int, value_shape) -> tuple:
  """`index` (ints, then at most one leading slice) -> start of every dim
  and the value's shape with the int-indexed dims kept as size 1."""
  starts, shape = [], []
  for i in index:
    if isinstance(i, slice):
      if i.step not in (None, 1):
        raise ValueError(f"index {index}: strided slices are not supported")
      starts.append(i.start or 0)
      shape.append(None)   # taken from the value below
    else:
      starts.append(int(i))
      shape.append(1)
  rest = list(value_shape)
  full = []
  for s in shape:
    full.append(rest.pop(0) if s is None else 1)
  full += rest
  starts += [0] * (leaf_ndim - len(starts))
  return tuple(starts), tuple(full)


class HostTree:
  """Numpy leaves, created as zeros (in the first value's dtype unless
  `dtype`) when first written."""

  def __init__(self, shapes: dict[str, tuple[int, ...]], dtype=None):
    self._shapes = shapes
    self._dtype = dtype
    self._leaves: dict[str, np.ndarray] = {}

  def set(self, path: str, index: tuple, value) -> None:
    dtype = self._dtype or value.dtype
    if path not in self._leaves:
      if index == () and np.shape(value) == tuple(self._shapes[path]):
        self._leaves[path] = np.asarray(value, dtype)   # whole: no copy
        return
      self._leaves[path] = np.zeros(self._shapes[path], dtype)
    self._leaves[path][index] = value

  def tree(self) -> dict:
    return layout.unflatten(self._leaves)


@functools.lru_cache(maxsize=None)
def _zeros(shape, dtype, sharding):
  return jax.jit(lambda: jax.numpy.zeros(shape, dtype),
                 out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _writer(sharding):
  def write(leaf, piece, starts):
    starts = tuple(starts[i] for i in range(leaf.ndim))
    return jax.lax.dynamic_update_slice(leaf, piece.astype(leaf.dtype),
                                        starts)
  return jax.jit(write, out_shardings=sharding, donate_argnums=0)


def _piece_sharding(sharding: NamedSharding, shape) -> NamedSharding:
  """The leaf's sharding on a region of it: a dimension the region does not
  span evenly over its mesh axes is replicated instead."""
  mesh = sharding.mesh
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  entries = []
  for entry, size in zip(spec, shape):
    axes = () if entry is None else (entry,) if isinstance(entry, str) \
        else tuple(entry)
    ways = math.prod(mesh.shape[a] for a in axes)
    entries.append(entry if size % ways == 0 else None)
  return NamedSharding(mesh, P(*entries))


def _global(value: np.ndarray, sharding) -> jax.Array:
  """A host value every process holds -> a global array (own shards only)."""
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda idx: value[idx])


class DeviceTree:
  """jax.Array leaves in their shardings, filled tensor by tensor.

  shardings: {path: NamedSharding} of every leaf. Leaves start as zeros
  (in `dtype`, or the first value's dtype) when first written.
  """

  def __init__(self, shapes: dict[str, tuple[int, ...]],
               shardings: dict[str, NamedSharding], dtype=None):
    self._shapes = shapes
    self._shardings = shardings
    self._dtype = dtype
    self._leaves: dict[str, jax.Array] = {}

  def set(self, path: str, index: tuple, value) -> None:
    shape, sharding = self._shapes[path], self._shardings[path]
    dtype = np.dtype(self._dtype or value.dtype)
    if path not in self._leaves:
      self._leaves[path] = _zeros(tuple(shape), dtype, sharding)()
    starts, piece_shape = _region(index, len(shape), np.shape(value))
    # Cast on the host: a bfloat16 target sends half the bytes.
    piece = np.asarray(value, dtype).reshape(piece_shape)
    piece = _global(piece, _piece_sharding(sharding, piece_shape))
    replicated = NamedSharding(sharding.mesh, P())
    starts = _global(np.asarray(starts, np.int32), replicated)
    self._leaves[path] = _writer(sharding)(self._leaves[path], piece, starts)

  def tree(self) -> dict:
    return layout.unflatten(self._leaves)


def target(shapes, shardings=None, dtype=None):
  """A DeviceTree when `shardings` (a params-shaped tree of NamedShardings)
  is given, else a HostTree."""
  if shardings is None:
    return HostTree(shapes, dtype)
  return DeviceTree(shapes, dict(layout.flatten(shardings)), dtype)
