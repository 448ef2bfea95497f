"""The model config: one frozen dataclass that covers every Gemma 1, 2 and 3
size (Gemma 3: text models).

Letters used in shape comments across the model: B batch, T query length,
S key length, D d_model, N query heads, K kv heads, G = N // K, H head_dim,
F MLP width (one GeGLU branch), V vocabulary, L layers.
"""

import dataclasses
import math
from typing import Literal

from gemma_jax.errors import ConfigError
from gemma_jax.model import lora as lora_lib
from gemma_jax.model import quant as quant_lib

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "qkv_proj"]
AttentionType = Literal["global", "local"]
AttentionImpl = Literal["auto", "xla", "blockwise", "splash"]


# A model's sizes: each a positive integer.
SIZE_FIELDS = (
  "num_layers",
  "d_model",
  "mlp_dim",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "vocab_size",
)
# The fields that decide the parameters' shapes (checkpoint.layout).
SHAPE_FIELDS = (*SIZE_FIELDS, "embed_rows", "sandwich_norms", "qk_norm")

# How a model is computed, not what it is: checkpoints do not depend on these,
# so a run may resume (and checkpoints merge) with other values.
EXECUTION_FIELDS = ("remat_policy", "attention_impl", "fused_mlp", "loss_chunk")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one Gemma model."""

  num_layers: int
  d_model: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  name: str = "custom"
  vocab_size: int = 256_000  # rows that may appear in logits
  embed_rows: int | None = None  # padded table size (256128); None = vocab
  query_pre_attn_scalar: float | None = None  # None: head_dim
  attention_pattern: tuple[AttentionType, ...] = ("global",)  # cycled
  sliding_window: int | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sandwich_norms: bool = False  # Gemma 2 post-attention / post-MLP norms
  # Gemma 3: RMSNorm ((1 + w) scale) over each head's queries and keys,
  # after the projections and before RoPE.
  qk_norm: bool = False
  # RoPE of global layers: base wavelength and linear scaling (angles of
  # position / rope_scale_factor). The local_* pair is that of local layers;
  # None: as global layers. Gemma 3: 1M (factor 8 for 4B/12B/27B) / 10k.
  rope_max_wavelength: float = 10_000.0
  rope_scale_factor: float = 1.0
  local_rope_max_wavelength: float | None = None
  local_rope_scale_factor: float | None = None
  norm_eps: float = 1e-6
  param_dtype: DType = "float32"
  dtype: DType = "float32"  # activation (compute) dtype
  remat_policy: RematPolicy = "none"
  # How attention without a cache is computed (decoding always uses xla):
  #   xla        scores [B, K, G, T, S] and softmax by plain einsums;
  #   blockwise  per query block, only the key blocks it can see, with a
  #              hand-written backward that saves no probabilities
  #              (kernels.blockwise_attention; fastest on CPU);
  #   splash     the Pallas TPU kernel (splash.py), shard_map over the mesh;
  #   auto       splash on TPU where seq_len % 128 == 0, else blockwise.
  attention_impl: AttentionImpl = "auto"
  # GeGLU MLP with a hand-written backward (kernels.geglu_mlp): saves x and
  # the gate/up pre-activations only. False: autodiff of the plain einsums.
  fused_mlp: bool = True
  # Train loss: the output projection, soft-cap and cross-entropy fused, this
  # many tokens at a time (kernels.cross_entropy), so the [B, T, V] logits
  # are never stored. 0: materialise the logits (as `forward` returns them).
  loss_chunk: int = 1024
  # Quantized weights (QAT or an int export) and low-rank adapters; see
  # gemma_jax.model.quant and gemma_jax.model.lora.
  quant: quant_lib.QuantConfig | None = None
  lora: lora_lib.LoraConfig | None = None

  def __post_init__(self):
    for key in SIZE_FIELDS:
      if getattr(self, key) <= 0:
        raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
        f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
        f"({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.embed_rows is not None and self.embed_rows < self.vocab_size:
      raise ConfigError(
        f"embed_rows ({self.embed_rows}) must be >= "
        f"vocab_size ({self.vocab_size})"
      )
    if not self.attention_pattern:
      raise ConfigError("attention_pattern must name at least one layer type")
    if "local" in self.attention_pattern and not self.sliding_window:
      raise ConfigError(
        "attention_pattern has 'local' layers but sliding_window is not set"
      )
    if self.loss_chunk < 0:
      raise ConfigError(
        f"loss_chunk must be >= 0 (0 = off), got {self.loss_chunk}"
      )
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ConfigError(
        f"sliding_window must be positive, got {self.sliding_window}"
      )
    for key in (
      "rope_max_wavelength",
      "rope_scale_factor",
      "local_rope_max_wavelength",
      "local_rope_scale_factor",
      "attn_logit_softcap",
      "final_logit_softcap",
      "query_pre_attn_scalar",
      "norm_eps",
    ):
      # Each divides or scales: 0, a negative, inf or NaN (which fails
      # every comparison) would make every logit non-finite or flip it.
      value = getattr(self, key)
      if value is not None and not (0 < value < math.inf):
        raise ConfigError(f"{key} must be positive and finite, got {value}")
    if self.quant is not None:
      for name, (shape, in_axis, group) in self.einsum_weights().items():
        if group in self.quant.targets:
          quant_lib.check_block(self.quant, name, shape, in_axis)
    if self.lora is not None:
      lora_lib.check(self.lora, self)

  def einsum_weights(self) -> dict[str, tuple[tuple[int, ...], object, str]]:
    """{module path: (one layer's weight shape, fan-in axes, quant group)}
    of every projection and the embedding (module 'embedder')."""
    d, f, h = self.d_model, self.mlp_dim, self.head_dim
    n, k = self.num_heads, self.num_kv_heads
    return {
      "layers/attn/q_einsum": ((n, d, h), 1, "attn"),
      "layers/attn/kv_einsum": ((2, k, d, h), 2, "attn"),
      "layers/attn/attn_vec_einsum": ((n, h, d), (0, 1), "attn"),
      "layers/mlp/gating_einsum": ((2, d, f), 1, "mlp"),
      "layers/mlp/linear": ((f, d), 0, "mlp"),
      "embedder": ((self.num_embed_rows, d), 1, "embed"),
    }

  # Derived values.
  @property
  def num_embed_rows(self) -> int:
    return self.embed_rows or self.vocab_size

  @property
  def query_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def layer_windows(self) -> tuple[int, ...]:
    """Per-layer sliding window; 0 means global attention."""
    pattern = self.attention_pattern
    return tuple(
      (self.sliding_window or 0) if pattern[i % len(pattern)] == "local" else 0
      for i in range(self.num_layers)
    )

  @property
  def layer_ropes(self) -> tuple[tuple[float, float], ...]:
    """Per-layer RoPE (max wavelength, linear scale factor)."""
    local = (
      self.local_rope_max_wavelength or self.rope_max_wavelength,
      self.local_rope_scale_factor or self.rope_scale_factor,
    )
    glob = (self.rope_max_wavelength, self.rope_scale_factor)
    return tuple(local if w else glob for w in self.layer_windows)

  @property
  def embed_scale(self) -> float:
    return math.sqrt(self.d_model)

  def param_count(self) -> int:
    """Exact parameter count from the shapes alone."""
    d, f, h = self.d_model, self.mlp_dim, self.head_dim
    attn = (self.num_heads * 2 + self.num_kv_heads * 2) * d * h
    norms = d * (4 if self.sandwich_norms else 2)
    norms += 2 * h if self.qk_norm else 0
    per_layer = attn + 3 * d * f + norms
    return self.num_layers * per_layer + self.num_embed_rows * d + d


def _gemma1(**kw) -> ModelConfig:
  return ModelConfig(embed_rows=256_128, **kw)


def _gemma2(**kw) -> ModelConfig:
  kw.setdefault("query_pre_attn_scalar", None)
  return ModelConfig(
    embed_rows=256_128,
    attention_pattern=("local", "global"),
    sliding_window=4096,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sandwich_norms=True,
    **kw,
  )


# Gemma 3 (text): five local layers to one global one; layer i is global
# when (i + 1) % 6 == 0. Sizes from the official library's configs (the
# `gemma` package 3.3.0, gm/nn/_gemma.py: Gemma3_1B ... Gemma3_27B) and
# transformers' Gemma3TextConfig: QK-norm, no soft-caps, RoPE base 10k on
# local and 1M on global layers, linear RoPE scaling 8 on the global layers
# of the 4B/12B/27B (128K context). Vocabulary: 262,144 (the 1B, a
# Gemma3ForCausalLM); the 4B/12B/27B are released as
# Gemma3ForConditionalGeneration, whose text config has 262,208 rows.
GEMMA3_PATTERN: tuple[AttentionType, ...] = ("local",) * 5 + ("global",)


def _gemma3(**kw) -> ModelConfig:
  return ModelConfig(
    attention_pattern=GEMMA3_PATTERN,
    qk_norm=True,
    sandwich_norms=True,
    rope_max_wavelength=1_000_000.0,
    local_rope_max_wavelength=10_000.0,
    **kw,
  )


def _gemma3_128k(**kw) -> ModelConfig:
  return _gemma3(
    vocab_size=262_208,
    sliding_window=1024,
    rope_scale_factor=8.0,
    local_rope_scale_factor=1.0,
    **kw,
  )


PRESETS: dict[str, ModelConfig] = {
  "gemma-2b": _gemma1(
    name="gemma-2b",
    num_layers=18,
    d_model=2048,
    mlp_dim=16384,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
  ),
  "gemma-7b": _gemma1(
    name="gemma-7b",
    num_layers=28,
    d_model=3072,
    mlp_dim=24576,
    num_heads=16,
    num_kv_heads=16,
    head_dim=256,
  ),
  "gemma2-2b": _gemma2(
    name="gemma2-2b",
    num_layers=26,
    d_model=2304,
    mlp_dim=9216,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
  ),
  "gemma2-9b": _gemma2(
    name="gemma2-9b",
    num_layers=42,
    d_model=3584,
    mlp_dim=14336,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
  ),
  "gemma2-27b": _gemma2(
    name="gemma2-27b",
    num_layers=46,
    d_model=4608,
    mlp_dim=36864,
    num_heads=32,
    num_kv_heads=16,
    head_dim=128,
    query_pre_attn_scalar=144.0,
  ),
  "gemma3-1b": _gemma3(
    name="gemma3-1b",
    num_layers=26,
    d_model=1152,
    mlp_dim=6912,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    vocab_size=262_144,
    sliding_window=512,
  ),
  "gemma3-4b": _gemma3_128k(
    name="gemma3-4b",
    num_layers=34,
    d_model=2560,
    mlp_dim=10240,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
  ),
  "gemma3-12b": _gemma3_128k(
    name="gemma3-12b",
    num_layers=48,
    d_model=3840,
    mlp_dim=15360,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
  ),
  "gemma3-27b": _gemma3_128k(
    name="gemma3-27b",
    num_layers=62,
    d_model=5376,
    mlp_dim=21504,
    num_heads=32,
    num_kv_heads=16,
    head_dim=128,
    query_pre_attn_scalar=168.0,  # d_model / num_heads = 5376 / 32
  ),
  # Tiny presets for CPU smoke runs and tests; same architecture rules.
  "tiny-gemma": ModelConfig(
    name="tiny-gemma",
    num_layers=2,
    d_model=64,
    mlp_dim=256,
    num_heads=4,
    num_kv_heads=1,
    head_dim=16,
    vocab_size=512,
  ),
  "tiny-gemma2": ModelConfig(
    name="tiny-gemma2",
    num_layers=4,
    d_model=128,
    mlp_dim=512,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    vocab_size=2048,
    attention_pattern=("local", "global"),
    sliding_window=64,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sandwich_norms=True,
  ),
  "tiny-gemma3": ModelConfig(
    name="tiny-gemma3",
    num_layers=8,
    d_model=128,
    mlp_dim=512,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    vocab_size=2048,
    attention_pattern=GEMMA3_PATTERN,
    sliding_window=32,
    qk_norm=True,
    sandwich_norms=True,
    rope_max_wavelength=1_000_000.0,
    rope_scale_factor=8.0,
    local_rope_max_wavelength=10_000.0,
    local_rope_scale_factor=1.0,
  ),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(
      f"unknown model preset {name!r}; valid choices: {', '.join(PRESETS)}"
    )
  return dataclasses.replace(PRESETS[name], **overrides)
