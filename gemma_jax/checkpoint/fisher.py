"""The Fisher checkpoint: a params-shaped float32 tree plus what made it.

    DIR/fisher/        orbax PyTree checkpoint, float32, the params' tree
    DIR/fisher.json    {"format", "model", "base", "data", "num_examples",
                        "estimator", "stats", ...} (see gemma-jax fisher)

`load` restores it straight into a sharding (one process reads its shards)
after checking it belongs to the model: a Fisher of another model shape is
refused with the first mismatched parameter path and both shapes. Writing
is atomic like the native format's.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gemma_jax import configlib
from gemma_jax.checkpoint import layout, publish
from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import ModelConfig

FORMAT = "gemma_jax.fisher/1"
META_FILE = "fisher.json"
TREE_DIR = "fisher"


def save(
  directory, fisher, model_cfg: ModelConfig, meta: dict, *, force: bool = False
) -> None:
  """Writes `fisher` (params-shaped, float32) and `meta` (JSON-able). Every
  process calls it; process 0 writes the metadata and renames (publish.py:
  never over an existing directory unless `force`, never a NaN or inf)."""
  meta = {"format": FORMAT, "model": configlib.to_dict(model_cfg), **meta}
  publish.publish(
    directory,
    {TREE_DIR: fisher},
    {META_FILE: json.dumps(meta, indent=2) + "\n"},
    force=force,
    what="Fisher",
  )


def load_meta(directory) -> dict:
  path = epath.Path(directory) / META_FILE
  if not path.exists():
    raise CheckpointError(
      f"{directory} is not a Fisher checkpoint (no "
      f"{META_FILE}); make one with `gemma-jax fisher`"
    )
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT:
    raise CheckpointError(
      f"{path}: unknown format {meta.get('format')!r}; expected {FORMAT!r}"
    )
  return meta


def check_shapes(found: dict, model_cfg: ModelConfig, source: str) -> None:
  """CheckpointError naming the first parameter whose shape differs."""
  for path, shape in layout.param_shapes(model_cfg).items():
    if path not in found:
      raise CheckpointError(
        f"{source} has no entry for parameter {path} "
        f"{shape}: it is the Fisher of another model; "
        f"estimate it for this one (gemma-jax fisher)"
      )
    if tuple(found[path]) != tuple(shape):
      raise CheckpointError(
        f"{source} is the Fisher of another model shape: parameter {path} "
        f"is {tuple(found[path])} there and {tuple(shape)} in this model; "
        f"estimate it for this model (gemma-jax fisher)"
      )
  extra = sorted(set(found) - set(layout.param_shapes(model_cfg)))
  if extra:
    raise CheckpointError(
      f"{source} has entry {extra[0]}, which this model "
      f"does not have: it is the Fisher of another model"
    )


def load(directory, model_cfg: ModelConfig, shardings=None) -> dict:
  """The float32 Fisher tree: numpy, or jax.Arrays placed by `shardings`
  (a params-shaped tree). Values are not checked here (see
  gemma_jax.features.ewc)."""
  load_meta(directory)
  path = epath.Path(directory).absolute() / TREE_DIR
  with ocp.PyTreeCheckpointer() as ckptr:
    tree_meta = ckptr.metadata(path).item_metadata.tree
    found = {p: tuple(m.shape) for p, m in layout.flatten(tree_meta)}
    check_shapes(found, model_cfg, str(directory))
    if shardings is None:
      args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.float32),
        tree_meta,
      )
    else:
      args = jax.tree.map(
        lambda m, s: ocp.ArrayRestoreArgs(
          sharding=s, global_shape=m.shape, dtype=np.float32
        ),
        tree_meta,
        shardings,
      )
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
