"""gemma-jax convert --from {hf,kaggle,native} --to {native,hf,kaggle,gguf}
SRC DST.

    # Hugging Face directory -> native (config read from config.json)
    gemma-jax convert --from hf --to native gemma-2-2b/ ckpt/gemma2-2b
    # official Flax checkpoint: it carries no config, so name one
    gemma-jax convert --from kaggle --to native --model gemma2-9b 9b/ ckpt/9b
    # native -> Hugging Face (loads in transformers), sharded above 2 GB
    gemma-jax convert --from native --to hf --max-shard-size 2GB ckpt/9b hf-9b/
    # ... with the tokenizer, so AutoTokenizer (and lm-eval's `hf`) load it
    gemma-jax convert --from native --to hf --tokenizer tok.model ckpt/ hf/
    # a LoRA adapter merged into its base (W + alpha/r A B)
    gemma-jax convert --from native --to hf --adapter runs/lora/adapter \
        ckpt/9b hf-9b-tuned/
    # int4/int8 weights (gemma-jax quantize) dequantized to float
    gemma-jax convert --from quantized --to hf ckpt/9b-int4 hf-9b-int4/
    # native -> official Flax layout (the `gemma` library, gemma.cpp, Kaggle)
    gemma-jax convert --from native --to kaggle ckpt/9b official-9b/
    # native -> one GGUF file for llama.cpp / Ollama (f32 f16 bf16 q8_0 q4_0)
    gemma-jax convert --from native --to gguf --gguf-type q4_0 \
        --tokenizer tok.model ckpt/9b gemma2-9b-q4_0.gguf

SRC and DST may be gs:// paths (a Hugging Face SRC there is read through a
local copy; an HF DST is written locally, then uploaded).

`--model` is a preset name or a YAML/JSON file with a model section (a
preset plus overrides, or every field); with --from hf/native it must agree
with the stored config and decides the output config (e.g. a preset's
256128-row embedding, zero-padded).

A model trained with quantization (model.quant, QAT) goes to Hugging Face
with its weights quantized and dequantized, i.e. as it runs.

With --to hf, `--tokenizer PATH` writes that SentencePiece model and its
transformers configs into DST. Without it, converting a run's params export
(RUN/params, local or gs://) takes the tokenizer that RUN/config.yaml names
in `data.tokenizer`; where that file is not on this machine, a warning says
that the export has no tokenizer.

--to gguf writes one local file (gemma_jax.checkpoint.gguf) and needs the
tokenizer (the vocabulary is part of the file), found the same way.
`--gguf-type` defaults to the model's QAT scheme where it is q4_0 or q8_0,
else f32; q4_0/q8_0 quantize a float model's every matrix (post-training)
or a QAT model's targets exactly as its forward pass did.
"""

import dataclasses
import json
import pathlib
import re
import sys

import jax.numpy as jnp

from gemma_jax import configlib, fileio
from gemma_jax.checkpoint import (
  formats,
  hf,
  hf_config,
  kaggle,
  native,
  quantized,
)
from gemma_jax.errors import ConfigError
from gemma_jax.model import quant as quant_lib
from gemma_jax.model.config import PRESETS, ModelConfig
from gemma_jax.tokenizer import Tokenizer

HELP = "convert checkpoints between Hugging Face, official Flax and native"


def add_arguments(parser):
  parser.add_argument(
    "--from",
    dest="src_format",
    required=True,
    choices=("hf", "kaggle", "native", "quantized"),
  )
  parser.add_argument(
    "--to",
    dest="dst_format",
    required=True,
    choices=("native", "hf", "kaggle", "gguf"),
  )
  parser.add_argument("src", help="source checkpoint directory")
  parser.add_argument(
    "dst", help="destination directory (must not exist unless --force)"
  )
  parser.add_argument(
    "--model", help=f"model preset ({', '.join(PRESETS)}) or config file"
  )
  parser.add_argument(
    "--kaggle-gating",
    choices=("auto", "DF", "FD"),
    default="auto",
    help="official gating_einsum layout: "
    "[2,D,F] or [2,F,D] (Gemma 2 9B/27B, Gemma 3); auto reads the "
    "shape, or the preset name when d_model == mlp_dim; --to kaggle: "
    "auto writes that of the model's official checkpoints",
  )
  parser.add_argument(
    "--dtype",
    choices=("keep", "float32", "bfloat16", "float16"),
    default="keep",
    help="dtype of the written weights",
  )
  parser.add_argument(
    "--max-shard-size",
    default="5GB",
    help="HF output: shard above this size (e.g. 500MB)",
  )
  parser.add_argument(
    "--force", action="store_true", help="replace DST if it exists"
  )
  parser.add_argument(
    "--adapter",
    help="a LoRA adapter directory (e.g. "
    "RUN/adapter) to merge into SRC: W + (alpha/r) A B",
  )
  parser.add_argument(
    "--tokenizer",
    help="--to hf/gguf: SentencePiece model to "
    "write beside the weights (default: a run's "
    "data.tokenizer when SRC is RUN/params)",
  )
  parser.add_argument(
    "--gguf-type",
    choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
    default=None,
    help="--to gguf: tensor type of the matrices (default: the model's "
    "quant scheme if q4_0/q8_0, else f32)",
  )


def parse_size(text: str) -> int:
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.I)
  if not match:
    raise ConfigError(f"--max-shard-size: cannot parse {text!r}; e.g. 5GB")
  units = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
  }
  return int(float(match[1]) * units[(match[2] or "B").lower()])


def model_config(spec: str) -> ModelConfig:
  """A preset name, or a YAML/JSON file holding a model section."""
  from gemma_jax.train.config import model_config_from_dict

  if spec in PRESETS:
    return PRESETS[spec]
  if not pathlib.Path(spec).is_file():
    raise ConfigError(
      f"--model: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
    )
  data = configlib.load_yaml(spec)  # YAML is a superset of JSON
  data = data.get("model", data)
  if isinstance(data, str):
    data = {"preset": data}
  return model_config_from_dict(data, "model")


def load(args, dtype):
  given = model_config(args.model) if args.model else None
  name = f"--model {args.model}"
  if args.src_format == "hf" and not fileio.is_local(args.src):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gemma-jax-hf-") as tmp:
      fileio.copy_tree(args.src, f"{tmp}/hf")
      return hf.load(f"{tmp}/hf", given, dtype, model_name=name)
  if args.src_format == "hf":
    return hf.load(args.src, given, dtype, model_name=name)
  if args.src_format == "kaggle":
    if given is None:
      raise ConfigError(
        "--from kaggle needs --model (a preset or config "
        "file): official checkpoints carry no config"
      )
    gating = {"auto": None, "DF": False, "FD": True}[args.kaggle_gating]
    return kaggle.load(
      args.src, given, transposed_gating=gating, dtype=dtype
    ), given
  if args.src_format == "quantized":
    params, stored = quantized.load(args.src)
    params = quant_lib.dequantize_params(
      params, stored, dtype or jnp.dtype(stored.param_dtype)
    )
    stored = dataclasses.replace(stored, quant=None)
  else:
    params, stored = native.load(args.src, dtype=dtype)
  if given is not None:
    hf_config.check_same_architecture(given, stored, name, args.src)
    return params, given
  return params, stored


def run_tokenizer(src) -> str | None:
  """data.tokenizer of the run whose params export is `src` (RUN/params,
  local or gs://), if RUN/config.yaml names one; a warning where that file
  is not here."""
  import yaml
  from etils import epath

  fileio.check_remote(src, "source")
  src = epath.Path(src)
  config = src.parent / "config.yaml"
  if src.name != "params" or not config.is_file():
    return None
  try:
    data = yaml.safe_load(config.read_text())
  except (OSError, UnicodeDecodeError, yaml.YAMLError):
    return None  # not a run's config: it names no tokenizer
  data = data.get("data") if isinstance(data, dict) else None
  path = data.get("tokenizer") if isinstance(data, dict) else None
  if not isinstance(path, str) or not path:
    return None
  found = pathlib.Path(path).expanduser()
  if found.is_file():
    return str(found)
  print(
    f"gemma-jax convert: warning: {config} names data.tokenizer {path}, "
    "which is not a file on this machine, so the export has no tokenizer; "
    "pass --tokenizer PATH to add one",
    file=sys.stderr,
  )
  return None


def tokenizer_for(args):
  """The Tokenizer to export with --to hf or gguf, or None."""
  with_tokenizer = args.dst_format in ("hf", "gguf")
  if args.tokenizer and not with_tokenizer:
    raise ConfigError("--tokenizer goes with --to hf or --to gguf")
  path = args.tokenizer
  if path is None and with_tokenizer and args.src_format == "native":
    path = run_tokenizer(args.src)
  if path is None and args.dst_format == "gguf":
    raise ConfigError(
      "--to gguf needs the tokenizer (its vocabulary is part of the file): "
      "pass --tokenizer PATH"
    )
  return None if path is None else Tokenizer.load(path)


def save_gguf(args, params, cfg, tokenizer) -> tuple[str, int]:
  """(tensor type, bytes) of the GGUF file written at args.dst."""
  from gemma_jax.checkpoint import gguf

  kind = args.gguf_type or gguf.default_type(cfg)
  return kind, gguf.save(
    args.dst, params, cfg, tokenizer, kind, force=args.force
  )


def merge_adapter(params, cfg, path):
  """params + the LoRA adapter at `path` merged in, and their config."""
  import jax

  from gemma_jax.checkpoint import adapter
  from gemma_jax.model import lora

  adapters, adapted_cfg, _ = adapter.load(path, base_cfg=cfg)
  merged = jax.jit(lora.merge_params, static_argnums=2)(
    params, adapters, adapted_cfg
  )
  return jax.device_get(merged), lora.merged_config(adapted_cfg)


def read_source(args, dtype):
  """`load`, with any library failure on a bad source (garbage or
  truncated safetensors, a directory that is not an orbax checkpoint)
  turned into one CheckpointError naming the source."""
  from etils import epath

  from gemma_jax.errors import CheckpointError

  fileio.check_remote(args.src, "source")
  src = epath.Path(args.src)
  if not src.exists():
    raise CheckpointError(f"{args.src}: no such checkpoint directory")
  if not src.is_dir():
    raise CheckpointError(
      f"{args.src} is a file; --from {args.src_format} "
      f"takes a checkpoint directory"
    )
  with formats.readable(
    args.src, args.src_format, what=None, fix="check the path and --from"
  ):
    return load(args, dtype)


def save_hf(dst, params, cfg, force=False, **kwargs) -> None:
  """hf.save, to a gs:// `dst` through a local directory uploaded once
  complete (config.json last)."""
  if fileio.is_local(dst):
    hf.save(dst, params, cfg, force=force, **kwargs)
    return
  import tempfile

  from etils import epath

  fileio.check_remote(dst, "destination")
  if epath.Path(dst).exists() and not force:
    raise ConfigError(f"{dst} already exists; pass --force to replace it")
  with tempfile.TemporaryDirectory(prefix="gemma-jax-hf-") as tmp:
    hf.save(f"{tmp}/hf", params, cfg, **kwargs)
    fileio.publish_directory(f"{tmp}/hf", dst)


def main(args) -> int:
  dtype = None if args.dtype == "keep" else jnp.dtype(args.dtype)
  if args.gguf_type is not None and args.dst_format != "gguf":
    raise ConfigError("--gguf-type goes with --to gguf")
  tokenizer = tokenizer_for(args)
  params, cfg = read_source(args, dtype)
  if args.adapter:
    params, cfg = merge_adapter(params, cfg, args.adapter)
  if args.dst_format == "gguf":
    kind, size = save_gguf(args, params, cfg, tokenizer)
    summary = {
      "from": args.src_format,
      "to": "gguf",
      "dst": args.dst,
      "model": cfg.name,
      "gguf_type": kind,
      "bytes": size,
      "tokenizer": tokenizer.path if tokenizer else None,
    }
    print(json.dumps(summary))
    return 0
  if args.dst_format in ("hf", "kaggle") and cfg.quant is not None:
    # A QAT model's float weights run quantized: the export gets what runs.
    params = quant_lib.dequantize_params(
      quant_lib.quantize_params(params, cfg), cfg, jnp.dtype(cfg.param_dtype)
    )
    cfg = dataclasses.replace(cfg, quant=None)
  if dtype is not None:
    cfg = dataclasses.replace(cfg, param_dtype=args.dtype)
  if args.dst_format == "native":
    native.save(args.dst, params, cfg, force=args.force)
  elif args.dst_format == "kaggle":
    kaggle.save(
      args.dst,
      params,
      cfg,
      transposed_gating={"auto": None, "DF": False, "FD": True}[
        args.kaggle_gating
      ],
      force=args.force,
    )
  else:
    save_hf(
      args.dst,
      params,
      cfg,
      max_shard_bytes=parse_size(args.max_shard_size),
      force=args.force,
      tokenizer=tokenizer,
    )
  summary = {
    "from": args.src_format,
    "to": args.dst_format,
    "dst": args.dst,
    "model": cfg.name,
    "params": cfg.param_count(),
    "tokenizer": tokenizer.path if tokenizer else None,
  }
  print(json.dumps(summary))
  return 0
