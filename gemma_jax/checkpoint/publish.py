"""Publishing a checkpoint directory: whole, finite and new, or not at all.

    publish(directory, {"params": params},
            {"model_config.json": text}, force=force, what="params export")

The one protocol every orbax-tree format of this package writes with
(native, Fisher, LoRA adapter):

  1. refuse to replace an existing `directory` unless `force`;
  2. refuse a tree holding NaN or inf, naming its first such tensor
     (`check_finite`): nothing is written;
  3. locally, write into a hidden temporary sibling; on an object store
     (gs://), which cannot rename, remove the old directory (its JSON files
     first, so it never looks complete) and write in place;
  4. barrier: every process has its target before any of them writes;
  5. every process saves its shards of each tree with orbax;
  6. process 0 writes the JSON files (last: they mark a complete
     directory, and every reader starts from one), then renames;
  7. barrier: nobody returns before the directory is in place.

So `directory` is at every moment absent, the old one, or the whole new one.
Formats written by streaming (safetensors, merge's leaf-by-leaf save) use
`fileio.atomic_directory` and call `check_finite` / `check_finite_leaf`
themselves.

Importing this module also sets how orbax writes a replicated array, for
every orbax save of the package (this protocol, the trainer's checkpoints:
`REPLICA_PARALLEL_MIN_BYTES`).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.linen import meta

from gemma_jax import distributed, fileio
from gemma_jax.checkpoint import layout
from gemma_jax.errors import CheckpointError, ConfigError

# Orbax writes an array that several devices hold whole ("replica-
# parallel"): each replica slices its part on its device and writes it,
# one compiled slice program per shape and replica. For large arrays on a
# pod that spreads the writing over hosts; for small ones it costs more
# than it saves (a tiny model's first save on 8 CPU devices compiles 64
# slice programs: 3.05 s of CPU, against 0.21 s without). Below 1 MiB per
# slice one replica writes the whole array; the files are the same.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _register_array_handler() -> None:
  # orbax warns (absl) that this replaces its default jax.Array handler:
  # that is the point, so not on every import.
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
      jax.Array,
      ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES
      ),
      override=True,
    )
  finally:
    absl.setLevel(level)


_register_array_handler()

# Elements per slice when checking a host array: bounds the boolean
# temporary np.isfinite makes (16 MB).
_CHUNK = 1 << 24


class NonFinite(CheckpointError):
  """A tensor about to be written holds NaN or inf."""


def _inexact(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


def _host_finite(x: np.ndarray, log_probs: bool = False) -> bool:
  flat = np.ravel(x)
  ok = _log_prob_ok if log_probs else np.isfinite
  return all(
    bool(ok(flat[i : i + _CHUNK]).all()) for i in range(0, flat.size, _CHUNK)
  )


def _log_prob_ok(x):
  """A log-probability may be -inf (probability 0), never NaN or +inf."""
  return ~np.isnan(x) & (x != np.inf)


@jax.jit
def _device_finite(leaves):
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def first_nonfinite(tree, log_probs: bool = False) -> str | None:
  """The '/'-path of the first float leaf of `tree` (a nested dict of numpy
  or jax arrays) holding NaN or inf, in the tree's order; None if none.
  `log_probs`: the leaves are log-probabilities, where -inf is allowed
  (host arrays only)."""
  flat = [
    (p, x)
    for p, x in layout.flatten(meta.unbox(tree))
    if _inexact(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)
  ]
  on_device = [(p, x) for p, x in flat if isinstance(x, jax.Array)]
  finite: dict[str, bool] = {}
  if on_device:
    flags = jax.device_get(_device_finite([x for _, x in on_device]))
    finite.update((p, bool(f)) for (p, _), f in zip(on_device, flags))
  for path, x in flat:
    if path not in finite:
      finite[path] = _host_finite(np.asarray(x), log_probs)
    if not finite[path]:
      return path
  return None


def nonfinite_error(directory, path: str, source=None) -> NonFinite:
  """The one line for tensor `path` holding NaN or inf, about to be written
  to `directory`; `source`: the input it comes from, if known."""
  if source is None:
    return NonFinite(
      f"not writing {directory}: tensor {path} holds NaN or inf; nothing "
      f"was written (check the inputs it was computed from)"
    )
  return NonFinite(
    f"not writing {directory}: tensor {path} of {source} holds NaN or inf; "
    f"nothing was written (that checkpoint is not usable: choose another)"
  )


def check_finite(tree, directory, source=None, log_probs=False) -> None:
  """NonFinite naming `directory` and the first non-finite tensor."""
  path = first_nonfinite(tree, log_probs)
  if path is not None:
    raise nonfinite_error(directory, path, source)


def check_finite_leaf(x, path: str, directory, source=None):
  """`x` itself, after checking it (for writers that stream leaves)."""
  dtype = getattr(x, "dtype", None)
  if dtype is not None and _inexact(dtype):
    ok = (
      bool(jax.device_get(_device_finite([x]))[0])
      if isinstance(x, jax.Array)
      else _host_finite(np.asarray(x))
    )
    if not ok:
      raise nonfinite_error(directory, path, source)
  return x


def publish(
  directory,
  trees: dict[str, object],
  files: dict[str, str],
  *,
  force: bool = False,
  what: str = "checkpoint",
) -> None:
  """Writes each of `trees` ({subdirectory: pytree}) with orbax and each of
  `files` ({name: text}, the JSON that marks the directory complete) into
  `directory`, by the protocol of the module docstring. Every process calls
  it with the same arguments; each writes its own shards."""
  directory = epath.Path(fileio.absolute(directory))
  fileio.check_remote(directory, what)
  if directory.exists() and not force:
    raise ConfigError(f"{directory} already exists; pass --force to replace it")
  trees = {name: meta.unbox(tree) for name, tree in trees.items()}
  for tree in trees.values():
    check_finite(tree, directory)
  main = jax.process_index() == 0
  if not fileio.is_local(directory):
    tmp = directory
    if main and directory.exists():
      for name in files:  # not complete from here on
        (directory / name).unlink(missing_ok=True)
      fileio.remove_tree(directory)
  elif main:
    tmp = fileio.fresh_temporary_sibling(directory)
  else:
    tmp = fileio.temporary_sibling(directory)
  distributed.barrier(f"publish_start:{directory.name}")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      for name, tree in trees.items():
        ckptr.save(tmp / name, args=ocp.args.PyTreeSave(tree))
    if main:
      for name, text in files.items():
        (tmp / name).write_text(text)
      if tmp != directory:
        fileio.replace_directory(tmp, directory)
  except BaseException as e:
    if main and tmp != directory:
      fileio.remove_tree(tmp)
    full = fileio.disk_full(e, tmp)
    if full is not None:  # tensorstore's RESOURCE_EXHAUSTED, told as one
      raise full from None
    raise
  distributed.barrier(f"publish_done:{directory.name}")
