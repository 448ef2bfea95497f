"""Integer weight quantization (int4, int8) for training and export.

Three schemes (`QuantConfig.scheme`):

  symmetric  ours: per channel or per block, 15 (int4) / 255 (int8) levels;
  q4_0, q8_0 GGML's (llama.cpp, Ollama, LM Studio): blocks of 32 along the
             contraction axis, an fp16 scale each, rounded exactly as GGML
             rounds (below), so a QAT model trained with them computes the
             weights that its GGUF export holds.

A weight `w` of an einsum is quantized along its contraction (fan-in) axes:

  per channel (block_size None): one scale per output channel, the max |w|
    over every fan-in axis;
  per block (block_size b): one scale per b consecutive entries of the LAST
    fan-in axis (the innermost one of the flattened fan-in), so that a block
    is b contiguous inputs of one output channel, the layout of a Hugging Face
    Linear weight [out, in] split along `in` (e.g. blocks of 32 as GGUF does).

    scale = max|w| / qmax            (qmax 7 for int4, 127 for int8)
    q     = clip(round(w / scale), -qmax, qmax)
    w~    = q * scale

The symmetric grid is [-7, 7] (-8 is never used), so w~ = -(-w)~.

GGML's schemes, as its reference quantiser (ggml-quants.c
quantize_row_q4_0_ref / quantize_row_q8_0_ref; `gguf.quants` Q4_0 / Q8_0
in the `gguf` package is the same in numpy) computes them in float32:

  q4_0  m = the block's entry of largest |w| (the first, on ties), signed
        d = m / -8,  id = 1 / d (0 where d == 0)
        q = min(15, trunc(w * id + 8.5)),   w~ = fp16(d) * (q - 8)
  q8_0  d = max|w| / 127,  id = 1 / d (0 where d == 0)
        q = round_half_away(w * id),        w~ = fp16(d) * q

Q4_0 uses 16 levels: the block's extreme is -8 * d (exact up to the fp16
rounding of d) and its opposite sign reaches only +7 * d. The integers are
held as q - 8 in [-8, 7] (int4) and q (int8), the scales as float32 holding
fp16 values, so `dequantize` is the same for every scheme.

Training (QAT): `fake_quant` returns w~ in the forward pass and passes the
gradient straight through to w (straight-through estimator):
`stop_gradient(w~) + (w - stop_gradient(w))`, whose value is w~ exactly.
Scales are recomputed from the weights every step, not learned: they cost
no parameters or optimizer state, and they are exactly the scales
`quantize` exports afterwards.

Scale shapes: `w.shape` with the per-channel fan-in axes set to 1, or the
blocked axis divided by b (other fan-in axes, e.g. the heads N of the
attention output [N, H, D], keep their size).
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from gemma_jax.errors import ConfigError

GROUPS = ("attn", "mlp", "embed")
# The Einsum modules of each group (by module name).
MODULE_GROUPS = {
  "q_einsum": "attn",
  "kv_einsum": "attn",
  "attn_vec_einsum": "attn",
  "gating_einsum": "mlp",
  "linear": "mlp",
}
QMAX = {4: 7, 8: 127}
INT_DTYPES = {4: jnp.int4, 8: jnp.int8}
SCHEMES = ("symmetric", "q4_0", "q8_0")
# GGML's block-quantized formats: (bits, entries per block).
GGML_SCHEMES = {"q4_0": (4, 32), "q8_0": (8, 32)}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """The `model.quant` section.

  bits: 4 or 8. block_size: entries per scale along the contraction axis
  (None: one scale per output channel). targets: parameter groups, of
  'attn' (q, kv and output projections), 'mlp' (gate/up and down) and
  'embed' (the tied embedding, quantized along d_model per row).
  scheme: 'symmetric' (ours, any block size or per channel) or GGML's
  'q4_0' / 'q8_0' (bits 4 / 8, block_size 32; see the module docstring).
  weights: 'float' trains float weights with fake quantization (QAT, and
  post-training evaluation of a float model); 'int' holds the weights as
  integers plus scales (a quantized export, the frozen base of QLoRA).
  """

  bits: Literal[4, 8] = 4
  block_size: int | None = 32
  targets: tuple[str, ...] = ("attn", "mlp")
  weights: Literal["float", "int"] = "float"
  scheme: Literal["symmetric", "q4_0", "q8_0"] = "symmetric"

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise ConfigError(
        f"scheme: unknown {self.scheme!r}; valid: {', '.join(SCHEMES)}"
      )
    if self.scheme in GGML_SCHEMES:
      bits, block = GGML_SCHEMES[self.scheme]
      if (self.bits, self.block_size) != (bits, block):
        raise ConfigError(
          f"scheme: {self.scheme} is GGML's {bits}-bit format in blocks of "
          f"{block}; set bits {bits} and block size {block} (got bits "
          f"{self.bits}, block size {self.block_size})"
        )
    bad = [t for t in self.targets if t not in GROUPS]
    if bad:
      raise ConfigError(
        f"targets: unknown group {bad[0]!r}; valid groups: {', '.join(GROUPS)}"
      )
    if not self.targets:
      raise ConfigError(f"targets: name at least one of {', '.join(GROUPS)}")
    if self.block_size is not None and self.block_size <= 0:
      raise ConfigError(
        f"block_size must be positive (or null for one scale "
        f"per channel), got {self.block_size}"
      )

  @property
  def qmax(self) -> int:
    return QMAX[self.bits]

  @property
  def int_dtype(self):
    return INT_DTYPES[self.bits]


def fan_in_axes(in_axis, ndim: int | None = None) -> tuple[int, ...]:
  """The fan-in axes as a tuple (non-negative when `ndim` is given)."""
  axes = (in_axis,) if isinstance(in_axis, int) else tuple(in_axis)
  return axes if ndim is None else tuple(a % ndim for a in axes)


def check_block(cfg: QuantConfig, name: str, shape, in_axis) -> None:
  """ConfigError if the block size does not divide the blocked axis."""
  if cfg.block_size is None:
    return
  axis = fan_in_axes(in_axis, len(shape))[-1]
  if shape[axis] % cfg.block_size:
    raise ConfigError(
      f"quant.block_size: {cfg.block_size} does not divide the contraction "
      f"axis of {name} (size {shape[axis]}, shape {tuple(shape)}); choose a "
      f"divisor or null (per channel)"
    )


def scale_shape(shape, in_axis, block_size: int | None) -> tuple[int, ...]:
  axes = fan_in_axes(in_axis, len(shape))
  out = list(shape)
  if block_size is None:
    for a in axes:
      out[a] = 1
  else:
    out[axes[-1]] = shape[axes[-1]] // block_size
  return tuple(out)


def _blocked(x, axis: int, block_size: int):
  """[..., n * b, ...] -> [..., n, b, ...] at `axis`."""
  shape = x.shape
  return x.reshape(
    (*shape[:axis], shape[axis] // block_size, block_size, *shape[axis + 1 :])
  )


def quantize(
  w, in_axis, bits: int, block_size: int | None, scheme: str = "symmetric"
):
  """float w -> (q int4/int8 of w's shape, float32 scale); see the module
  docstring for the shapes and the schemes."""
  axes = fan_in_axes(in_axis, w.ndim)
  w = w.astype(jnp.float32)
  if scheme in GGML_SCHEMES:
    axis = axes[-1]
    rule = _ggml_q4_0 if scheme == "q4_0" else _ggml_q8_0
    block = GGML_SCHEMES[scheme][1]  # 32, whatever block_size says
    q, scale = rule(_blocked(w, axis, block), axis + 1)
    q, scale = q.reshape(w.shape), jnp.squeeze(scale, axis + 1)
    return q.astype(INT_DTYPES[bits]), scale
  qmax = QMAX[bits]
  if block_size is None:
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
    q = jnp.clip(jnp.round(w / scale), -qmax, qmax)
  else:
    axis = axes[-1]
    blocks = _blocked(w, axis, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
    q = jnp.clip(jnp.round(blocks / scale), -qmax, qmax).reshape(w.shape)
    scale = jnp.squeeze(scale, axis + 1)
  return q.astype(INT_DTYPES[bits]), scale


def _inverse(d):
  """1 / d, and 0 where d == 0 (GGML's `d ? 1.0f / d : 0.0f`)."""
  return jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))


def _fp16(d):
  """d rounded to fp16 (GGML stores it so), back in float32."""
  return d.astype(jnp.float16).astype(jnp.float32)


def _ggml_q4_0(blocks, axis: int):
  """GGML's Q4_0 of float32 `blocks` (entries along `axis`) -> (q - 8 in
  [-8, 7], fp16 scale with `axis` kept as size 1)."""
  first_max = jnp.argmax(jnp.abs(blocks), axis=axis, keepdims=True)
  d = jnp.take_along_axis(blocks, first_max, axis=axis) / -8.0
  # GGML rounds the product to float32, then adds 8.5. XLA would fuse the
  # two into one multiply-add (one rounding), flipping q where w / d lies
  # within a rounding of a half step; a clip between them (|w / d| <= 8, so
  # it changes nothing) leaves no multiply for the add to fuse with.
  scaled = jnp.clip(blocks * _inverse(d), -16.0, 16.0)
  q = jnp.clip(jnp.trunc(scaled + 8.5), 0.0, 15.0)
  return q - 8.0, _fp16(d)


def _ggml_q8_0(blocks, axis: int):
  """GGML's Q8_0: (q in [-127, 127], fp16 scale), rounding half away from
  zero as ggml's roundf (in gguf.quants: floor(a) + floor(2 (a - floor a)))."""
  # A true division, as GGML's: XLA turns `x / 127.0` into the product
  # `x * (1 / 127.0)`, one rounding off in some blocks. 127 + 0 * amax is
  # 127 (amax is finite) but no constant to XLA.
  amax = jnp.max(jnp.abs(blocks), axis=axis, keepdims=True)
  d = amax / (127.0 + 0.0 * amax)
  x = blocks * _inverse(d)  # no add follows: nothing to fuse
  a = jnp.abs(x)
  whole = jnp.floor(a)
  return jnp.sign(x) * (whole + jnp.floor(2.0 * (a - whole))), _fp16(d)


def dequantize(q, scale, in_axis, block_size: int | None, dtype=jnp.float32):
  """(q, scale) -> w~ in `dtype`."""
  q = q.astype(jnp.float32)
  if block_size is None:
    return (q * scale).astype(dtype)
  axis = fan_in_axes(in_axis, q.ndim)[-1]
  w = _blocked(q, axis, block_size) * jnp.expand_dims(scale, axis + 1)
  return w.reshape(q.shape).astype(dtype)


def fake_quant(
  w, in_axis, bits: int, block_size: int | None, scheme: str = "symmetric"
):
  """w~ forward, identity backward (straight-through), in w's dtype."""
  q, scale = quantize(w, in_axis, bits, block_size, scheme)
  w_q = jax.lax.stop_gradient(
    dequantize(q, scale, in_axis, block_size, w.dtype)
  )
  # w_q + 0 is exactly w_q (w + (w_q - w) would round again), and the
  # gradient of w - stop_gradient(w) is the identity.
  return w_q + (w - jax.lax.stop_gradient(w))


def scale_axes(axes, shape, in_axis, block_size: int | None):
  """Logical axes of the scale: the weight's, None where the size is 1."""
  sizes = scale_shape(shape, in_axis, block_size)
  return tuple(None if s == 1 else a for a, s in zip(axes, sizes))


# Whole parameter trees (nested dicts, layers stacked on a leading axis L).
def quantized_leaves(model_cfg) -> dict[str, tuple[object, str]]:
  """{weight leaf path: (its fan-in axes in the stored tree, scale leaf path)}
  of every weight that `model_cfg.quant` quantizes."""
  out = {}
  for module, (_, in_axis, group) in model_cfg.einsum_weights().items():
    if group not in model_cfg.quant.targets:
      continue
    if module == "embedder":
      out["embedder/embedding"] = (in_axis, "embedder/embedding_scale")
    else:  # one more leading axis: the layers
      shifted = tuple(a + 1 for a in fan_in_axes(in_axis))
      out[f"{module}/w"] = (shifted, f"{module}/scale")
  return out


def get_path(tree, path: str):
  for key in filter(None, path.split("/")):
    tree = tree[key]
  return tree


def with_paths(tree, updates: dict, drop=()):
  """A copy of nested dict `tree` with {path: value} set and paths dropped
  (the dicts are copied, the arrays shared)."""

  def copy(t: dict) -> dict:
    return {k: copy(v) if isinstance(v, dict) else v for k, v in t.items()}

  out = copy(tree)
  for path, value in updates.items():
    *parents, leaf = path.split("/")
    get_path(out, "/".join(parents))[leaf] = value
  for path in drop:
    *parents, leaf = path.split("/")
    del get_path(out, "/".join(parents))[leaf]
  return out


def quantize_params(params, model_cfg):
  """Float params -> the tree of a `weights: int` model: integer weights
  and their scales (what `model_cfg.quant` names; the rest unchanged)."""
  q = model_cfg.quant
  updates = {}
  for path, (in_axis, scale_path) in quantized_leaves(model_cfg).items():
    updates[path], updates[scale_path] = quantize(
      get_path(params, path), in_axis, q.bits, q.block_size, q.scheme
    )
  return with_paths(params, updates)


def dequantize_params(params, model_cfg, dtype):
  """Inverse of `quantize_params` up to rounding: float weights (in
  `dtype`), scales removed."""
  q = model_cfg.quant
  updates, drop = {}, []
  for path, (in_axis, scale_path) in quantized_leaves(model_cfg).items():
    updates[path] = dequantize(
      get_path(params, path),
      get_path(params, scale_path),
      in_axis,
      q.block_size,
      dtype,
    )
    drop.append(scale_path)
  return with_paths(params, updates, drop)
