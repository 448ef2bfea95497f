"""This project's own checkpoint: an orbax params tree plus the model config.

    DIR/params/             orbax PyTree checkpoint of the (unboxed) params
    DIR/model_config.json   {"format": ..., "model": configlib.to_dict(cfg)}

Loading needs nothing else. Saving is atomic: everything is written into a
hidden sibling directory that is renamed to DIR only once complete, so DIR is
either absent, the old checkpoint, or the whole new one. On an object store
(gs://), which cannot rename, the old DIR is removed (its config first), the
params are written in place and model_config.json last: it marks a complete
export, and `load` requires it. In a multi-process run every process calls
`save` (orbax writes each process's shards); process 0 writes the config and
does the rename.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.linen import meta

from gemma_jax import configlib, fileio
from gemma_jax.checkpoint import layout, publish
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model.config import ModelConfig

FORMAT = "gemma_jax.native/1"
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save(directory, params, model_cfg: ModelConfig, *, force=False) -> None:
  """Writes `params` (nested dict, arrays or jax.Arrays) and `model_cfg`.

  Refuses to replace an existing `directory` unless `force`, and params of
  other shapes than `model_cfg`'s or holding NaN or inf (checked before
  anything is written; see publish.py).
  """
  params = meta.unbox(params)
  found = {p: tuple(np.shape(x)) for p, x in layout.flatten(params)}
  layout.check_shapes(found, layout.param_shapes(model_cfg), "params")
  config = {"format": FORMAT, "model": configlib.to_dict(model_cfg)}
  publish.publish(
    directory,
    {PARAMS_DIR: params},
    {CONFIG_FILE: json.dumps(config, indent=2) + "\n"},
    force=force,
    what="params export",
  )


def load_config(directory) -> ModelConfig:
  fileio.check_remote(directory, "checkpoint")
  path = epath.Path(directory) / CONFIG_FILE
  if not epath.Path(directory).is_dir():
    raise CheckpointError(
      f"{directory} is not a native gemma_jax checkpoint (not a directory)"
    )
  if not path.exists():
    if (epath.Path(directory) / PARAMS_DIR).is_dir():  # the config is last
      raise CheckpointError(
        f"{directory} is incomplete: {CONFIG_FILE} is missing (the write "
        f"of it was cut short); export or convert it again"
      )
    raise CheckpointError(
      f"{directory} is not a native gemma_jax checkpoint (no {CONFIG_FILE})"
    )
  try:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
      raise ValueError("not a JSON object")
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(
      f"{path} is damaged: not valid JSON ({e}); export "
      f"or convert the checkpoint again"
    ) from None
  if data.get("format") != FORMAT:
    raise CheckpointError(
      f"{path}: unknown format {data.get('format')!r}; expected {FORMAT!r}"
    )
  return configlib.from_dict(ModelConfig, data["model"], "model")


def load(directory, shardings=None, dtype=None) -> tuple[dict, ModelConfig]:
  """Returns (params, model_cfg).

  shardings: None -> numpy arrays on the host; otherwise a pytree of
    jax.sharding.Sharding matching the params (e.g. from the model's logical
    axes): each process reads only its own shards.
  dtype: optional dtype to cast every parameter to while restoring.
  """
  cfg = load_config(directory)
  # orbax finds no tree metadata under a relative path.
  path = epath.Path(fileio.absolute(directory)) / PARAMS_DIR
  check_files(directory, path)
  try:
    return _load(path, cfg, shardings, dtype), cfg
  except (CheckpointError, ConfigError):
    raise
  except Exception as e:  # orbax/tensorstore raise many
    raise CheckpointError(
      f"{directory} is damaged: {_culprit(path, e)}: "
      f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}; "
      f"export or convert it again"
    ) from None


def _culprit(path, error) -> str:
  """The array an orbax/tensorstore error is about."""
  import re

  arrays = [
    p
    for p in re.findall(r"'path': '([^']+)'", str(error))
    if not p.startswith("/")
  ]
  return (
    f"array {arrays[-1].rstrip('/')}"
    if arrays
    else (f"{PARAMS_DIR}/ (array data)")
  )


def check_files(directory, path) -> None:
  """The files orbax reads before any array: present and parseable."""
  meta = path / "_METADATA"
  try:
    tree = json.loads(meta.read_text())
    if not isinstance(tree, dict) or "tree_metadata" not in tree:
      raise ValueError("no tree metadata")
  except FileNotFoundError:
    raise CheckpointError(
      f"{directory} is damaged: {PARAMS_DIR}/_METADATA "
      f"is missing; export or convert it again"
    ) from None
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(
      f"{directory} is damaged: {PARAMS_DIR}/_METADATA "
      f"is not valid ({e}); export or convert it again"
    ) from None
  manifest = path / "manifest.ocdbt"
  if tree.get("use_ocdbt", True) and (
    not manifest.exists() or not manifest.read_bytes()
  ):
    raise CheckpointError(
      f"{directory} is damaged: {PARAMS_DIR}/"
      f"manifest.ocdbt is missing or empty; export or "
      f"convert it again"
    )


def _load(path, cfg, shardings, dtype) -> dict:
  with ocp.PyTreeCheckpointer() as ckptr:
    tree_meta = ckptr.metadata(path).item_metadata.tree
    found = {p: tuple(m.shape) for p, m in layout.flatten(tree_meta)}
    layout.check_shapes(found, layout.param_shapes(cfg), str(path))
    if shardings is None:
      restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype),
        tree_meta,
      )
    else:
      restore_args = jax.tree.map(
        lambda m, s: ocp.ArrayRestoreArgs(
          sharding=s, global_shape=m.shape, dtype=dtype
        ),
        tree_meta,
        meta.unbox(shardings),
      )
    params = ckptr.restore(
      path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )
  return params
