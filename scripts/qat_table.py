"""Held-out loss per source of params exports, as they run or quantized.

The README's QAT table: a float model, its post-training int4 quantization
and QAT int4 after N steps from it, on the embedded corpus.

    python scripts/qat_table.py configs/tiny.yaml --batches 8 \\
        --eval "float32=runs/tiny/params" \\
        --ptq "int4 PTQ=runs/tiny/params" \\
        --eval "int4 QAT=runs/tiny-qat/params"

--eval runs an export with its own model config (a QAT export carries its
`quant` section, so it runs quantized); --ptq runs a float export with
`--bits/--block-size/--targets` quantization, which computes exactly what
`gemma-jax quantize` writes (tests/commands/test_quantize.py).
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gemma_jax.checkpoint import native
from gemma_jax.data import pipeline_for
from gemma_jax.model.quant import QuantConfig
from gemma_jax.train import metrics
from gemma_jax.train.config import load_config
from gemma_jax.train.program import TrainProgram


def evaluate(cfg, path, quant, batches):
  model = native.load_config(path)
  if quant is not None:
    model = dataclasses.replace(model, quant=quant)
  cfg = dataclasses.replace(cfg, model=model)
  program = TrainProgram(cfg)
  params, _ = native.load(path, shardings=program.param_shardings)
  pipe = pipeline_for(cfg)
  return metrics.evaluate(program, params, pipe, batches)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("config")
  # One list in command-line order: (flag, "LABEL=DIR").
  parser.add_argument(
    "--eval",
    dest="rows",
    action="append",
    default=[],
    type=lambda s: ("eval", s),
    metavar="LABEL=DIR",
  )
  parser.add_argument(
    "--ptq",
    dest="rows",
    action="append",
    type=lambda s: ("ptq", s),
    metavar="LABEL=DIR",
  )
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument(
    "--block-size", type=int, default=32, help="0: one scale per output channel"
  )
  parser.add_argument("--targets", default="attn,mlp")
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  cfg = load_config(args.config)
  quant = QuantConfig(
    bits=args.bits,
    block_size=args.block_size or None,
    targets=tuple(args.targets.split(",")),
  )
  rows = []
  for flag, item in args.rows:
    label, path = item.split("=", 1)
    rows.append(
      (
        label,
        evaluate(cfg, path, quant if flag == "ptq" else None, args.batches),
      )
    )
  sources = list(rows[0][1])
  print("| model | " + " | ".join(sources) + " | mean |")
  print("|---|" + "---:|" * (len(sources) + 1))
  for label, results in rows:
    losses = [results[s]["loss"] for s in sources]
    print(
      f"| {label} | "
      + " | ".join(f"{x:.4f}" for x in losses)
      + f" | {sum(losses) / len(losses):.4f} |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(rows), f, indent=2)


if __name__ == "__main__":
  main()
