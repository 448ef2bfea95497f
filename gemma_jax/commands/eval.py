"""`gemma-jax eval`: held-out loss and perplexity per source of saved params.

gemma-jax eval --workdir runs/tiny                 # latest checkpoint
gemma-jax eval --workdir runs/tiny --step 200
gemma-jax eval configs/tiny.yaml --params runs/tiny/params
"""

from gemma_jax.commands import add_overrides, nonnegative_int, positive_int

HELP = "evaluate a checkpoint or exported params per data source"


def add_arguments(parser):
  parser.add_argument(
    "config",
    nargs="?",
    default=None,
    help="YAML run config (default: WORKDIR/config.yaml)",
  )
  parser.add_argument(
    "--workdir", default=None, help="a training run's directory"
  )
  parser.add_argument(
    "--step",
    type=nonnegative_int,
    default=None,
    help="checkpoint step (default: the latest)",
  )
  parser.add_argument(
    "--params",
    default=None,
    help="a params-only export (gemma-jax native format) "
    "instead of a training checkpoint",
  )
  parser.add_argument(
    "--batches",
    type=positive_int,
    default=None,
    help="held-out batches per source (train.eval_batches)",
  )
  parser.add_argument("--out", default=None, help="write the results as JSON")
  add_overrides(parser)


def _config(args):
  import os

  from etils import epath

  from gemma_jax import fileio
  from gemma_jax.errors import ConfigError
  from gemma_jax.train.config import load_config

  path = args.config
  if args.workdir:
    fileio.check_remote(args.workdir, "--workdir")
  if args.workdir and not epath.Path(args.workdir).is_dir():
    # A read-only command: a mistyped --workdir is never created.
    raise ConfigError(
      f"--workdir {args.workdir} is not a directory (a "
      f"training run's --workdir)"
    )
  if path is None:
    if not args.workdir:
      raise ConfigError("give a CONFIG or a --workdir holding config.yaml")
    path = os.path.join(args.workdir, "config.yaml")
    if not fileio.is_local(path):
      return _load_remote_config(path, args.overrides)
  return load_config(path, args.overrides)


def _load_remote_config(path, overrides):
  """load_config of a gs:// config.yaml (read through a local copy)."""
  import os
  import tempfile

  from etils import epath

  from gemma_jax.train.config import load_config

  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "config.yaml")
    epath.Path(path).copy(local)
    return load_config(local, overrides)


def _params(args, program):
  import os
  import sys

  from gemma_jax.errors import CheckpointError, ConfigError

  if args.params:
    from gemma_jax import fileio
    from gemma_jax.checkpoint import native

    path = fileio.absolute(args.params)
    if native.load_config(path) != program.cfg.model:
      raise ConfigError(
        f"--params {args.params} holds a different model "
        f"than the config's model section"
      )
    params, _ = native.load(path, shardings=program.param_shardings)
    return params, "export"
  if not args.workdir:
    raise ConfigError("give --workdir (training checkpoints) or --params")
  from gemma_jax.train.checkpointing import Checkpointer, restore_newest_intact

  ckpt = Checkpointer(
    os.path.join(args.workdir, "checkpoints"),
    program.cfg.checkpoint,
    read_only=True,
  )
  try:
    if args.step is not None:
      restored = ckpt.restore(program.abstract_state, args.step)
    else:  # the newest intact checkpoint; a damaged one is only named
      warn = lambda m: print(f"gemma-jax eval: warning: {m}", file=sys.stderr)
      step, restored = restore_newest_intact(
        ckpt, program.abstract_state, warn=warn
      )
      if step is None:
        raise CheckpointError(f"no checkpoint found in {ckpt.directory}")
  finally:
    ckpt.close()
  return restored.state.params, int(restored.meta["step"])


def main(args) -> int:
  import json

  import gemma_jax.features  # noqa: F401  (registers them with the core)
  from gemma_jax import distributed
  from gemma_jax.data import pipeline_for
  from gemma_jax.train import metrics
  from gemma_jax.train.program import TrainProgram

  cfg = _config(args)
  distributed.initialize_runtime(cfg.runtime, command="eval")
  import jax

  program = TrainProgram(cfg)
  pipe = pipeline_for(cfg)
  params, step = _params(args, program)
  results = metrics.evaluate(
    program, params, pipe, args.batches or cfg.train.eval_batches or 1
  )
  if jax.process_index() == 0:
    print(f"step {step}")
    for name, r in results.items():
      print(
        f"  {name:<12} loss {r['loss']:.4f}  perplexity "
        f"{r['perplexity']:.2f}  ({r['tokens']} tokens)"
      )
    if args.out:
      from gemma_jax import fileio

      fileio.atomic_write(
        args.out, json.dumps({"step": step, "sources": results}, indent=2)
      )
  return 0
