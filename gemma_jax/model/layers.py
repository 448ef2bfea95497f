"""Building blocks: RMSNorm, the tied embedder, RoPE and the GeGLU MLP.

Shape letters are those of gemma_jax/model/config.py.
"""

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_jax.model import kernels
from gemma_jax.model.config import ModelConfig


def param(module: nn.Module, name: str, shape, axes, init, dtype):
  """A parameter that carries its logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      dtype)


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * (1 + scale)`, computed in float32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = param(self, "scale", (x.shape[-1],), ("embed",),
                  nn.initializers.zeros_init(), self.config.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1,
                                          keepdims=True) + self.config.norm_eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
  """Tied input/output embedding; rows past vocab_size are padding only."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    # std 1/sqrt(D): unit-scale inputs after the sqrt(D) factor, and
    # unit-scale initial logits from normalised hidden states.
    self.embedding = param(self, "embedding", (cfg.num_embed_rows, cfg.d_model),
                           ("vocab", "embed"),
                           nn.initializers.normal(cfg.d_model ** -0.5),
                           cfg.param_dtype)

  def encode(self, tokens):
    """[B, T] -> [B, T, D], scaled by sqrt(D) rounded in the compute dtype."""
    dtype = self.config.dtype
    x = jnp.take(self.embedding, tokens, axis=0).astype(dtype)
    return x * jnp.asarray(self.config.embed_scale, dtype)

  def decode(self, x):
    """[B, T, D] -> float32 logits [B, T, V] over the real vocabulary."""
    table = self.embedding[:self.config.vocab_size].astype(self.config.dtype)
    return jnp.einsum("BTD,VD->BTV", x, table,
                      preferred_element_type=jnp.float32)


def apply_rope(x, positions, max_wavelength: float):
  """Split-halves rotary embedding: dim i pairs with i + H/2.

  x: [B, T, N, H]; positions: [B, T]. Angles are computed in float32.
  """
  half = x.shape[-1] // 2
  timescale = max_wavelength ** (2 * jnp.arange(half, dtype=jnp.float32)
                                 / x.shape[-1])
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
  """A weight `w` of the given shape, contracted with `x` by an einsum."""
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  in_axis: int | tuple[int, ...]     # fan-in axes of `w`, for the init
  config: ModelConfig

  @nn.compact
  def __call__(self, equation: str, x):
    init = einsum_init(self.shape, self.in_axis)
    w = param(self, "w", self.shape, self.axes, init, self.config.param_dtype)
    return jnp.einsum(equation, x, w.astype(self.config.dtype))


class EinsumWeight(nn.Module):
  """Einsum's weight `w` alone (same path, init and axes) in the compute
  dtype, for a kernel that contracts it itself."""
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  in_axis: int | tuple[int, ...]
  config: ModelConfig

  @nn.compact
  def __call__(self):
    init = einsum_init(self.shape, self.in_axis)
    w = param(self, "w", self.shape, self.axes, init, self.config.param_dtype)
    return w.astype(self.config.dtype)


class MLP(nn.Module):
  """GeGLU: `linear(gelu_tanh(x @ gate) * (x @ up))`.

  With `config.fused_mlp`, one kernel with a hand-written backward
  (kernels.geglu_mlp) over the same parameters.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    if cfg.fused_mlp:
      w_gate_up = EinsumWeight((2, cfg.d_model, cfg.mlp_dim),
                               (None, "embed", "mlp"), 1, cfg,
                               name="gating_einsum")()
      w_down = EinsumWeight((cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), 0,
                            cfg, name="linear")()
      return kernels.geglu_mlp(x, w_gate_up, w_down)
    gate_up = Einsum((2, cfg.d_model, cfg.mlp_dim), (None, "embed", "mlp"),
                     in_axis=1, config=cfg, name="gating_einsum")
    gate, up = gate_up("BTD,CDF->CBTF", x)
    hidden = nn.with_logical_constraint(
        jax.nn.gelu(gate, approximate=True) * up,
        ("act_batch", "act_length", "act_mlp"))
    linear = Einsum((cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), in_axis=0,
                    config=cfg, name="linear")
    return linear("BTF,FD->BTD", hidden)
