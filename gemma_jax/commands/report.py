"""`gemma-jax report`: what continued training gained and what it forgot.

    gemma-jax report configs/cpt/tiny-cpt.yaml --out runs/report \\
        --checkpoint base=runs/base/params --checkpoint naive=runs/naive \\
        --checkpoint ewc=runs/ewc@300 \\
        --tasks study --limit 200 --num-fewshot 5 --batch-size 16 \\
        --seed 1234 --log-samples --include-path my_tasks/

Checkpoints are native exports, Hugging Face directories or training runs
(the latest checkpoint, or RUN@STEP), in order: the first is the base and
the tables show each later one's change from it. Held-out loss and
perplexity per source come from the run config's eval splits; benchmarks
are lm-evaluation-harness's own tasks (names, groups, task YAML files;
`study` = the seven benchmarks of the continual-pretraining study, see
gemma_jax/evals/benchmarks.py), scored by the harness with the gemma_jax
model on the config's mesh. The harness's options keep their names
(--limit, --num-fewshot, --gen-kwargs, --batch-size, --seed,
--log-samples, --include-path: lm_eval's options, spelt with dashes). Prints
one row per checkpoint (held-out loss per source and each task's main
metric, with the change from the base); writes report.md, report.json, the
harness's results JSON and per-sample files (harness/<checkpoint>/) and bar
charts to --out.
"""

from gemma_jax import commands
from gemma_jax.commands import add_harness_tasks, add_overrides, positive_int

HELP = "compare checkpoints: held-out loss per source and harness benchmarks"


def add_arguments(parser):
  parser.add_argument("config", help="run config (model, data, mesh)")
  parser.add_argument(
    "--checkpoint",
    action="append",
    required=True,
    metavar="NAME=PATH",
    help="repeatable; the first is the base",
  )
  add_harness_tasks(
    parser,
    "lm-evaluation-harness tasks, groups or task YAML files, comma "
    "separated (`study`: the seven benchmarks); none: held-out loss only",
  )
  parser.add_argument(
    "--gen-kwargs",
    default=None,
    metavar="K=V,...",
    help="generation options for generative tasks, e.g. max_gen_toks=64",
  )
  parser.add_argument(
    "--log-samples",
    action="store_true",
    help="write every document's requests and responses "
    "(harness/<checkpoint>/samples_<task>_*.jsonl)",
  )
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument(
    "--eval-batches",
    type=positive_int,
    default=None,
    help="held-out batches per source (train.eval_batches)",
  )
  parser.add_argument(
    "--batch-size",
    type=positive_int,
    default=8,
    help="requests per scoring batch",
  )
  parser.add_argument(
    "--max-length",
    type=positive_int,
    default=8192,
    help="tokens per scored request, cut from the left; the default is "
    "lm-evaluation-harness's max_length for a Gemma HF export (its "
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


def harness_options(args):
  """benchmarks.Options from the harness's flags (None without --tasks)."""
  import dataclasses

  opts = commands.harness_options(args, gen_kwargs=args.gen_kwargs)
  if opts is None:
    return None
  return dataclasses.replace(opts, log_samples=args.log_samples)


def main(args) -> int:
  from gemma_jax import distributed
  from gemma_jax.train.config import load_config

  cfg = load_config(args.config, args.overrides)
  checkpoints = _checkpoints(args.checkpoint)
  opts = harness_options(args)
  manager = None
  if opts is not None:
    from gemma_jax.evals import benchmarks

    manager = benchmarks.task_manager(opts)
    benchmarks.check_tasks(opts.task_names(), manager)  # before any loading
  distributed.initialize_runtime(cfg.runtime, command="report")
  import jax

  import gemma_jax.features  # noqa: F401  (registers them with the core)
  from gemma_jax.data import pipeline_for
  from gemma_jax.evals import forgetting
  from gemma_jax.train.program import TrainProgram

  program = TrainProgram(cfg)
  pipe = pipeline_for(cfg)
  results = forgetting.report(
    program,
    pipe,
    checkpoints,
    opts,
    args.out,
    manager,
    eval_batches=args.eval_batches or cfg.train.eval_batches or 1,
    batch_size=args.batch_size,
    max_length=args.max_length,
  )
  if jax.process_index() == 0:
    print(forgetting.summary_table(results), end="")
    print(f"report written to {args.out}/report.md")
  return 0
