"""Load params from any checkpoint format we read, told or detected.

    params = formats.load(path, model_cfg, shardings=program.param_shardings)

Formats (FORMATS): `native` (this project's; `model_config.json`), `hf`
(Hugging Face `config.json` + safetensors), `kaggle` (official Flax/orbax
checkpoint: orbax metadata and no config). With `shardings` every tensor goes
straight into its device shards as it is read, so no random init and no
second copy of the params is ever made (see placement.py).
"""

import contextlib

from etils import epath

from gemma_jax import fileio
from gemma_jax.checkpoint import hf, kaggle, layout, native
from gemma_jax.errors import CheckpointError, GemmaJaxError
from gemma_jax.model.config import ModelConfig

FORMATS = ("native", "hf", "kaggle")
# Files an orbax checkpoint directory holds (any of them).
_ORBAX_FILES = ("_METADATA", "manifest.ocdbt", "checkpoint", "_sharding")


def detect(path) -> str:
  """The format of the checkpoint directory `path` (see FORMATS)."""
  fileio.check_remote(path, "checkpoint")
  p = epath.Path(path)
  if not p.is_dir():
    left = fileio.temporary_sibling(p) if fileio.is_local(p) else None
    if left is not None and left.exists():
      raise CheckpointError(
        f"{path}: no such checkpoint directory; a write of it was "
        f"interrupted ({left.name} is left): export or convert it again"
      )
    raise CheckpointError(f"{path}: no such checkpoint directory")
  if (p / native.CONFIG_FILE).exists():
    return "native"
  if (p / hf.CONFIG).exists() and (
    (p / hf.WEIGHTS).exists() or (p / hf.INDEX).exists()
  ):
    return "hf"
  if any((p / f).exists() for f in _ORBAX_FILES):
    return "kaggle"
  _refuse_incomplete(path, p)
  raise CheckpointError(
    f"{path}: cannot tell its format (no {native.CONFIG_FILE}, no "
    f"{hf.CONFIG} with safetensors, no orbax metadata); name it "
    f"(one of {', '.join(FORMATS)})"
  )


def _refuse_incomplete(path, p: epath.Path) -> None:
  """CheckpointError for a directory that holds part of a known format: a
  write cut short (a directory's JSON marker is written last)."""
  if (p / native.PARAMS_DIR).is_dir():
    missing = native.CONFIG_FILE
  elif (p / hf.CONFIG).exists():
    missing = f"{hf.WEIGHTS} or {hf.INDEX}"
  elif (p / hf.WEIGHTS).exists() or (p / hf.INDEX).exists():
    missing = hf.CONFIG
  else:
    return
  raise CheckpointError(
    f"{path} is incomplete: {missing} is missing (the write of it was cut "
    f"short); export or convert it again"
  )


def first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


@contextlib.contextmanager
def readable(
  path,
  fmt: str,
  what: str | None = "checkpoint",
  fix: str = "check the path, or export or convert it again",
):
  """Turns a library's failure to read checkpoint `path` (safetensors,
  orbax, tensorstore, JSON) into one CheckpointError naming it (after
  `what:` when given) and the fix."""
  name = f"{what}: {path}" if what else f"{path}"
  try:
    yield
  except GemmaJaxError:
    raise
  except OSError as e:
    if e.errno is not None:  # a real OS error (disk, permissions)
      raise
    raise CheckpointError(
      f"{name} is not a readable {fmt} checkpoint ({first_line(e)}); {fix}"
    ) from None
  except Exception as e:  # safetensors/orbax/json raise many
    raise CheckpointError(
      f"{name} is not a readable {fmt} checkpoint "
      f"({type(e).__name__}: {first_line(e)}); {fix}"
    ) from None


def check_native_model(path, stored: ModelConfig, model_cfg: ModelConfig):
  want, found = layout.param_shapes(model_cfg), layout.param_shapes(stored)
  for p, shape in want.items():
    if found.get(p) != shape:
      raise CheckpointError(
        f"{path} holds another model: parameter {p} has shape "
        f"{found.get(p)} there and {shape} in the model config"
      )


def load(
  path, model_cfg: ModelConfig, *, shardings=None, dtype=None, fmt: str = "auto"
) -> dict:
  """Params of `model_cfg` from the checkpoint at `path`.

  shardings: a params-shaped tree of NamedShardings (jax.Arrays placed
    there, each process reading what its devices hold), or None (numpy).
  dtype: the params' dtype (e.g. the model's param_dtype); None keeps the
    stored one.
  fmt: one of FORMATS, or "auto" to detect it.
  """
  fmt = detect(path) if fmt == "auto" else fmt
  if fmt == "native":
    stored = native.load_config(path)
    check_native_model(path, stored, model_cfg)
    params, _ = native.load(path, shardings=shardings, dtype=dtype)
    return params
  if fmt == "hf":
    with readable(path, fmt):
      params, _ = hf.load(
        path,
        model_cfg,
        dtype,
        model_name="the model config",
        shardings=shardings,
      )
    return params
  if fmt == "kaggle":
    with readable(path, fmt):
      return kaggle.load(path, model_cfg, dtype=dtype, shardings=shardings)
  raise CheckpointError(
    f"unknown checkpoint format {fmt!r}; valid choices: {', '.join(FORMATS)}"
  )
