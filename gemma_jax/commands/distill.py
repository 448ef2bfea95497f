"""gemma-jax distill dump: the teacher's top-k per position, for offline use.

    gemma-jax distill dump CONFIG --out dumps/run [--steps N] [--set k=v]

CONFIG is the student's run config with `distill.teacher` (and
`distill.topk`, `distill.temperature`); the dump covers the training
batches of steps [0, N) (default train.steps), exactly the rows `gemma-jax
train CONFIG` will see. Train from it with `--set distill.dump=dumps/run`.
Rerun with a larger --steps to extend a dump; an interrupted dump continues
from its last complete file. Every process of a multi-host run writes its
own rows into the same (shared) directory. README section "Distillation".
"""

import argparse
import json

from gemma_jax.commands import add_overrides, positive_int

HELP = "offline distillation: dump the teacher's top-k log-probs"


def add_arguments(parser):
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  dump = sub.add_parser(
    "dump",
    help="write the teacher's top-k of every "
    "training position into ArrayRecord files",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  dump.add_argument("config", help="the student's run config YAML")
  dump.add_argument("--out", help="dump directory (default distill.dump)")
  dump.add_argument(
    "--steps",
    type=positive_int,
    default=None,
    help="dump steps [0, N) (default train.steps)",
  )
  dump.add_argument(
    "--steps-per-file",
    type=positive_int,
    default=100,
    help="training steps per ArrayRecord file",
  )
  add_overrides(dump)


def main(args) -> int:
  from gemma_jax import distributed
  from gemma_jax.errors import ConfigError
  from gemma_jax.train.config import load_config

  cfg = load_config(args.config, args.overrides)
  out = args.out or cfg.distill.dump
  if not out:
    raise ConfigError("--out: where to write the dump (or set distill.dump)")
  steps = cfg.train.steps if args.steps is None else args.steps
  if steps < 1:
    raise ConfigError(f"--steps must be >= 1, got {steps}")
  from gemma_jax import fileio

  fileio.check_remote(out, "--out")  # seconds, not minutes of retries
  distributed.initialize_runtime(cfg.runtime)
  from gemma_jax.drivers import distill_dump

  manifest = distill_dump.write_dump(cfg, out, steps, args.steps_per_file)
  positions = manifest["steps"] * manifest["global_batch"] * manifest["seq_len"]
  stored = distill_dump.dump_files_bytes(out)
  print(
    json.dumps(
      {
        "out": out,
        "steps": manifest["steps"],
        "topk": cfg.distill.topk,
        "positions": positions,
        "bytes": stored,
        "bytes_per_position": round(stored / positions, 1),
        "record_bytes_per_position": manifest["bytes_per_position"],
      }
    )
  )
  return 0
