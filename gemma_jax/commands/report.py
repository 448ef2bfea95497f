"""`gemma-jax report`: what continued training gained and what it forgot.

    gemma-jax report configs/cpt/tiny-math.yaml --out runs/report \\
        --checkpoint base=runs/base/params --checkpoint naive=runs/naive \\
        --checkpoint ewc=runs/ewc@300 --tasks tasks.yaml

Checkpoints are native exports, Hugging Face directories or training runs
(the latest checkpoint, or RUN@STEP), in order: the first is the base and
the tables show each later one's change from it. Held-out loss and
perplexity per source come from the run config's eval splits; benchmark
scores (tasks.yaml: see gemma_jax/evals/forgetting.py) are computed as
lm-evaluation-harness computes them. Prints one row per checkpoint
(held-out loss per source and each task's first metric, with the change
from the base); writes report.md, report.json, items/<checkpoint>.jsonl
and bar charts to --out.
"""

from gemma_jax.commands import add_overrides, positive_int

HELP = "compare checkpoints: held-out loss per source and benchmark scores"


def add_arguments(parser):
  parser.add_argument("config", help="run config (model, data, mesh)")
  parser.add_argument(
    "--checkpoint",
    action="append",
    required=True,
    metavar="NAME=PATH",
    help="repeatable; the first is the base",
  )
  parser.add_argument(
    "--tasks", default=None, help="YAML list of benchmark tasks (local files)"
  )
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument(
    "--eval-batches",
    type=positive_int,
    default=None,
    help="held-out batches per source (train.eval_batches)",
  )
  parser.add_argument(
    "--batch-size", type=positive_int, default=8, help="rows per scoring batch"
  )
  parser.add_argument(
    "--max-length",
    type=positive_int,
    default=8192,
    help="tokens per scored request, cut from the left; "
    "the default is lm-evaluation-harness's "
    "max_length for a Gemma HF export (its "
    "max_position_embeddings)",
  )
  add_overrides(parser)


def _checkpoints(specs) -> dict[str, str]:
  from gemma_jax.errors import ConfigError

  out = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise ConfigError(f"--checkpoint {spec!r}: expected NAME=PATH")
    if name in out:
      raise ConfigError(f"--checkpoint: the name {name!r} is given twice")
    out[name] = path
  return out


def main(args) -> int:
  from gemma_jax import distributed
  from gemma_jax.train.config import load_config

  cfg = load_config(args.config, args.overrides)
  checkpoints = _checkpoints(args.checkpoint)
  from gemma_jax.evals import forgetting

  tasks = forgetting.load_tasks(args.tasks) if args.tasks else []
  distributed.initialize_runtime(cfg.runtime, command="report")
  import jax

  import gemma_jax.features  # noqa: F401  (registers them with the core)
  from gemma_jax.data import pipeline_for
  from gemma_jax.train.program import TrainProgram

  program = TrainProgram(cfg)
  pipe = pipeline_for(cfg)
  results = forgetting.report(
    program,
    pipe,
    checkpoints,
    tasks,
    args.out,
    eval_batches=args.eval_batches or cfg.train.eval_batches or 1,
    batch_size=args.batch_size,
    max_length=args.max_length,
  )
  if jax.process_index() == 0:
    print(forgetting.summary_table(results), end="")
    print(f"report written to {args.out}/report.md")
  return 0
