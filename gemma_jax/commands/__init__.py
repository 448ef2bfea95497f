"""One module per `gemma-jax` subcommand (cli.COMMANDS)."""


def add_overrides(parser) -> None:
  """`--set KEY=VALUE` (repeatable) into args.overrides: config overrides
  applied after the YAML file (train.config.load_config)."""
  parser.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a config key, e.g. --set train.batch_size=512",
  )


# Argument types: a number on the command line is checked when it is parsed
# (finite, in range), so that `--weights nan` or `--batch-size 0` fails at
# once in one line naming the flag (argparse adds "argument --flag: ").
def _number(text: str, kind) -> float | int:
  import argparse
  import math

  try:
    value = kind(text)
  except ValueError:
    what = "an integer" if kind is int else "a number"
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
  if kind is float and not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
  return value


def number_type(kind=float, *, minimum=None, maximum=None, above=None):
  """An argparse `type`: `kind` (int or float), finite, >= `minimum`,
  <= `maximum`, > `above` (each optional)."""
  import argparse

  def parse(text: str):
    value = _number(text, kind)
    if minimum is not None and value < minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
    if maximum is not None and value > maximum:
      raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
    if above is not None and not value > above:
      raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
    return value

  parse.__name__ = kind.__name__  # argparse names the type in its messages
  return parse


finite_float = number_type(float)
unit_float = number_type(float, minimum=0.0, maximum=1.0)
positive_float = number_type(float, above=0.0)
nonnegative_float = number_type(float, minimum=0.0)
positive_int = number_type(int, minimum=1)
nonnegative_int = number_type(int, minimum=0)


def add_harness_tasks(parser, tasks_help: str, tasks_group=None) -> None:
  """lm-evaluation-harness's task options as `lm_eval run` names them,
  spelt with dashes: --tasks (into `tasks_group` when given, e.g. a
  mutually exclusive one), --include-path, --limit, --num-fewshot, --seed
  (`gemma-jax report`, `gemma-jax fisher`; harness_options reads them)."""
  (tasks_group or parser).add_argument("--tasks", default=None, help=tasks_help)
  parser.add_argument(
    "--include-path",
    action="append",
    default=[],
    metavar="DIR",
    help="repeatable; a folder of further task YAMLs (local data copies)",
  )
  parser.add_argument(
    "--limit",
    type=positive_float,
    default=None,
    help="documents per task (below 1: a fraction of them)",
  )
  parser.add_argument(
    "--num-fewshot",
    type=nonnegative_int,
    default=None,
    help="few-shot examples for every task (default: each task's own)",
  )
  parser.add_argument(
    "--seed",
    default="0,1234,1234,1234",
    help="the harness's seeds: one integer for all, or random,numpy,"
    "torch,fewshot (default 0,1234,1234,1234)",
  )


def harness_options(args, **more):
  """benchmarks.Options of add_harness_tasks's flags and `more` (None
  without --tasks; then the other flags are refused)."""
  from gemma_jax.errors import ConfigError
  from gemma_jax.evals import benchmarks

  if not args.tasks:
    given = {"limit": args.limit, "num_fewshot": args.num_fewshot, **more}
    for flag, value in given.items():
      if value is not None:
        raise ConfigError(f"--{flag.replace('_', '-')} needs --tasks")
    return None
  return benchmarks.Options(
    tasks=benchmarks.parse_tasks(args.tasks),
    include_path=tuple(args.include_path),
    limit=args.limit,
    num_fewshot=args.num_fewshot,
    seed=benchmarks.parse_seed(args.seed),
    **more,
  )
