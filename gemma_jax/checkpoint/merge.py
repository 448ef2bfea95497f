"""Merging native checkpoints of one model, streamed parameter by parameter.

    recipe = Recipe("linear", weights=(0.5, 0.5))
    merge(["ft_a", "ft_b"], "merged", recipe)
    merge(["ft_a", "ft_b"], "warp", Recipe("slerp", t=0.5, eta=0.3),
          base="sft")

Methods (math in `merge_math`, float32, one tensor at a time):
  linear  without a base: sum_i w_i theta_i, weights summing to 1 (or
          `normalize` to divide them by their sum); equal weights by default.
          With a base: base + sum_i w_i (theta_i - base), task arithmetic,
          weights free.
  slerp   two inputs and a base: base + slerp(theta_a - base, theta_b - base,
          t), WARP's spherical interpolation of task vectors.
With a base, either result can then be moved toward it (WARP's LITI):
          theta = base + eta (theta_merged - base), eta in [0, 1].

A "tensor" for SLERP's angle is one Hugging Face weight matrix: one layer of
a stacked 'layers/...' leaf, and k/v (kv_einsum) and gate/up (gating_einsum)
separately, as mergekit sees them; the embedding and final norm are one
tensor each.

Memory: one leaf is restored at a time from each input (orbax partial
restore), merged tensor by tensor in float32 and written with orbax's partial
save, so the peak is about one leaf per input plus the output leaf and the
writer's buffer of it, not whole models. The largest leaf is the stacked MLP
gating weight: 45% of gemma2-2b's parameters, 57% of gemma2-27b's.
"""

import dataclasses
import json
import math
import shutil
from collections.abc import Iterator, Sequence

import numpy as np
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1
from etils import epath

from gemma_jax import configlib, fileio
from gemma_jax.checkpoint import hf, layout, merge_math, native, publish
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model.config import EXECUTION_FIELDS, ModelConfig

METHODS = ("linear", "slerp")
SUM_TOLERANCE = 1e-6
# ModelConfig fields that do not change what the weights mean.
_NON_ARCH_FIELDS = ("name", "param_dtype", "dtype", *EXECUTION_FIELDS)
# Leaves whose axis 1 stacks two HF tensors (k/v, gate/up).
_PAIRED = ("layers/attn/kv_einsum/w", "layers/mlp/gating_einsum/w")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to merge. `weights`: linear, one per input (None: equal); `t`:
  slerp's position from input a (0) to b (1); `eta`: LITI toward the base."""

  method: str = "linear"
  weights: tuple[float, ...] | None = None
  t: float = 0.5
  eta: float = 1.0
  normalize: bool = False


def resolve(recipe: Recipe, num_inputs: int, has_base: bool) -> Recipe:
  """The recipe with its weights filled in; ConfigError if it is invalid."""
  if recipe.method not in METHODS:
    raise ConfigError(
      f"--method: unknown {recipe.method!r}; valid: {', '.join(METHODS)}"
    )
  if not 0.0 <= recipe.eta <= 1.0:
    raise ConfigError(f"--eta must be in [0, 1], got {recipe.eta}")
  _check_finite_numbers(recipe)
  if recipe.eta != 1.0 and not has_base:
    raise ConfigError(
      "--eta interpolates toward a base checkpoint: pass --base"
    )
  if recipe.method == "slerp":
    if num_inputs != 2 or not has_base:
      raise ConfigError(
        f"slerp merges exactly 2 checkpoints relative to "
        f"--base; got {num_inputs} and "
        f"{'a' if has_base else 'no'} base"
      )
    if recipe.weights is not None:
      raise ConfigError("--weights is for --method linear; slerp takes --t")
    if not 0.0 <= recipe.t <= 1.0:
      raise ConfigError(f"--t must be in [0, 1], got {recipe.t}")
    return recipe
  if num_inputs < (1 if has_base else 2):
    raise ConfigError(
      "linear merging needs at least 2 checkpoints (or 1 and --base)"
    )
  weights = recipe.weights or (1.0 / num_inputs,) * num_inputs
  if len(weights) != num_inputs:
    raise ConfigError(
      f"--weights: {len(weights)} weights for {num_inputs} "
      "checkpoints; give one per checkpoint"
    )
  total = math.fsum(weights)
  if recipe.normalize:
    if abs(total) < SUM_TOLERANCE:
      raise ConfigError(
        f"--normalize: the weights sum to {total:g}; cannot divide by it"
      )
    weights = tuple(w / total for w in weights)
  elif not has_base and abs(total - 1.0) > SUM_TOLERANCE:
    raise ConfigError(
      f"--weights sum to {total:g}; without --base they must "
      "sum to 1 (pass --normalize to divide them by their "
      "sum)"
    )
  return dataclasses.replace(recipe, weights=tuple(map(float, weights)))


def _check_finite_numbers(recipe: Recipe) -> None:
  """NaN passes every range and sum check (each comparison is False): refuse
  it first, with or without a base."""
  named = [("--t", recipe.t), ("--eta", recipe.eta)]
  named += [("--weights", w) for w in recipe.weights or ()]
  for flag, value in named:
    if not math.isfinite(value):
      raise ConfigError(f"{flag}: must be a finite number, got {value}")


def tensor_units(path: str, shape: tuple[int, ...]) -> Iterator[tuple]:
  """Indices of `path`'s HF-sized tensors: () for a whole leaf, (l,) per
  layer, (l, j) for the paired k/v and gate/up halves."""
  if not path.startswith("layers/"):
    yield ()
    return
  for i in range(shape[0]):
    if path in _PAIRED:
      yield from ((i, j) for j in range(shape[1]))
    else:
      yield (i,)


def merge_into(
  out: np.ndarray,
  recipe: Recipe,
  tensors: Sequence[np.ndarray],
  base: np.ndarray | None,
) -> None:
  """Writes one merged tensor into `out` (contiguous, any dtype), a chunk
  at a time, so float32 temporaries stay chunk-sized (`recipe` resolved)."""
  f32, t = merge_math.as_f32, recipe.t
  if not out.flags.c_contiguous:
    raise ValueError(
      "merge_into writes through a flat view: `out` must be C-contiguous"
    )
  flat = out.reshape(-1)
  if recipe.method == "slerp":

    def task_vectors():
      for ca, cb, cbase in merge_math.chunks(*tensors, base):
        yield f32(ca) - f32(cbase), f32(cb) - f32(cbase)

    coefficients = merge_math.slerp_coefficients(task_vectors, t)
  else:
    # resolve() fills in a linear recipe's weights.
    assert recipe.weights is not None, "merge_into takes a resolved recipe"
    weights = recipe.weights
  inputs = merge_math.chunks(*tensors, *(() if base is None else (base,)))
  start = 0
  for parts in inputs:
    anchor = f32(parts[-1] if base is not None else parts[0])
    if recipe.method == "slerp":
      delta = merge_math.combine(
        coefficients, f32(parts[0]) - anchor, f32(parts[1]) - anchor, t
      )
    elif base is None:  # the anchor is x_1: its own term is zero
      delta = merge_math.weighted_delta(parts[1:], weights[1:], anchor)
    else:
      delta = merge_math.weighted_delta(parts[:-1], weights, anchor)
    if recipe.eta != 1.0:
      delta *= np.float32(recipe.eta)
    flat[start : start + anchor.size] = anchor + delta
    start += anchor.size


class _Reader:
  """One native checkpoint, read a leaf at a time."""

  def __init__(self, directory):
    self.name = str(directory)
    self.cfg = native.load_config(directory)
    self.path = epath.Path(directory).absolute() / native.PARAMS_DIR
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.metadata(self.path).item_metadata.tree
    self.meta = dict(layout.flatten(tree))
    self.shapes = {p: tuple(m.shape) for p, m in self.meta.items()}
    layout.check_shapes(
      self.shapes, layout.param_shapes(self.cfg), str(self.path)
    )
    self._ckptr = ocp.PyTreeCheckpointer()

  def dtype(self, path: str) -> np.dtype:
    return np.dtype(self.meta[path].dtype)

  def read(self, path: str) -> np.ndarray:
    item = layout.unflatten({path: self.meta[path]})
    args = layout.unflatten({path: ocp.RestoreArgs(restore_type=np.ndarray)})
    tree = self._ckptr.restore(
      self.path,
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True
      ),
    )
    return dict(layout.flatten(tree))[path]

  def close(self):
    self._ckptr.close()


def _check_same_model(first: _Reader, other: _Reader) -> None:
  diffs = [
    f"{f.name} {getattr(first.cfg, f.name)!r} vs {getattr(other.cfg, f.name)!r}"
    for f in dataclasses.fields(ModelConfig)
    if f.name not in _NON_ARCH_FIELDS
    and getattr(first.cfg, f.name) != getattr(other.cfg, f.name)
  ]
  bad = next(
    (
      p
      for p in layout.param_shapes(first.cfg)  # layout order
      if first.shapes[p] != other.shapes.get(p)
    ),
    None,
  )
  if not diffs and bad is None:
    return
  shape = (
    ""
    if bad is None
    else (
      f"; first mismatched parameter {bad}: {first.shapes[bad]} vs "
      f"{other.shapes.get(bad, 'absent')}"
    )
  )
  config = f" (model config: {', '.join(diffs)})" if diffs else ""
  raise CheckpointError(
    f"{other.name} is not the same model as {first.name}"
    f"{config}{shape}; only checkpoints of one model "
    "merge"
  )


def _output_dtypes(inputs: Sequence[_Reader], dtype) -> dict[str, np.dtype]:
  if dtype is not None:
    return dict.fromkeys(inputs[0].shapes, np.dtype(dtype))
  out = {}
  for path in inputs[0].shapes:
    found = list(dict.fromkeys(r.dtype(path).name for r in inputs))
    if len(found) > 1:
      raise ConfigError(
        f"{path} is stored as {' and '.join(found)} in the "
        "inputs; choose the output's dtype with --dtype"
      )
    out[path] = np.dtype(inputs[0].dtype(path))
  return out


def _merged_leaves(
  recipe: Recipe,
  readers: Sequence[_Reader],
  base: _Reader | None,
  dtypes: dict[str, np.dtype],
  out,
) -> Iterator[tuple[str, np.ndarray]]:
  """(path, merged leaf) in layout order, one leaf in memory at a time;
  publish.NonFinite if an input's or the merged leaf holds NaN or inf."""
  for path, shape in layout.param_shapes(readers[0].cfg).items():
    tensors = [_read_finite(r, path, out) for r in readers]
    base_leaf = _read_finite(base, path, out) if base else None
    merged = np.empty(shape, dtypes[path])
    for i in tensor_units(path, shape):
      merge_into(
        merged[i],
        recipe,
        [x[i] for x in tensors],
        None if base_leaf is None else base_leaf[i],
      )
    del tensors, base_leaf
    yield path, publish.check_finite_leaf(merged, path, out)
    del merged  # before the next leaf's inputs are read


def _read_finite(reader: _Reader, path: str, out) -> np.ndarray:
  return publish.check_finite_leaf(reader.read(path), path, out, reader.name)


def _save_native(
  directory, leaves, cfg: ModelConfig, step_meta: epath.Path, force: bool
) -> None:
  """Writes the leaves with orbax's partial save, one at a time."""
  # A leaf is not modified while orbax writes it: no defensive copy.
  ctx = ocp_v1.Context()
  ctx.memory.deepcopy_host_arrays = False
  with fileio.atomic_directory(directory, overwrite=force) as tmp:
    staging = epath.Path(tmp).absolute() / "params.staging"
    with ctx:
      for path, value in leaves:
        ocp_v1.partial.save(staging, layout.unflatten({path: value}))
        del value
      ocp_v1.partial.finalize(staging)
    # Partial saves use orbax's checkpointables layout; its 'state' item is
    # a PyTree checkpoint like the one native.save writes.
    (staging / "state").rename(tmp / native.PARAMS_DIR)
    staging.rmtree()
    if step_meta.exists():  # names the orbax handler of the tree
      step_meta.copy(tmp / native.PARAMS_DIR / step_meta.name)
    config = {"format": native.FORMAT, "model": configlib.to_dict(cfg)}
    (tmp / native.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _save_hf(
  directory, leaves, cfg: ModelConfig, force: bool, max_shard_bytes: int
) -> None:
  """Keeps each leaf in a memory-mapped scratch file next to `directory`
  (local disks only, like `hf.save`), then exports them with `hf.save`,
  which reads one HF tensor at a time."""
  directory = epath.Path(directory)
  if directory.exists() and not force:
    raise ConfigError(f"{directory} already exists; pass --force to replace it")
  scratch = fileio.fresh_temporary_sibling(
    directory.parent / f"{directory.name}.merge-scratch"
  )
  try:
    flat = {}
    for path, value in leaves:
      file = scratch / (path.replace("/", ".") + ".bin")
      value.tofile(file)
      flat[path] = np.memmap(file, value.dtype, "r", shape=value.shape)
      del value
    hf.save(
      directory,
      layout.unflatten(flat),
      cfg,
      max_shard_bytes=max_shard_bytes,
      force=force,
    )
  finally:
    flat.clear()
    shutil.rmtree(scratch, ignore_errors=True)


def merge(
  inputs: Sequence,
  out,
  recipe: Recipe,
  *,
  base=None,
  dtype=None,
  to: str = "native",
  force: bool = False,
  max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES,
) -> ModelConfig:
  """Merges native checkpoints `inputs` (and `base`) into `out`.

  to: "native" (this project's format) or "hf" (safetensors, sharded above
    `max_shard_bytes`). dtype: of the output; default the inputs'.
  Returns the output's model config. Nothing appears at `out` unless the
  merge completes.
  """
  if to not in ("native", "hf"):
    raise ConfigError(f"--to: unknown format {to!r}; valid: native, hf")
  recipe = resolve(recipe, len(inputs), base is not None)
  opened: list[_Reader] = []

  def open_reader(directory) -> _Reader:
    opened.append(_Reader(directory))
    return opened[-1]

  try:
    readers = [open_reader(d) for d in inputs]
    base_reader = open_reader(base) if base is not None else None
    for other in opened[1:]:
      _check_same_model(readers[0], other)
    dtypes = _output_dtypes(readers, dtype)
    cfg = readers[0].cfg
    names = {d.name for d in dtypes.values()}
    if len(names) == 1:
      cfg = dataclasses.replace(cfg, param_dtype=names.pop())
    leaves = _merged_leaves(recipe, readers, base_reader, dtypes, out)
    if to == "native":
      _save_native(
        out, leaves, cfg, readers[0].path / "_CHECKPOINT_METADATA", force
      )
    else:
      _save_hf(out, leaves, cfg, force, max_shard_bytes)
  finally:
    for r in opened:
      r.close()
  return cfg
