"""LoRA adapters on their own: an orbax tree of the adapters plus configs.

    DIR/adapter/             orbax PyTree checkpoint of the `lora_*` leaves
    DIR/adapter_config.json  {"format", "model": the base model config with
                              its `lora` section, "base": {"path",
                              "fingerprint"} of the base it was trained on}

A few MB next to a base of many GB. `load` checks the adapter against the
base it is meant for and names the first parameter whose shape differs.
Saving is atomic like `native.save`.
"""

import dataclasses
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.linen import meta

from gemma_jax import configlib
from gemma_jax.checkpoint import layout, publish
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model import lora as lora_lib
from gemma_jax.model.config import ModelConfig

FORMAT = "gemma_jax.lora_adapter/1"
CONFIG_FILE = "adapter_config.json"
PARAMS_DIR = "adapter"


def save(
  directory,
  adapters,
  model_cfg: ModelConfig,
  base: dict | None = None,
  *,
  force: bool = False,
) -> None:
  """Writes the adapters of a model with `model_cfg` (which has `lora`).

  base: JSON-able facts about the base (see gemma_jax.features.lora).
  """
  adapters = meta.unbox(adapters)
  found = {p: tuple(np.shape(x)) for p, x in layout.flatten(adapters)}
  layout.check_shapes(found, lora_lib.adapter_paths(model_cfg), "adapters")
  config = {
    "format": FORMAT,
    "model": configlib.to_dict(model_cfg),
    "base": base or {},
  }
  publish.publish(
    directory,
    {PARAMS_DIR: adapters},
    {CONFIG_FILE: json.dumps(config, indent=2) + "\n"},
    force=force,
    what="LoRA adapter",
  )


def read_config(directory) -> tuple[ModelConfig, dict]:
  """(the model config the adapter was trained with, its base facts)."""
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(
      f"{directory} is not a LoRA adapter (no {CONFIG_FILE})"
    )
  data = json.loads(path.read_text())
  if data.get("format") != FORMAT:
    raise CheckpointError(
      f"{path}: unknown format {data.get('format')!r}; expected {FORMAT!r}"
    )
  cfg = configlib.from_dict(ModelConfig, data["model"], "model")
  if cfg.lora is None:
    raise CheckpointError(f"{path}: the model config has no lora section")
  return cfg, data.get("base", {})


def check_fits(
  found: dict[str, tuple[int, ...]],
  base_cfg: ModelConfig,
  lora: lora_lib.LoraConfig,
  source: str,
) -> None:
  """CheckpointError naming the first adapter parameter that does not fit
  a base with `base_cfg`."""
  expected = lora_lib.adapter_paths(dataclasses.replace(base_cfg, lora=lora))
  for path, shape in expected.items():
    if path not in found:
      raise CheckpointError(
        f"adapter {source} does not fit the base model: it has no {path}"
      )
    if tuple(found[path]) != tuple(shape):
      raise CheckpointError(
        f"adapter {source} does not fit the base model: {path} has shape "
        f"{tuple(found[path])}, the base needs {tuple(shape)}"
      )
  extra = sorted(set(found) - set(expected))
  if extra:
    raise CheckpointError(
      f"adapter {source} does not fit the base model: unexpected {extra[0]}"
    )


def load(directory, base_cfg: ModelConfig | None = None, shardings=None):
  """Returns (adapters, model config with `lora`, base facts).

  base_cfg: the base model the adapters go onto (default: the one they were
    trained with); its config decides the returned model config, with the
    adapter's `lora` section.
  shardings: None -> numpy arrays; else a tree of shardings like the
    adapters.
  """
  trained_cfg, base = read_config(directory)
  try:
    cfg = dataclasses.replace(base_cfg or trained_cfg, lora=trained_cfg.lora)
  except ConfigError as e:  # e.g. a rank larger than this base allows
    raise CheckpointError(
      f"adapter {directory} does not fit the base model: {e}"
    ) from None
  path = epath.Path(directory).absolute() / PARAMS_DIR
  with ocp.PyTreeCheckpointer() as ckptr:
    tree_meta = ckptr.metadata(path).item_metadata.tree
    found = {p: tuple(m.shape) for p, m in layout.flatten(tree_meta)}
    assert cfg.lora is not None  # read_config refuses a config without
    check_fits(found, cfg, cfg.lora, str(directory))
    if shardings is None:
      restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta
      )
    else:
      restore_args = jax.tree.map(
        lambda m, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=m.shape),
        tree_meta,
        meta.unbox(shardings),
      )
    adapters = ckptr.restore(
      path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )
  return adapters, cfg, base
