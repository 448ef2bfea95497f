"""Building blocks: RMSNorm, the tied embedder, RoPE and the GeGLU MLP.

Shape letters are those of gemma_jax/model/config.py.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.model import kernels
from gemma_jax.model import lora as lora_lib
from gemma_jax.model import quant as quant_lib
from gemma_jax.model.config import ModelConfig


def param(module: nn.Module, name: str, shape, axes, init, dtype):
  """A parameter that carries its logical axis names."""
  return module.param(
    name, nn.with_logical_partitioning(init, axes), shape, dtype
  )


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * (1 + scale)`, computed in float32."""

  config: ModelConfig
  axis: str = "embed"  # logical name of the normed axis (QK-norm: head_dim)

  @nn.compact
  def __call__(self, x):
    scale = param(
      self,
      "scale",
      (x.shape[-1],),
      (self.axis,),
      nn.initializers.zeros_init(),
      self.config.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(
      jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.config.norm_eps
    )
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
  """Tied input/output embedding; rows past vocab_size are padding only.

  With 'embed' among model.quant.targets the table is quantized per row
  along d_model (the contraction axis of the output projection).
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    shape, axes = (cfg.num_embed_rows, cfg.d_model), ("vocab", "embed")
    quant = cfg.quant if cfg.quant and "embed" in cfg.quant.targets else None
    self.quant = quant
    if quant and quant.weights == "int":
      self.embedding = param(
        self,
        "embedding",
        shape,
        axes,
        nn.initializers.zeros_init(),
        quant.int_dtype,
      )
      self.embedding_scale = param(
        self,
        "embedding_scale",
        quant_lib.scale_shape(shape, 1, quant.block_size),
        quant_lib.scale_axes(axes, shape, 1, quant.block_size),
        nn.initializers.ones_init(),
        jnp.float32,
      )
      return
    # std 1/sqrt(D): unit-scale inputs after the sqrt(D) factor, and
    # unit-scale initial logits from normalised hidden states.
    self.embedding = param(
      self,
      "embedding",
      shape,
      axes,
      nn.initializers.normal(cfg.d_model**-0.5),
      cfg.param_dtype,
    )

  def _lookup(self, index):
    """Rows `index` (token ids or a slice) of the table as the model runs
    it: dequantized, fake-quantized (QAT) or as stored. Quantization groups
    lie within rows, so quantizing rows alone is quantizing the table."""
    quant, rows = self.quant, self.embedding[index]
    if quant and quant.weights == "int":
      return quant_lib.dequantize(
        rows,
        self.embedding_scale[index],
        -1,
        quant.block_size,
        self.config.dtype,
      )
    if quant:
      rows = quant_lib.fake_quant(
        rows, -1, quant.bits, quant.block_size, quant.scheme
      )
    return rows

  def encode(self, tokens):
    """[B, T] -> [B, T, D], scaled by sqrt(D) rounded in the compute dtype."""
    dtype = self.config.dtype
    x = self._lookup(tokens).astype(dtype)
    return x * jnp.asarray(self.config.embed_scale, dtype)

  def decode(self, x):
    """[B, T, D] -> float32 logits [B, T, V] over the real vocabulary."""
    table = self._lookup(slice(0, self.config.vocab_size))
    return jnp.einsum(
      "BTD,VD->BTV",
      x,
      table.astype(self.config.dtype),
      preferred_element_type=jnp.float32,
    )


def rope_timescale(head_dim: int, max_wavelength: float, scale: float = 1.0):
  """[H/2] float32 divisors of the positions: max_wavelength^(2i/H), times
  the linear scaling factor (positions / scale) when it is not 1."""
  timescale = max_wavelength ** (
    2 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
  )
  return timescale if scale == 1.0 else timescale * jnp.float32(scale)


def apply_rope(x, positions, max_wavelength: float, scale: float = 1.0):
  """Split-halves rotary embedding: dim i pairs with i + H/2.

  x: [B, T, N, H]; positions: [B, T]. Angles are computed in float32.
  """
  timescale = rope_timescale(x.shape[-1], max_wavelength, scale)
  return rotate(x, positions, timescale)


def rotate(x, positions, timescale):
  """apply_rope with the [H/2] divisors given (e.g. picked per layer)."""
  half = x.shape[-1] // 2
  angles = positions[..., None].astype(jnp.float32) / timescale  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def einsum_init(shape: tuple[int, ...], in_axis: int | tuple[int, ...]):
  """Truncated normal with std 1/sqrt(fan_in) over the `in_axis` axes."""
  in_axes = (in_axis,) if isinstance(in_axis, int) else in_axis
  fan_in = math.prod(shape[a] for a in in_axes)
  # The constant undoes the truncation's shrinking of the std.
  return nn.initializers.truncated_normal(1 / (0.87962566 * math.sqrt(fan_in)))


class Einsum(nn.Module):
  """A weight `w` of the given shape, contracted with `x` by an einsum.

  model.quant: `w` is fake-quantized in the forward pass (float weights,
  QAT) or held as integers with a `scale` (quantized weights), along its
  fan-in. model.lora: low-rank adapters on this projection add their term
  (gemma_jax.model.lora).
  """

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  in_axis: int | tuple[int, ...]  # fan-in axes of `w`, for the init
  config: ModelConfig

  @nn.compact
  def __call__(self, equation: str, x):
    cfg = self.config
    y = jnp.einsum(equation, x, self._weight().astype(cfg.dtype))
    # LoRA's term stays here, not in a view over the params (LoRA's
    # step.Forward view only joins base and adapters): x A B inside the
    # scanned layer, with the weight's own logical axes, costs far less
    # than forming W + A B for every projection in every step.
    if cfg.lora is not None:
      delta = lora_lib.adapter_delta(
        self,
        equation,
        x,
        self.shape,
        self.axes,
        self.in_axis,
        cfg.lora,
        cfg.param_dtype,
        cfg.dtype,
      )
      if delta is not None:
        y = y + delta
    return y

  def _weight(self):
    cfg = self.config
    quant = cfg.quant
    if quant and quant_lib.MODULE_GROUPS[self.name] not in quant.targets:
      quant = None
    if quant and quant.weights == "int":
      q = param(
        self,
        "w",
        self.shape,
        self.axes,
        nn.initializers.zeros_init(),
        quant.int_dtype,
      )
      scale = param(
        self,
        "scale",
        quant_lib.scale_shape(self.shape, self.in_axis, quant.block_size),
        quant_lib.scale_axes(
          self.axes, self.shape, self.in_axis, quant.block_size
        ),
        nn.initializers.ones_init(),
        jnp.float32,
      )
      return quant_lib.dequantize(
        q, scale, self.in_axis, quant.block_size, cfg.dtype
      )
    init = einsum_init(self.shape, quant_lib.fan_in_axes(self.in_axis))
    w = param(self, "w", self.shape, self.axes, init, cfg.param_dtype)
    if quant:
      w = quant_lib.fake_quant(
        w, self.in_axis, quant.bits, quant.block_size, quant.scheme
      )
      # Sharded like the weight, whatever layout the blocking suggested.
      w = nn.with_logical_constraint(w, self.axes)
    return w


class EinsumWeight(Einsum):
  """Einsum's weight `w` alone (same path, init and axes; fake-quantized or
  dequantized as Einsum's) in the compute dtype, for a kernel that
  contracts it itself. Adapters need `x`, so an adapted projection uses
  Einsum."""

  @nn.compact
  def __call__(self):
    return self._weight().astype(self.config.dtype)


class MLP(nn.Module):
  """GeGLU: `linear(gelu_tanh(x @ gate) * (x @ up))`.

  With `config.fused_mlp`, one kernel with a hand-written backward
  (kernels.geglu_mlp) over the same parameters; not when LoRA adapts one
  of its projections (the adapters' term needs the plain einsums).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    # The fused kernel contracts the weights itself and has no adapter
    # term, so an adapted MLP takes the plain einsums (no general mechanism
    # can add a term inside a hand-written kernel).
    adapted = cfg.lora is not None and {"gate", "up", "down"} & set(
      cfg.lora.targets
    )
    if cfg.fused_mlp and not adapted:
      w_gate_up = EinsumWeight(
        (2, cfg.d_model, cfg.mlp_dim),
        (None, "embed", "mlp"),
        1,
        cfg,
        name="gating_einsum",
      )()
      w_down = EinsumWeight(
        (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), 0, cfg, name="linear"
      )()
      return kernels.geglu_mlp(x, w_gate_up, w_down)
    gate_up = Einsum(
      (2, cfg.d_model, cfg.mlp_dim),
      (None, "embed", "mlp"),
      in_axis=1,
      config=cfg,
      name="gating_einsum",
    )
    gate, up = gate_up("BTD,CDF->CBTF", x)
    hidden = nn.with_logical_constraint(
      jax.nn.gelu(gate, approximate=True) * up,
      ("act_batch", "act_length", "act_mlp"),
    )
    linear = Einsum(
      (cfg.mlp_dim, cfg.d_model),
      ("mlp", "embed"),
      in_axis=0,
      config=cfg,
      name="linear",
    )
    return linear("BTF,FD->BTD", hidden)
