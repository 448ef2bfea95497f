"""Quantized checkpoints: integer weights and their scales in one safetensors.

    DIR/model_config.json   {"format": "gemma_jax.quantized/1", "model": the
                             model config; its `quant` section has
                             weights: int and says bits, block_size, targets}
    DIR/model.safetensors   one tensor per leaf of the native tree, named by
                             its '/'-path (gemma_jax.checkpoint.layout):

  <module>/w (or embedder/embedding) of a quantized group:
      int4: U8 [..., X / 2], two values per byte along the last axis: value
            2i in the low nibble, 2i + 1 in the high nibble, each a 4-bit
            two's complement number in [-7, 7];
      int8: I8 of the weight's shape, values in [-127, 127].
  <module>/scale (embedder/embedding_scale): F32, the weight's shape with the
      fan-in axes set to 1 (per channel) or the blocked axis divided by the
      block size (per block), as gemma_jax.model.quant describes; the
      weight is `value * scale` repeated over each block.
  every other leaf (norm scales, unquantized groups): as stored (F32/BF16).

Layer weights keep their leading layer axis L. The file reads with any
safetensors reader; `load` returns the tree a `weights: int` model applies
(jnp int4/int8 arrays), which `gemma-jax score` runs directly.
"""

import functools
import json
import os

import jax
import ml_dtypes
import numpy as np
from etils import epath

from gemma_jax import configlib, fileio
from gemma_jax.checkpoint import layout, publish, safetensors_io
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model import quant as quant_lib
from gemma_jax.model.config import ModelConfig

FORMAT = "gemma_jax.quantized/1"
CONFIG_FILE = "model_config.json"
WEIGHTS = "model.safetensors"


def pack_int4(values: np.ndarray) -> np.ndarray:
  """int values in [-8, 7] [..., X] (X even) -> uint8 [..., X / 2]."""
  nibbles = np.asarray(values).astype(np.int8).astype(np.uint8) & 0x0F
  return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
  """Inverse of `pack_int4`: ml_dtypes.int4 [..., 2 * X]."""
  packed = np.asarray(packed, np.uint8)
  low = (packed & 0x0F).astype(np.int8)
  high = (packed >> 4).astype(np.int8)
  out = np.stack([low, high], axis=-1).reshape((*packed.shape[:-1], -1))
  out = np.where(out > 7, out - 16, out).astype(np.int8)
  return out.astype(ml_dtypes.int4)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{path: stored shape} of every tensor in the file."""
  shapes = layout.param_shapes(cfg)
  assert cfg.quant is not None  # a quantized checkpoint's config has one
  for path, (in_axis, scale_path) in quant_lib.quantized_leaves(cfg).items():
    shape = shapes[path]
    shapes[scale_path] = quant_lib.scale_shape(
      shape, in_axis, cfg.quant.block_size
    )
    if cfg.quant.bits == 4:
      shapes[path] = (*shape[:-1], shape[-1] // 2)
  return shapes


def save(directory, params, cfg: ModelConfig, *, force: bool = False) -> int:
  """Writes the params of a `quant.weights: int` model; returns the bytes
  of the weights file. Tensors are fetched and written one at a time."""
  if cfg.quant is None or cfg.quant.weights != "int":
    raise ConfigError(
      "a quantized checkpoint needs model.quant with "
      "weights: int (see gemma_jax.model.quant)"
    )
  fileio.check_remote(directory, "output")
  directory = epath.Path(fileio.absolute(directory))
  if directory.exists() and not force:
    raise ConfigError(f"{directory} already exists; pass --force to replace it")
  leaves = dict(layout.flatten(params))
  quantized = quant_lib.quantized_leaves(cfg)
  expected = expected_shapes(cfg)
  tensors = []
  dtype: np.dtype
  for path, shape in expected.items():
    if path not in leaves:
      raise CheckpointError(f"params have no {path}")
    leaf = leaves[path]
    if path in quantized and cfg.quant.bits == 4:
      make = lambda x=leaf: pack_int4(np.asarray(jax.device_get(x)))
      dtype = np.dtype(np.uint8)
    elif path in quantized:
      make = lambda x=leaf: np.asarray(jax.device_get(x)).astype(np.int8)
      dtype = np.dtype(np.int8)
    else:  # float: scales, norms, what is not quantized
      dtype = np.dtype(leaf.dtype)
      make = functools.partial(_finite_host, leaf, path, directory)
    tensors.append(safetensors_io.Tensor(path, shape, dtype, make))
  with fileio.atomic_directory(directory, overwrite=force) as tmp:
    safetensors_io.write(tmp / WEIGHTS, tensors, {"format": FORMAT})
    config = {"format": FORMAT, "model": configlib.to_dict(cfg)}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  return os.path.getsize(directory / WEIGHTS)


def _finite_host(x, path: str, directory) -> np.ndarray:
  return publish.check_finite_leaf(
    np.asarray(jax.device_get(x)), path, directory
  )


def is_quantized(directory) -> bool:
  fileio.check_remote(directory, "checkpoint")
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    return False
  return json.loads(path.read_text()).get("format") == FORMAT


def load_config(directory) -> ModelConfig:
  path = epath.Path(directory) / CONFIG_FILE
  if not is_quantized(directory):
    raise CheckpointError(
      f"{directory} is not a quantized gemma_jax "
      f"checkpoint (no {CONFIG_FILE} of format {FORMAT})"
    )
  cfg = configlib.from_dict(
    ModelConfig, json.loads(path.read_text())["model"], "model"
  )
  if cfg.quant is None or cfg.quant.weights != "int":
    raise CheckpointError(
      f"{path}: its model config has no quant section "
      f"with weights: int; write it again with "
      f"gemma-jax quantize"
    )
  return cfg


def load(directory, shardings=None) -> tuple[dict, ModelConfig]:
  """Returns (params of the `weights: int` model, its config).

  shardings: None -> numpy arrays; else a tree of jax shardings like the
  params (`jax.device_put` from this host).
  """
  cfg = load_config(directory)
  assert cfg.quant is not None  # load_config refuses a config without
  path = epath.Path(directory) / WEIGHTS
  found = safetensors_io.shapes(path)
  layout.check_shapes(found, expected_shapes(cfg), str(path))
  quantized = quant_lib.quantized_leaves(cfg)
  flat = {}
  for name, value in safetensors_io.read(path, list(found)):
    if name in quantized:
      value = (
        unpack_int4(value) if cfg.quant.bits == 4 else value.astype(np.int8)
      )
    flat[name] = value
  params = layout.unflatten(flat)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return params, cfg
