"""GGUF files for llama.cpp (and Ollama, LM Studio): native params -> one
`.gguf` file, written with the `gguf` package (maintained with llama.cpp).

    gguf.save("tiny.gguf", params, cfg, tokenizer, "q4_0")

What llama.cpp's loaders read (src/models/gemma*.cpp, llama-model.cpp) and
its own converter writes (convert_hf_to_gguf.py, conversion/gemma.py):

  architecture  'gemma' (Gemma 1), 'gemma2' (sandwich norms, soft-caps),
                'gemma3' (QK-norm); anything else a loader would compute
                differently is refused before the file is opened (`check`).
  tensors       HF names mapped by gguf's TensorNameMap (token_embd,
                blk.N.attn_q, ..., output_norm); matrices [out, in] as HF
                stores them (GGML's ne0 is `in`, the contraction axis that
                blocks of 32 run along). The tied embedding is the output
                projection too.
  RMSNorm       llama.cpp multiplies by the stored weight; Gemma by 1 + w:
                every norm is written as 1 + w, in F32.
  embedding     stored unscaled; the loader multiplies by sqrt(d_model).
  query scale   not a key: the loader uses 1/sqrt(head_dim), or for the
                27B (46 layers for gemma2, 62 for gemma3) 1/sqrt(d_model /
                num_heads); a model with any other scale is refused.
  local layers  `sliding_window_pattern` as one bool per layer (true:
                sliding window), `rope.freq_base_swa` their RoPE base; llama.
                cpp's gemma3 applies no RoPE scaling on local layers.
  vocabulary    the SentencePiece pieces, scores and types ('llama' model),
                padded to vocab_size with [PADi] pieces of type UNUSED as
                llama.cpp's converter does, ids bos 2 / eos 1 / unk 3 /
                pad 0, add_bos true, add_eos false, no space prefix.

Tensor types: F32, F16 and BF16 (every matrix; norms F32 as llama.cpp
requires), Q8_0 and Q4_0 (the matrices of the quantized groups; the others
F32). Q8_0/Q4_0 tensors are `gemma_jax.model.quant.quantize` with scheme
q8_0/q4_0 (GGML's rounding, bit for bit) packed into GGML blocks, so a
model trained with that QAT scheme is written as exactly the weights its
forward pass used. A QAT model is written as it runs in the float types too
(its quantized weights dequantized).
"""

import dataclasses
import os

import numpy as np
from etils import epath
from flax.linen import meta

from gemma_jax import fileio
from gemma_jax.checkpoint import hf, hf_config, layout, publish
from gemma_jax.errors import ConfigError
from gemma_jax.model import quant as quant_lib
from gemma_jax.model.config import ModelConfig
from gemma_jax.tokenizer import Tokenizer

TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # entries per GGML Q4_0 / Q8_0 block
# The model family each HF module name belongs to (for --targets).
_GROUP_OF = {
  "q_proj": "attn",
  "k_proj": "attn",
  "v_proj": "attn",
  "o_proj": "attn",
  "gate_proj": "mlp",
  "up_proj": "mlp",
  "down_proj": "mlp",
  "embed_tokens": "embed",
}


def _gguf():
  try:
    import gguf
  except ImportError:
    raise ConfigError(
      "--to gguf needs the `gguf` package: pip install 'gemma-jax[gguf]'"
    ) from None
  return gguf


def architecture(cfg: ModelConfig) -> str:
  """'gemma', 'gemma2' or 'gemma3': the llama.cpp loader for `cfg`."""
  if cfg.qk_norm:
    return "gemma3"
  return "gemma2" if cfg.sandwich_norms else "gemma"


def _loader_query_scale(cfg: ModelConfig, arch: str) -> float:
  """The query scale llama.cpp's loader computes (it reads no key)."""
  is_27b = {"gemma2": 46, "gemma3": 62}.get(arch) == cfg.num_layers
  return (cfg.d_model // cfg.num_heads if is_27b else cfg.head_dim) ** -0.5


def check(cfg: ModelConfig, tensor_type: str) -> str:
  """ConfigError (one line) if llama.cpp would run `cfg` differently than
  we do, or `tensor_type` cannot hold it; else its architecture."""
  arch = architecture(cfg)
  where = f"--to gguf ({arch})"

  def refuse(field: str, why: str):
    raise ConfigError(f"{where}: model.{field} {why}")

  if tensor_type not in TENSOR_TYPES:
    raise ConfigError(
      f"--gguf-type: {tensor_type!r}; valid: {', '.join(TENSOR_TYPES)}"
    )
  local = any(cfg.layer_windows)
  if arch == "gemma":
    if local:
      refuse(
        "attention_pattern", "has local layers; llama.cpp's gemma has none"
      )
    for key in ("attn_logit_softcap", "final_logit_softcap"):
      if getattr(cfg, key) is not None:
        refuse(key, "is set; llama.cpp's gemma applies no soft-cap")
  if arch == "gemma2":
    for key in ("attn_logit_softcap", "final_logit_softcap"):
      if getattr(cfg, key) is None:
        refuse(key, "is null; llama.cpp's gemma2 always soft-caps")
  if arch == "gemma3" and cfg.attn_logit_softcap is not None:
    refuse("attn_logit_softcap", "is set; llama.cpp's gemma3 has none")
  if not np.isclose(cfg.query_scale, _loader_query_scale(cfg, arch)):
    refuse(
      "query_pre_attn_scalar",
      f"gives query scale {cfg.query_scale:.6g}; llama.cpp's {arch} "
      f"uses {_loader_query_scale(cfg, arch):.6g} for {cfg.num_layers} layers",
    )
  glob = {r for r, w in zip(cfg.layer_ropes, cfg.layer_windows) if not w}
  swa = {r for r, w in zip(cfg.layer_ropes, cfg.layer_windows) if w}
  if len(glob) > 1 or len(swa) > 1:
    refuse("attention_pattern", "gives layers of one kind different RoPE")
  if arch == "gemma" and cfg.rope_scale_factor != 1:
    refuse("rope_scale_factor", "is not 1; llama.cpp's gemma has no scaling")
  if swa:
    factor = next(iter(swa))[1]
    want = next(iter(glob))[1] if arch == "gemma2" and glob else 1.0
    if factor != want:
      refuse(
        "local_rope_scale_factor",
        f"is {factor}; llama.cpp's {arch} scales local layers' RoPE by {want}",
      )
  return arch


def default_type(cfg: ModelConfig) -> str:
  """The model's QAT scheme where it is GGML's (q4_0/q8_0), else f32."""
  scheme = cfg.quant.scheme if cfg.quant is not None else None
  return scheme if scheme in quant_lib.GGML_SCHEMES else "f32"


def quantized_groups(cfg: ModelConfig, tensor_type: str) -> tuple[str, ...]:
  """The groups written as `tensor_type` (Q8_0/Q4_0): a QAT model's own
  targets (its scheme must be that type), else every group (as llama.cpp
  quantizes every matrix)."""
  if tensor_type not in quant_lib.GGML_SCHEMES:
    return ()
  if cfg.quant is None:
    return quant_lib.GROUPS
  if cfg.quant.scheme != tensor_type:
    raise ConfigError(
      f"--gguf-type {tensor_type}: the model trained with quant scheme "
      f"{cfg.quant.scheme} (bits {cfg.quant.bits}); its {tensor_type} "
      f"weights would not be those it learned: export f32/f16/bf16 or "
      f"train with model.quant.scheme: {tensor_type}"
    )
  return cfg.quant.targets


def ggml_blocks(q: np.ndarray, scale: np.ndarray, tensor_type: str):
  """(q, scale) of `quant.quantize(w [..., X], -1, ..., scheme)` -> GGML's
  blocks as uint8 [..., X / 32 * block bytes]: an fp16 scale, then Q8_0's 32
  int8 values, or Q4_0's 32 values + 8 in nibbles (entry j low, j + 16
  high)."""
  q = np.asarray(q).astype(np.int8)
  shape = q.shape[:-1]
  blocks = q.reshape(*shape, -1, BLOCK)
  d = np.asarray(scale, np.float32).astype(np.float16)[..., None]
  if tensor_type == "q4_0":
    nib = (blocks + 8).astype(np.uint8)
    body = nib[..., : BLOCK // 2] | (nib[..., BLOCK // 2 :] << 4)
  else:
    body = blocks.view(np.uint8)
  out = np.concatenate([d.view(np.uint8), body], axis=-1)
  return out.reshape(*shape, -1)


def _name_map(cfg: ModelConfig, arch: str):
  g = _gguf()
  arch_enum = next(a for a, n in g.MODEL_ARCH_NAMES.items() if n == arch)
  return g.get_tensor_name_map(arch_enum, cfg.num_layers)


def _vocab(tokenizer: Tokenizer, vocab_size: int):
  """(pieces, scores, types) padded to vocab_size as llama.cpp's converter
  pads (`_create_vocab_sentencepiece`)."""
  import sentencepiece as spm

  g = _gguf()
  sp = spm.SentencePieceProcessor(model_proto=tokenizer.serialized())
  types = g.TokenType
  pieces = [f"[PAD{i}]".encode() for i in range(vocab_size)]
  scores = [-10000.0] * vocab_size
  kinds = [int(types.UNUSED)] * vocab_size
  for i in range(sp.get_piece_size()):
    pieces[i] = sp.id_to_piece(i).encode()
    scores[i] = sp.get_score(i)
    kinds[i] = int(
      types.UNKNOWN
      if sp.is_unknown(i)
      else types.CONTROL
      if sp.is_control(i)
      else types.UNUSED
      if sp.is_unused(i)
      else types.BYTE
      if sp.is_byte(i)
      else types.NORMAL
    )
  return pieces, scores, kinds


def _metadata(writer, cfg: ModelConfig, arch: str, tensor_type: str) -> None:
  g = _gguf()
  hf_cfg = hf_config.to_hf(cfg, "float32")
  w = writer
  w.add_name(cfg.name)
  w.add_context_length(hf_cfg["max_position_embeddings"])
  w.add_embedding_length(cfg.d_model)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  file_types = {
    "f32": g.LlamaFileType.ALL_F32,
    "f16": g.LlamaFileType.MOSTLY_F16,
    "bf16": g.LlamaFileType.MOSTLY_BF16,
    "q8_0": g.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": g.LlamaFileType.MOSTLY_Q4_0,
  }
  w.add_file_type(file_types[tensor_type])
  w.add_quantization_version(g.GGML_QUANT_VERSION)
  windows = cfg.layer_windows
  glob = next((r for r, x in zip(cfg.layer_ropes, windows) if not x), None)
  swa = next((r for r, x in zip(cfg.layer_ropes, windows) if x), None)
  if glob is not None:
    w.add_rope_freq_base(glob[0])
    if glob[1] != 1:
      w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
      w.add_rope_scaling_factor(glob[1])
  if swa is not None:
    w.add_sliding_window(cfg.sliding_window)
    w.add_rope_freq_base_swa(swa[0])
    if glob is None:  # all local: the base key is theirs too
      w.add_rope_freq_base(swa[0])
  if arch != "gemma":
    w.add_sliding_window_pattern([bool(x) for x in windows])
  if cfg.attn_logit_softcap is not None:
    w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
  if cfg.final_logit_softcap is not None:
    w.add_final_logit_softcapping(cfg.final_logit_softcap)


def _tokenizer_metadata(writer, tokenizer: Tokenizer, vocab_size: int):
  from gemma_jax import tokenizer as tok

  pieces, scores, kinds = _vocab(tokenizer, vocab_size)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(pieces)
  writer.add_token_scores(scores)
  writer.add_token_types(kinds)
  writer.add_bos_token_id(tok.BOS_ID)
  writer.add_eos_token_id(tok.EOS_ID)
  writer.add_unk_token_id(tok.UNK_ID)
  writer.add_pad_token_id(tok.PAD_ID)
  writer.add_add_bos_token(True)
  writer.add_add_eos_token(False)
  writer.add_add_space_prefix(False)


@dataclasses.dataclass(frozen=True)
class _Tensor:
  name: str
  entry: hf.Entry
  qtype: str  # 'f32' 'f16' 'bf16' 'q8_0' 'q4_0'


def plan(cfg: ModelConfig, tensor_type: str) -> list[_Tensor]:
  """Every tensor of the file, in order, with its GGUF name and type;
  ConfigError if a quantized one's contraction axis is not blocks of 32."""
  arch = architecture(cfg)
  names = _name_map(cfg, arch)
  groups = quantized_groups(cfg, tensor_type)
  out = []
  for e in hf.tensor_map(cfg):
    name = names.get_name(e.hf_name, try_suffixes=(".weight",))
    if name is None:  # unreachable for the tensors hf.tensor_map lists
      raise ConfigError(f"--to gguf: no GGUF name for {e.hf_name}")
    module = e.hf_name.split(".")[-2]
    if len(e.hf_shape) == 1:
      qtype = "f32"  # norms: llama.cpp computes them in F32
    elif tensor_type in quant_lib.GGML_SCHEMES:
      qtype = tensor_type if _GROUP_OF[module] in groups else "f32"
    else:
      qtype = tensor_type
    if qtype in quant_lib.GGML_SCHEMES and e.hf_shape[-1] % BLOCK:
      raise ConfigError(
        f"--gguf-type {qtype}: blocks of {BLOCK} do not divide the "
        f"contraction axis of {name} (size {e.hf_shape[-1]}, shape "
        f"{e.hf_shape}); export it as f32, f16 or bf16"
      )
    out.append(_Tensor(name, e, qtype))
  return out


def _array(t: _Tensor, flat: dict, cfg: ModelConfig, directory):
  """One tensor's data as GGUF stores it (float32, float16, or GGML's
  bytes)."""
  import jax
  import jax.numpy as jnp

  g = _gguf()
  e = t.entry
  x = np.asarray(flat[e.path][e.index])
  x = publish.check_finite_leaf(x, e.path, directory)
  x = np.asarray(e.to_hf(x), np.float32)
  types = g.GGMLQuantizationType
  if len(e.hf_shape) == 1:
    return x + np.float32(1.0)  # Gemma's RMSNorm is 1 + w
  module = e.hf_name.split(".")[-2]
  qat = cfg.quant
  if t.qtype in quant_lib.GGML_SCHEMES:
    bits = quant_lib.GGML_SCHEMES[t.qtype][0]
    q, scale = jax.jit(quant_lib.quantize, static_argnums=(1, 2, 3, 4))(
      jnp.asarray(x), -1, bits, BLOCK, t.qtype
    )
    return ggml_blocks(np.asarray(q), np.asarray(scale), t.qtype)
  if qat is not None and _GROUP_OF[module] in qat.targets:
    # A QAT model runs its quantized weights: write those. The HF layout
    # keeps the blocks (each lies within one head: quant.check_block).
    x = np.asarray(
      jax.jit(quant_lib.fake_quant, static_argnums=(1, 2, 3, 4))(
        jnp.asarray(x), -1, qat.bits, qat.block_size, qat.scheme
      )
    )
  if t.qtype == "f32":
    return x
  return g.quants.quantize(x, getattr(types, t.qtype.upper()))


def save(
  path,
  params,
  cfg: ModelConfig,
  tokenizer: Tokenizer,
  tensor_type: str | None = None,
  *,
  force: bool = False,
) -> int:
  """Writes the GGUF file at `path` (local); returns its size in bytes.
  tensor_type: one of TENSOR_TYPES (None: `default_type`). Every check runs
  before the file is opened, and the file appears under its name only once
  complete."""
  tensor_type = tensor_type or default_type(cfg)
  arch = check(cfg, tensor_type)
  tokenizer.check_vocab(cfg.vocab_size)
  if not fileio.is_local(path):
    raise ConfigError(
      f"{path}: --to gguf writes a local file; copy it to storage after"
    )
  path = epath.Path(fileio.absolute(path))
  if path.exists() and not force:
    raise ConfigError(f"{path} already exists; pass --force to replace it")
  if path.is_dir():
    raise ConfigError(f"{path} is a directory; --to gguf writes one file")
  flat = dict(layout.flatten(meta.unbox(params)))
  layout.check_shapes(
    {p: tuple(np.shape(x)) for p, x in flat.items()},
    layout.param_shapes(cfg),
    "params",
  )
  tensors = plan(cfg, tensor_type)
  g = _gguf()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  writer = g.GGUFWriter(str(tmp), arch)
  try:
    _metadata(writer, cfg, arch, tensor_type)
    _tokenizer_metadata(writer, tokenizer, cfg.vocab_size)
    # Tensor infos first (their sizes from the shapes), then the data one
    # tensor at a time: the model is never held twice.
    dtype: np.dtype
    for t in tensors:
      qtype = getattr(g.GGMLQuantizationType, t.qtype.upper())
      if t.qtype == "f32":
        shape, dtype, width = t.entry.hf_shape, np.dtype(np.float32), 4
      else:  # bytes: two per F16/BF16 value, GGML blocks of Q8_0/Q4_0
        shape = g.quant_shape_to_byte_shape(t.entry.hf_shape, qtype)
        dtype, width = np.dtype(np.uint8), 1
      nbytes = width * int(np.prod(shape))
      writer.add_tensor_info(t.name, shape, dtype, nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
      array = np.ascontiguousarray(_array(t, flat, cfg, path))
      if t.qtype != "f32":
        array = array.view(np.uint8)
      writer.write_tensor_data(array)
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    writer.close()
    if tmp.exists():
      tmp.unlink()
    raise
  return os.path.getsize(path)
