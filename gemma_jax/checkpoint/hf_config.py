"""Hugging Face `config.json` <-> ModelConfig for model types gemma, gemma2,
gemma3_text (Gemma3ForCausalLM) and gemma3 (Gemma3ForConditionalGeneration:
its `text_config` only; the vision tower is not imported).

Field spellings differ across transformers versions; both are accepted:
`hidden_act` (Gemma) / `hidden_activation` (Gemma 2); `rope_theta` at the top
level (<= 4.x) / inside `rope_parameters` (>= 5); `layer_types` (>= 4.5x) /
implicit even-layers-local. Exported configs carry both spellings.
"""

from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model.config import SIZE_FIELDS, ModelConfig

# Every spelling of the tanh-approximated GELU that Gemma uses. Gemma 1
# releases say "gelu" but mean the tanh approximation (transformers rewrites
# it).
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def _get(hf: dict, key: str, source: str, default=None):
  value = hf.get(key, default)
  if value is None and default is None:
    raise CheckpointError(f"{source}: missing field '{key}'")
  return value


def _rope_theta(hf: dict, source: str) -> float:
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if params and all(isinstance(v, dict) for v in params.values()):
    # Per-layer-type parameters (newer configs): Gemma 1/2 use one theta.
    thetas = {v.get("rope_theta") for v in params.values()}
    params = dict(next(iter(params.values())), rope_theta=None)
    if len(thetas) != 1:
      raise CheckpointError(
        f"{source}: rope_parameters has different rope_theta per layer "
        f"type {sorted(thetas)}; Gemma 1/2 use one"
      )
    params["rope_theta"] = thetas.pop()
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    raise CheckpointError(
      f"{source}: rope type {rope_type!r} is not supported "
      "(Gemma 1/2 use plain RoPE)"
    )
  return float(params.get("rope_theta") or hf.get("rope_theta") or 10_000.0)


def _activation(hf: dict, model_type: str, source: str) -> None:
  act = hf.get("hidden_activation") or hf.get("hidden_act") or _TANH_GELU[0]
  if act == "gelu" and model_type == "gemma":
    return
  if act not in _TANH_GELU:
    raise CheckpointError(
      f"{source}: hidden_activation {act!r} is not supported; Gemma uses "
      f"the tanh GELU ({', '.join(_TANH_GELU)})"
    )


def _pattern(layer_types: list[str], source: str) -> tuple[str, ...]:
  """Shortest cycle of 'local'/'global' that reproduces `layer_types`."""
  names = {"sliding_attention": "local", "full_attention": "global"}
  try:
    kinds = [names[t] for t in layer_types]
  except KeyError as e:
    raise CheckpointError(
      f"{source}: unknown layer type {e.args[0]!r} in "
      f"layer_types; valid: {', '.join(names)}"
    ) from None
  for period in range(1, len(kinds) + 1):
    if all(k == kinds[i % period] for i, k in enumerate(kinds)):
      return tuple(kinds[:period])
  raise AssertionError("unreachable")


# Gemma3TextConfig's defaults (transformers 5.25, models/gemma3/
# configuration_gemma3.py): the released multimodal configs leave most
# `text_config` fields out (gemma-3-4b's names only its sizes, RoPE scaling
# and window), so a missing field means this value.
GEMMA3_TEXT_DEFAULTS = {
  "vocab_size": 262_208,
  "hidden_size": 2304,
  "intermediate_size": 9216,
  "num_hidden_layers": 26,
  "num_attention_heads": 8,
  "num_key_value_heads": 4,
  "head_dim": 256,
  "rms_norm_eps": 1e-6,
  "query_pre_attn_scalar": 256,
  "sliding_window": 4096,
  "sliding_window_pattern": 6,  # layer i global iff (i + 1) % 6 == 0
  "rope_theta": 1_000_000.0,  # global layers
  "rope_local_base_freq": 10_000.0,  # local layers
}


def _rope_type(params: dict, source: str) -> float:
  """The linear scaling factor of one HF RoPE dict (1 for plain RoPE)."""
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return 1.0
  if rope_type == "linear":
    return float(params["factor"])
  raise CheckpointError(
    f"{source}: rope type {rope_type!r} is not supported (Gemma 3 uses "
    "'default' and 'linear')"
  )


def _gemma3_rope(hf: dict, source: str) -> dict:
  """ModelConfig RoPE fields of a Gemma 3 text config: per layer type in
  `rope_parameters` (transformers >= 5), or `rope_theta` + `rope_scaling`
  (global layers) and `rope_local_base_freq` (local ones) before."""
  params = hf.get("rope_parameters") or {}
  full = dict(params.get("full_attention") or {})
  sliding = dict(params.get("sliding_attention") or {})
  if not full and hf.get("rope_scaling"):
    full = dict(hf["rope_scaling"])
  d = GEMMA3_TEXT_DEFAULTS
  return dict(
    rope_max_wavelength=float(
      full.get("rope_theta") or hf.get("rope_theta") or d["rope_theta"]
    ),
    rope_scale_factor=_rope_type(full, source),
    local_rope_max_wavelength=float(
      sliding.get("rope_theta")
      or hf.get("rope_local_base_freq")
      or d["rope_local_base_freq"]
    ),
    local_rope_scale_factor=_rope_type(sliding, source),
  )


def from_hf(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig for an HF Gemma / Gemma 2 / Gemma 3 config dict."""
  model_type = hf.get("model_type")
  if model_type == "gemma3":  # multimodal: the language model's config
    source = f"{source} text_config"
    hf = dict(hf.get("text_config") or {})
    hf.setdefault("model_type", "gemma3_text")
    model_type = hf["model_type"]
  if model_type == "gemma3_text":
    hf = GEMMA3_TEXT_DEFAULTS | {k: v for k, v in hf.items() if v is not None}
  if model_type not in ("gemma", "gemma2", "gemma3_text"):
    raise CheckpointError(
      f"{source}: model_type {model_type!r} is not "
      "supported; expected 'gemma', 'gemma2', 'gemma3_text' or 'gemma3'"
    )
  if hf.get("tie_word_embeddings", True) is False:
    raise CheckpointError(
      f"{source}: tie_word_embeddings is false; Gemma "
      "ties the output projection to the embedding"
    )
  if hf.get("attention_bias"):
    raise CheckpointError(
      f"{source}: attention_bias is true; Gemma has no biases"
    )
  if hf.get("use_bidirectional_attention"):
    raise CheckpointError(
      f"{source}: use_bidirectional_attention is not supported"
    )
  _activation(hf, model_type, source)
  heads = _get(hf, "num_attention_heads", source)
  d_model = _get(hf, "hidden_size", source)
  num_layers = _get(hf, "num_hidden_layers", source)
  kw = dict(
    num_layers=num_layers,
    d_model=d_model,
    mlp_dim=_get(hf, "intermediate_size", source),
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or d_model // heads,
    vocab_size=_get(hf, "vocab_size", source),
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
  )
  if model_type == "gemma3_text":
    kw.update(_gemma3_rope(hf, source), qk_norm=True)
  else:
    kw["rope_max_wavelength"] = _rope_theta(hf, source)
  if model_type in ("gemma2", "gemma3_text"):
    period = hf.get("sliding_window_pattern") or 2
    layer_types = hf.get("layer_types") or [
      # Gemma 2: even layers local; Gemma 3: (i + 1) % 6 == 0 global.
      "sliding_attention" if (i + 1) % period else "full_attention"
      for i in range(num_layers)
    ]
    if len(layer_types) != num_layers:
      raise CheckpointError(
        f"{source}: layer_types has {len(layer_types)} "
        f"entries but num_hidden_layers is {num_layers}"
      )
    pattern = _pattern(layer_types, source)
    window = hf.get("sliding_window", hf.get("sliding_window_size", 4096))
    kw.update(
      attention_pattern=pattern,
      sliding_window=window if "local" in pattern else None,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      final_logit_softcap=hf.get("final_logit_softcapping"),
      sandwich_norms=True,
    )
  return ModelConfig(**(kw | overrides))


def _common_hf_fields(dtype: str) -> dict[str, object]:
  """What every Gemma config.json says alike: token ids (pad 0, eos 1,
  bos 2), tied embeddings, no attention bias or dropout, the dtype."""
  return {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "use_cache": True,
    "dtype": dtype,
    "torch_dtype": dtype,
  }


def to_hf(cfg: ModelConfig, dtype: str) -> dict:
  """An HF config.json dict (current transformers format, legacy fields too):
  Gemma3ForCausalLM with QK-norm, Gemma2ForCausalLM with sandwich norms,
  else GemmaForCausalLM."""
  if cfg.qk_norm:
    return _to_hf_gemma3(cfg, dtype)
  if len(set(cfg.layer_ropes)) > 1:
    raise ConfigError(
      f"model RoPE per layer {sorted(set(cfg.layer_ropes))} cannot be "
      "expressed in an HF 'gemma' or 'gemma2' config (one RoPE for all "
      "layers); only Gemma 3 (model.qk_norm=true) has two"
    )
  gemma2 = cfg.sandwich_norms
  if not gemma2:
    unsupported = {
      "attn_logit_softcap": cfg.attn_logit_softcap,
      "final_logit_softcap": cfg.final_logit_softcap,
      "sliding_window": (
        cfg.sliding_window if any(cfg.layer_windows) else None
      ),
      "query_pre_attn_scalar": (
        cfg.query_pre_attn_scalar
        if cfg.query_scale != cfg.head_dim**-0.5
        else None
      ),
    }
    for key, value in unsupported.items():
      if value is not None:
        raise ConfigError(
          f"model.{key}={value} cannot be expressed in an HF "
          "'gemma' config (no sandwich norms = Gemma 1)"
        )
  hf: dict[str, object] = {
    "architectures": ["Gemma2ForCausalLM" if gemma2 else "GemmaForCausalLM"],
    "model_type": "gemma2" if gemma2 else "gemma",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_max_wavelength,
    "rope_parameters": {
      "rope_type": "default",
      "rope_theta": cfg.rope_max_wavelength,
    },
    **_common_hf_fields(dtype),
  }
  if gemma2:
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    hf.update(
      # transformers >= 5 validates types: an integral scalar must be int.
      query_pre_attn_scalar=int(scalar) if scalar == int(scalar) else scalar,
      sliding_window=cfg.sliding_window or 4096,
      layer_types=[
        "sliding_attention" if w else "full_attention"
        for w in cfg.layer_windows
      ],
      attn_logit_softcapping=cfg.attn_logit_softcap,
      final_logit_softcapping=cfg.final_logit_softcap,
      cache_implementation="hybrid",
    )
  return hf


def _scaling(factor: float) -> dict:
  if factor == 1.0:
    return {"rope_type": "default"}
  return {"rope_type": "linear", "factor": factor}


def _to_hf_gemma3(cfg: ModelConfig, dtype: str) -> dict:
  if not cfg.sandwich_norms:
    raise ConfigError(
      "model.qk_norm=true without sandwich_norms cannot be expressed in an "
      "HF 'gemma3_text' config (Gemma 3 norms each branch's output)"
    )
  local_theta = cfg.local_rope_max_wavelength or cfg.rope_max_wavelength
  local_factor = cfg.local_rope_scale_factor or cfg.rope_scale_factor
  global_theta, global_factor = cfg.rope_max_wavelength, cfg.rope_scale_factor
  if local_factor != 1.0:
    raise ConfigError(
      f"model.local_rope_scale_factor={local_factor} cannot be expressed in "
      "an HF 'gemma3_text' config read by transformers 4.x (scaling on "
      "global layers only); set it to 1"
    )
  scalar = cfg.query_pre_attn_scalar or cfg.head_dim
  pattern = cfg.attention_pattern
  hf: dict[str, object] = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072 if global_factor > 1 else 32_768,
    "rms_norm_eps": cfg.norm_eps,
    # transformers >= 5: per layer type; before: the legacy fields below.
    "rope_parameters": {
      "full_attention": {
        **_scaling(global_factor),
        "rope_theta": global_theta,
      },
      "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
    },
    "rope_theta": global_theta,
    "rope_local_base_freq": local_theta,
    "rope_scaling": (None if global_factor == 1.0 else _scaling(global_factor)),
    "query_pre_attn_scalar": int(scalar) if scalar == int(scalar) else scalar,
    "sliding_window": cfg.sliding_window or 4096,
    "layer_types": [
      "sliding_attention" if w else "full_attention" for w in cfg.layer_windows
    ],
    "attn_logit_softcapping": cfg.attn_logit_softcap,
    "final_logit_softcapping": cfg.final_logit_softcap,
    **_common_hf_fields(dtype),
  }
  # Transformers before layer_types (4.50-4.52) read a period: k local
  # layers then one global.
  if pattern[-1] == "global" and set(pattern[:-1]) <= {"local"}:
    hf["sliding_window_pattern"] = len(pattern)
  return hf


# Fields that decide the weights' meaning: a user-given config must agree.
_ARCH_FIELDS = (
  *SIZE_FIELDS,
  "query_scale",
  "layer_windows",
  "attn_logit_softcap",
  "final_logit_softcap",
  "sandwich_norms",
  "qk_norm",
  "rope_max_wavelength",
  "layer_ropes",
  "norm_eps",
)


def check_same_architecture(
  given: ModelConfig, found: ModelConfig, given_name: str, found_name: str
) -> None:
  """Raises ConfigError naming every architecture field that differs."""
  diffs = [
    f"{k}: {given_name} has {getattr(given, k)!r}, {found_name} has "
    f"{getattr(found, k)!r}"
    for k in _ARCH_FIELDS
    if getattr(given, k) != getattr(found, k)
  ]
  if diffs:
    raise ConfigError(
      f"{given_name} does not match {found_name}: " + "; ".join(diffs)
    )
