"""Hugging Face Gemma / Gemma 2 / Gemma 3 directories <-> native params,
tensor by tensor.

Gemma 3: Gemma3ForCausalLM both ways; from a Gemma3ForConditionalGeneration
(the released 4B/12B/27B) the language model alone is read, and its vision
tower is ignored. Exports are Gemma3ForCausalLM.

A directory holds `config.json` and either `model.safetensors` or shards
listed in `model.safetensors.index.json`. HF Linear weights are [out, in]
with head-major rows; the native tree is described in `layout`. Loading fills
the stacked [L, ...] arrays one HF tensor at a time (on the host, or straight
into their device shards) and exporting streams one tensor at a time, so
neither direction holds two copies of the model.

    params, cfg = hf.load("gemma-2-2b/")            # numpy arrays
    params, cfg = hf.load("gemma-2-2b/", cfg, shardings=param_shardings)
    hf.save("out/", params, cfg, max_shard_bytes=2**30)
    hf.save("out/", params, cfg, tokenizer=Tokenizer.load("tokenizer.model"))

With a tokenizer, the directory also holds `tokenizer.model` and the
`tokenizer_config.json` / `special_tokens_map.json` that transformers'
AutoTokenizer reads (GemmaTokenizer: bos added, eos not), so the export runs
unchanged under tools that load a model by directory, such as
lm-evaluation-harness's `hf` model.
"""

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax.linen import meta

from gemma_jax import fileio
from gemma_jax.checkpoint import (
  hf_config,
  layout,
  placement,
  publish,
  safetensors_io,
)
from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import ModelConfig
from gemma_jax.tokenizer import Tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TIED_HEAD = "lm_head.weight"
DEFAULT_SHARD_BYTES = 5 * 2**30
TOKENIZER_MODEL = "tokenizer.model"
# Gemma's special pieces and ids (pad 0, eos 1, bos 2, unk 3), as in the
# official releases' special_tokens_map.json.
SPECIAL_TOKENS = {
  "bos_token": "<bos>",
  "eos_token": "<eos>",
  "pad_token": "<pad>",
  "unk_token": "<unk>",
}


# A dataclass, not a NamedTuple: a tuple's field `index` would hide the
# tuple.index method.
@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor and where it lives in the native tree."""

  hf_name: str
  path: str  # native leaf, e.g. 'layers/attn/q_einsum/w'
  index: tuple  # subscript of that leaf holding this tensor
  hf_shape: tuple[int, ...]
  to_native: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _t(x):
  return x.T


# Where the language model's tensors live: '{prefix}layers.0...'. A
# Gemma3ForConditionalGeneration holds them under one of the other two (the
# released checkpoints / transformers >= 4.52's saving); its vision tower and
# projector are not imported.
TEXT_PREFIX = "model."
MULTIMODAL_PREFIXES = ("language_model.model.", "model.language_model.")


def tensor_map(cfg: ModelConfig, prefix: str = TEXT_PREFIX) -> list[Entry]:
  """Every HF tensor of a model with config `cfg`, in layer order; names
  start with `prefix`."""
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  D, F, V = cfg.d_model, cfg.mlp_dim, cfg.vocab_size

  # [N*H, D] rows head-major  <->  einsum weight [N, D, H].
  def heads_in(n):
    return (
      lambda x: x.reshape(n, H, D).transpose(0, 2, 1),
      lambda y: y.transpose(0, 2, 1).reshape(n * H, D),
    )

  # o_proj [D, N*H]  <->  attn_vec_einsum [N, H, D].
  heads_out = (lambda x: x.T.reshape(N, H, D), lambda y: y.reshape(N * H, D).T)
  entries = [
    # The padded rows of a 256128-row table are not part of the HF model.
    Entry(
      prefix + "embed_tokens.weight",
      "embedder/embedding",
      (slice(0, V),),
      (V, D),
      _same,
      _same,
    ),
    Entry(prefix + "norm.weight", "final_norm/scale", (), (D,), _same, _same),
  ]
  # Naming trap: Gemma 1's post_attention_layernorm is the pre-MLP norm.
  norms = {"input_layernorm": "pre_attention_norm"}
  if cfg.sandwich_norms:
    norms.update(
      post_attention_layernorm="post_attention_norm",
      pre_feedforward_layernorm="pre_ffw_norm",
      post_feedforward_layernorm="post_ffw_norm",
    )
  else:
    norms["post_attention_layernorm"] = "pre_ffw_norm"
  attn, mlp = "layers/attn/", "layers/mlp/"
  for i in range(cfg.num_layers):
    p = f"{prefix}layers.{i}."
    entries += [
      Entry(f"{p}{hf}.weight", f"layers/{ours}/scale", (i,), (D,), _same, _same)
      for hf, ours in norms.items()
    ]
    if cfg.qk_norm:  # Gemma 3: RMSNorm of each head's queries and keys
      entries += [
        Entry(
          f"{p}self_attn.{hf}.weight",
          f"{attn}{ours}/scale",
          (i,),
          (H,),
          _same,
          _same,
        )
        for hf, ours in (("q_norm", "query_norm"), ("k_norm", "key_norm"))
      ]
    entries += [
      Entry(
        p + "self_attn.q_proj.weight",
        attn + "q_einsum/w",
        (i,),
        (N * H, D),
        *heads_in(N),
      ),
      Entry(
        p + "self_attn.k_proj.weight",
        attn + "kv_einsum/w",
        (i, 0),
        (K * H, D),
        *heads_in(K),
      ),
      Entry(
        p + "self_attn.v_proj.weight",
        attn + "kv_einsum/w",
        (i, 1),
        (K * H, D),
        *heads_in(K),
      ),
      Entry(
        p + "self_attn.o_proj.weight",
        attn + "attn_vec_einsum/w",
        (i,),
        (D, N * H),
        *heads_out,
      ),
      Entry(
        p + "mlp.gate_proj.weight",
        mlp + "gating_einsum/w",
        (i, 0),
        (F, D),
        _t,
        _t,
      ),
      Entry(
        p + "mlp.up_proj.weight",
        mlp + "gating_einsum/w",
        (i, 1),
        (F, D),
        _t,
        _t,
      ),
      Entry(p + "mlp.down_proj.weight", mlp + "linear/w", (i,), (D, F), _t, _t),
    ]
  return entries


def text_prefix(names) -> str:
  """TEXT_PREFIX, or the multimodal prefix that `names` use."""
  for prefix in MULTIMODAL_PREFIXES:
    if any(n.startswith(prefix) for n in names):
      return prefix
  return TEXT_PREFIX


def load_config(
  directory,
  model_cfg: ModelConfig | None = None,
  model_name: str = "the given model config",
) -> ModelConfig:
  """The directory's config; or `model_cfg` after checking that they agree."""
  path = Path(directory) / CONFIG
  try:
    hf = json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointError(
      f"{directory}: no {CONFIG}; not a Hugging Face model directory"
    ) from None
  found = hf_config.from_hf(hf, str(path))
  if model_cfg is None:
    return found
  hf_config.check_same_architecture(model_cfg, found, model_name, str(path))
  return model_cfg


def tensor_files(directory: Path) -> dict[str, Path]:
  """{tensor name: file holding it}."""
  if (directory / INDEX).exists():
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    return {name: directory / f for name, f in weight_map.items()}
  if (directory / WEIGHTS).exists():
    return dict.fromkeys(
      safetensors_io.shapes(directory / WEIGHTS), directory / WEIGHTS
    )
  raise CheckpointError(f"{directory}: neither {WEIGHTS} nor {INDEX} found")


def load(
  directory,
  model_cfg: ModelConfig | None = None,
  dtype=None,
  model_name: str = "the given model config",
  shardings=None,
) -> tuple[dict, ModelConfig]:
  """Reads an HF directory into a native params tree.

  model_cfg: the config to load into (e.g. a preset with a 256128-row
    embedding); it must agree with config.json. Default: from config.json.
  dtype: dtype of the params; default that of the stored tensors.
  shardings: None -> numpy arrays; a params-shaped tree of NamedShardings ->
    jax.Arrays, each tensor placed into its shards as it is read
    (gemma_jax.checkpoint.placement).
  """
  directory = Path(directory)
  cfg = load_config(directory, model_cfg, model_name)
  files = tensor_files(directory)
  found = {}
  for file in sorted(set(files.values())):
    found.update(safetensors_io.shapes(file))
  found.pop(TIED_HEAD, None)  # tied to the embedding (checked by from_hf)
  prefix = text_prefix(found)
  if prefix != TEXT_PREFIX:  # multimodal: the language model's tensors only
    found = {n: s for n, s in found.items() if n.startswith(prefix)}
  entries = {e.hf_name: e for e in tensor_map(cfg, prefix)}
  layout.check_shapes(
    found, {n: e.hf_shape for n, e in entries.items()}, str(directory)
  )
  # Leaves start as zeros: padding rows of the embedding stay 0.
  out = placement.target(layout.param_shapes(cfg), shardings, dtype)
  by_file: dict[Path, list[str]] = {}
  for name in entries:
    by_file.setdefault(files[name], []).append(name)
  for file, names in by_file.items():
    for name, x in safetensors_io.read(file, names):
      e = entries[name]
      out.set(e.path, e.index, e.to_native(x))
  return out.tree(), cfg


def _shards(tensors, max_bytes):
  shards, size = [[]], 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
  """{file name: contents} of a transformers GemmaTokenizer directory.

  The settings are those of the official Gemma releases' tokenizer_config:
  a bos is prepended on encode (add_bos_token), no eos appended, and decode
  does not rewrite spaces (clean_up_tokenization_spaces false).
  """
  config = {
    "add_bos_token": True,
    "add_eos_token": False,
    **SPECIAL_TOKENS,
    "clean_up_tokenization_spaces": False,
    "spaces_between_special_tokens": False,
    "sp_model_kwargs": {},
    "tokenizer_class": "GemmaTokenizer",
  }

  def text(d):
    return (json.dumps(d, indent=2) + "\n").encode()

  return {
    TOKENIZER_MODEL: tokenizer.serialized(),
    "tokenizer_config.json": text(config),
    "special_tokens_map.json": text(SPECIAL_TOKENS),
  }


def save(
  directory,
  params,
  cfg: ModelConfig,
  *,
  dtype=None,
  max_shard_bytes: int = DEFAULT_SHARD_BYTES,
  force=False,
  tokenizer: Tokenizer | None = None,
) -> None:
  """Writes an HF directory (config.json + safetensors) from native params.

  Shards (with an index) when the weights exceed `max_shard_bytes`. With a
  `tokenizer` (checked against cfg.vocab_size first), its files too. Atomic:
  `directory` appears only once complete.
  """
  if tokenizer is not None:
    tokenizer.check_vocab(cfg.vocab_size)
  directory = Path(directory)
  flat = dict(layout.flatten(meta.unbox(params)))
  layout.check_shapes(
    {p: tuple(np.shape(x)) for p, x in flat.items()},
    layout.param_shapes(cfg),
    "params",
  )
  dtype = np.dtype(dtype or flat["embedder/embedding"].dtype)
  hf = hf_config.to_hf(cfg, dtype.name)  # fails before anything is written

  def make(e: Entry):  # refuses NaN or inf before it reaches the file
    x = np.asarray(flat[e.path][e.index])
    return e.to_hf(publish.check_finite_leaf(x, e.path, directory))

  tensors = [
    safetensors_io.Tensor(
      e.hf_name, e.hf_shape, dtype, functools.partial(make, e)
    )
    for e in tensor_map(cfg)
  ]
  shards = _shards(tensors, max_shard_bytes)
  with fileio.atomic_directory(directory, overwrite=force) as tmp:
    (tmp / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
      name = (
        WEIGHTS
        if len(shards) == 1
        else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      )
      safetensors_io.write(tmp / name, shard, {"format": "pt"})
      weight_map.update((t.name, name) for t in shard)
    if len(shards) > 1:
      index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors)},
        "weight_map": weight_map,
      }
      (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
      for name, data in tokenizer_files(tokenizer).items():
        (tmp / name).write_bytes(data)
