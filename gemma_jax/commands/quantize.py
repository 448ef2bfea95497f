"""gemma-jax quantize: a float checkpoint -> int4/int8 weights and scales.

    # after QAT: the run's params carry model.quant; its settings are used
    gemma-jax quantize runs/qat/params ckpt/qat-int4
    # post-training quantization of any native checkpoint
    gemma-jax quantize ckpt/9b ckpt/9b-int4 --bits 4 --block-size 32
    gemma-jax quantize ckpt/9b ckpt/9b-int8 --bits 8 --block-size channel \\
        --targets attn,mlp,embed
    # GGML's Q4_0 rounding (what `convert --to gguf --gguf-type q4_0` writes)
    gemma-jax quantize ckpt/9b ckpt/9b-q4_0 --scheme q4_0

Writes the layout gemma_jax.checkpoint.quantized documents (one
safetensors file: int4 packed two per byte, float32 scales, the rest as
stored). `gemma-jax score --checkpoint DST` runs it; `gemma-jax convert
--from quantized --to hf DST HF/` writes it dequantized for Hugging Face.
The numbers are exactly those of the QAT forward pass (same rounding).
"""

import dataclasses
import json

from gemma_jax.errors import ConfigError

HELP = "quantize a checkpoint's weights to int4/int8 with scales"


def add_arguments(parser):
  parser.add_argument("src", help="native checkpoint (float weights)")
  parser.add_argument("dst", help="output directory")
  parser.add_argument(
    "--bits",
    type=int,
    choices=(4, 8),
    default=None,
    help="default: the source's model.quant, else 4",
  )
  parser.add_argument(
    "--block-size",
    default=None,
    help="entries per scale along the contraction axis, or "
    "'channel' for one scale per output channel "
    "(default: the source's model.quant, else 32)",
  )
  parser.add_argument(
    "--targets",
    default=None,
    help="comma-separated groups of attn, mlp, embed "
    "(default: the source's model.quant, else "
    "attn,mlp)",
  )
  parser.add_argument(
    "--scheme",
    choices=("symmetric", "q4_0", "q8_0"),
    default=None,
    help="rounding: ours (symmetric) or GGML's q4_0/q8_0 (blocks of 32, "
    "fp16 scales; set bits and block size); default: the source's "
    "model.quant, else symmetric",
  )
  parser.add_argument(
    "--force", action="store_true", help="replace DST if it exists"
  )


def quant_config(args, stored):
  """The QuantConfig to write: flags over the source's own over defaults."""
  from gemma_jax.model.quant import GGML_SCHEMES, QuantConfig

  base = stored or QuantConfig()
  fields = {}
  if args.scheme is not None:
    fields["scheme"] = args.scheme
    # GGML's formats fix both; flags given below still override (and a
    # mismatch is refused by QuantConfig).
    bits, block = GGML_SCHEMES.get(args.scheme, (base.bits, base.block_size))
    fields.update(bits=bits, block_size=block)
  if args.bits is not None:
    fields["bits"] = args.bits
  if args.block_size is not None:
    if args.block_size == "channel":
      fields["block_size"] = None
    else:
      try:
        fields["block_size"] = int(args.block_size)
      except ValueError:
        raise ConfigError(
          f"--block-size: {args.block_size!r} is neither an "
          f"integer nor 'channel'"
        ) from None
  if args.targets is not None:
    fields["targets"] = tuple(
      t.strip() for t in args.targets.split(",") if t.strip()
    )
  try:
    return dataclasses.replace(base, weights="int", **fields)
  except ConfigError as e:
    key, _, rest = str(e).partition(":")  # 'block_size: ...' -> flag
    raise ConfigError(f"--{key.replace('_', '-')}:{rest}") from None


def main(args) -> int:
  import jax

  from gemma_jax.checkpoint import native, publish, quantized
  from gemma_jax.model import quant as quant_lib

  params, cfg = native.load(args.src)
  # Rounding maps NaN to a finite integer: check before, not after.
  publish.check_finite(params, args.dst, source=args.src)
  quant = quant_config(args, cfg.quant)
  try:
    cfg = dataclasses.replace(cfg, quant=quant)
  except ConfigError as e:  # a block size that does not divide an axis
    raise ConfigError(
      str(e).replace("quant.block_size", "--block-size")
    ) from None
  qparams = jax.jit(quant_lib.quantize_params, static_argnums=1)(params, cfg)
  size = quantized.save(args.dst, qparams, cfg, force=args.force)
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  print(
    json.dumps(
      {
        "dst": args.dst,
        "model": cfg.name,
        "bits": quant.bits,
        "block_size": quant.block_size,
        "targets": list(quant.targets),
        "bytes": size,
        "source_bytes": float_bytes,
      }
    )
  )
  return 0
