"""gemma-jax merge: average, SLERP or interpolate native checkpoints.

    # weighted average (weights sum to 1; default equal)
    gemma-jax merge ft_a/ ft_b/ ft_c/ --weights 0.5 0.3 0.2 --out merged/
    # task arithmetic: base + sum_i w_i (ft_i - base), weights free
    gemma-jax merge ft_a/ ft_b/ --base sft/ --weights 0.7 0.7 --out ta/
    # WARP: SLERP of the task vectors, then 30% of the way from the base
    gemma-jax merge ft_a/ ft_b/ --method slerp --base sft/ --t 0.5 \\
        --eta 0.3 --out warp/
    # straight to Hugging Face safetensors
    gemma-jax merge ft_a/ ft_b/ --out merged-hf/ --to hf --dtype bfloat16

Every input (and --base) must be a native checkpoint of the same model. The
merge reads one parameter of every input at a time, computes in float32 and
writes the inputs' dtype unless --dtype says otherwise. Formulas: README
section "Merging" and gemma_jax/checkpoint/merge.py.
"""

import json
import time

from gemma_jax.checkpoint import merge
from gemma_jax.commands import finite_float
from gemma_jax.commands.convert import parse_size

HELP = "merge native checkpoints: weighted average, SLERP, LITI"


def add_arguments(parser):
  parser.add_argument(
    "inputs", nargs="+", help="native checkpoint directories of one model"
  )
  parser.add_argument(
    "--out",
    required=True,
    help="destination directory (must not exist unless --force)",
  )
  parser.add_argument("--method", choices=merge.METHODS, default="linear")
  parser.add_argument(
    "--weights",
    type=finite_float,
    nargs="+",
    help="linear: one weight per input (default equal); "
    "they must sum to 1 unless --base is given",
  )
  parser.add_argument(
    "--normalize",
    action="store_true",
    help="linear: divide the weights by their sum",
  )
  parser.add_argument(
    "--base",
    help="native checkpoint the task vectors "
    "are taken from (needed by slerp and --eta)",
  )
  parser.add_argument(
    "--t",
    type=finite_float,
    default=0.5,
    help="slerp: 0 gives the first input, 1 the second",
  )
  parser.add_argument(
    "--eta",
    type=finite_float,
    default=1.0,
    help="interpolate toward --base: base + eta (merged - "
    "base), eta in [0, 1] (WARP's LITI)",
  )
  parser.add_argument(
    "--dtype",
    choices=("keep", "float32", "bfloat16", "float16"),
    default="keep",
    help="dtype of the written weights (keep: the inputs')",
  )
  parser.add_argument(
    "--to", choices=("native", "hf"), default="native", help="output format"
  )
  parser.add_argument(
    "--max-shard-size",
    default="5GB",
    help="--to hf: shard above this size (e.g. 500MB)",
  )
  parser.add_argument(
    "--force", action="store_true", help="replace --out if it exists"
  )


def main(args) -> int:
  start = time.perf_counter()
  recipe = merge.Recipe(
    method=args.method,
    weights=tuple(args.weights) if args.weights else None,
    t=args.t,
    eta=args.eta,
    normalize=args.normalize,
  )
  cfg = merge.merge(
    args.inputs,
    args.out,
    recipe,
    base=args.base,
    dtype=None if args.dtype == "keep" else args.dtype,
    to=args.to,
    force=args.force,
    max_shard_bytes=parse_size(args.max_shard_size),
  )
  resolved = merge.resolve(recipe, len(args.inputs), args.base is not None)
  summary = {
    "method": args.method,
    "inputs": args.inputs,
    "base": args.base,
    "out": args.out,
    "to": args.to,
    "model": cfg.name,
    "params": cfg.param_count(),
    "dtype": cfg.param_dtype,
    "seconds": round(time.perf_counter() - start, 2),
  }
  if resolved.weights is not None:  # linear (resolve() filled them in)
    summary["weights"] = list(resolved.weights)
  else:
    summary["t"] = args.t
  if args.base is not None:
    summary["eta"] = args.eta
  print(json.dumps(summary))
  return 0
