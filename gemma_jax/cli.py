"""`gemma-jax` console script: one subcommand per module in gemma_jax/commands.

Each command module defines `HELP`, `add_arguments(parser)` and `main(args)`.
Only the chosen command's module is imported, so that `gemma-jax convert`
does not pay for importing the trainer; `--help` alone imports them all to
list them.
"""

import argparse
import importlib
import sys

COMMANDS = ("train", "eval", "plot", "compile", "convert", "score", "sample",
            "tokenizer", "data")


def _module(name):
  return importlib.import_module(f"gemma_jax.commands.{name}")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(
      prog="gemma-jax",
      description="Pretraining and continual pretraining of Gemma 1 and "
                  "Gemma 2 in JAX/Flax.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  chosen = next((a for a in argv if not a.startswith("-")), None)
  for name in COMMANDS:
    if name == chosen:
      module = _module(name)
      module.add_arguments(sub.add_parser(
          name, help=module.HELP, description=module.__doc__,
          formatter_class=argparse.RawDescriptionHelpFormatter))
    elif chosen is None:   # listing every command: `gemma-jax --help`
      sub.add_parser(name, help=_module(name).HELP)
    else:
      sub.add_parser(name, add_help=False)
  args = parser.parse_args(argv)
  from gemma_jax.configlib import ConfigError
  try:
    return _module(args.command).main(args) or 0
  except ConfigError as e:
    print(f"gemma-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
