"""Checks of a run's inputs that need no device: before the compile.

    check_params_source(path, model_cfg, "auto", "checkpoint.init_from")
    check_fisher(path, model_cfg, "continual.fisher")
    check_record_files(dump, {name: records}, record_bytes, "distill.dump")

Each reads only what describes the arrays (configs, orbax tree metadata,
safetensors headers, ArrayRecord footers and the first and last record), so
it takes seconds even for a large checkpoint, and fails in one line naming
the file and the fix. A gs:// path is first checked with
fileio.check_remote (seconds, not the clients' minutes of retries). A
training run calls them before its program is built: for its init_from
(gemma_jax.train.start.check_inputs) and for each feature's inputs (the
features' `check_inputs`).
"""

import json

from etils import epath

from gemma_jax import fileio
from gemma_jax.checkpoint import fisher as fisher_store
from gemma_jax.checkpoint import (
  formats,
  hf,
  layout,
  native,
  quantized,
  safetensors_io,
)
from gemma_jax.errors import CheckpointError, DataError
from gemma_jax.model.config import ModelConfig


def check_params_source(
  path, model_cfg: ModelConfig | None, fmt: str = "auto", what: str = "params"
) -> str:
  """Checks that `path` holds complete, readable params (of `model_cfg`,
  when given) in format `fmt` ("auto": detected); returns the format. A
  training run's directory ("run") is only checked to be reachable."""
  fileio.check_remote(path, what)
  if fmt == "run" or (fmt == "auto" and _is_run_dir(path)):
    return "run"  # a training run: its checkpointer checks it as it reads
  if quantized.is_quantized(path):
    quantized.load_config(path)
    return "quantized"
  fmt = formats.detect(path) if fmt == "auto" else fmt
  with formats.readable(path, fmt, what):
    if fmt == "native":
      _check_native(path, model_cfg)
    elif fmt == "hf":
      _check_hf(path, model_cfg)
    elif fmt == "kaggle":
      _check_orbax_metadata(path)
  return fmt


def _check_native(path, model_cfg) -> None:
  import orbax.checkpoint as ocp

  # Another model's params are named by the caller (train's
  # check_init_from, formats.load); here: complete and self-consistent.
  del model_cfg
  stored = native.load_config(path)
  tree_dir = epath.Path(fileio.absolute(path)) / native.PARAMS_DIR
  native.check_files(path, tree_dir)
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(tree_dir).item_metadata.tree
  found = {p: tuple(m.shape) for p, m in layout.flatten(tree)}
  layout.check_shapes(found, layout.param_shapes(stored), str(path))


def _check_hf(path, model_cfg) -> None:
  """config.json agrees with `model_cfg`; every safetensors file (or the
  index and its shards) is there, with readable headers of the right
  shapes."""
  directory = epath.Path(path)
  cfg = hf.load_config(directory, model_cfg)
  files = hf.tensor_files(directory)
  found = {}
  for file in sorted(set(files.values())):
    if not file.exists():
      raise CheckpointError(
        f"{path} is incomplete: {file.name}, named in {hf.INDEX}, is "
        f"missing; download or convert it again"
      )
    found.update(safetensors_io.shapes(file))
  found.pop(hf.TIED_HEAD, None)
  expected = {e.hf_name: e.hf_shape for e in hf.tensor_map(cfg)}
  layout.check_shapes(found, expected, str(path))


def _check_orbax_metadata(path) -> None:
  import orbax.checkpoint as ocp

  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.metadata(epath.Path(fileio.absolute(path)))


def check_fisher(path, model_cfg: ModelConfig, what: str) -> None:
  """A Fisher checkpoint of `model_cfg`'s shapes, readable."""
  import orbax.checkpoint as ocp

  fileio.check_remote(path, what)
  if not epath.Path(path).is_dir():
    raise CheckpointError(
      f"{what}: {path} is not a directory; make a Fisher with "
      f"`gemma-jax fisher`"
    )
  with formats.readable(path, "Fisher", what):
    fisher_store.load_meta(path)
    tree_dir = epath.Path(fileio.absolute(path)) / fisher_store.TREE_DIR
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.metadata(tree_dir).item_metadata.tree
    found = {p: tuple(m.shape) for p, m in layout.flatten(tree)}
  fisher_store.check_shapes(found, model_cfg, f"{what} {path}")


def check_record_files(
  directory, files: dict[str, int], record_bytes: int, what: str
) -> None:
  """Each ArrayRecord file of `files` ({name: records}) under `directory`
  is there and whole: it opens, holds that many records, and its first
  and last records are `record_bytes` long (the config's shapes)."""
  from array_record.python.array_record_module import ArrayRecordReader

  fileio.check_remote(directory, what)
  for name, count in files.items():
    path = epath.Path(directory) / name
    if not path.exists():
      raise DataError(
        f"{what} {directory} is incomplete: {name} is missing; write it "
        f"again with `gemma-jax distill dump` (it resumes)"
      )
    try:
      reader = ArrayRecordReader(str(path))
      try:
        found = reader.num_records()
        ends = reader.read([0, found - 1]) if found == count else []
      finally:
        reader.close()
    except Exception as e:  # array_record raises RuntimeError/ValueError
      raise DataError(
        f"{what}: {path} is damaged ({type(e).__name__}: "
        f"{formats.first_line(e)}); remove it and run `gemma-jax distill "
        f"dump` again to rewrite it"
      ) from None
    if found != count:
      raise DataError(
        f"{what}: {path} holds {found} records, the manifest {count}; "
        f"remove it and run `gemma-jax distill dump` again to rewrite it"
      )
    for record in ends:
      if len(record) != record_bytes:
        raise DataError(
          f"{what}: {path} holds records of {len(record)} bytes; this "
          f"config (data.seq_len, distill.topk) needs {record_bytes}: "
          f"dump again for this config"
        )


def check_json_file(path, what: str) -> dict:
  """A JSON object file; DataError naming it otherwise."""
  try:
    data = json.loads(epath.Path(path).read_text())
  except FileNotFoundError:
    raise DataError(f"{what}: {path} is missing") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(
      f"{what}: {path} is damaged: not valid JSON ({e})"
    ) from None
  if not isinstance(data, dict):
    raise DataError(f"{what}: {path} is damaged: not a JSON object")
  return data


def _is_run_dir(path) -> bool:
  return (epath.Path(path) / "checkpoints").is_dir()
