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
