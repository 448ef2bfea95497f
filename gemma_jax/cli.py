"""`gemma-jax` console script: one subcommand per module in gemma_jax/commands.

Each command module defines `HELP`, `add_arguments(parser)` and `main(args)`.
Only the chosen command's module is imported, so that `gemma-jax convert`
does not pay for importing the trainer; `--help` alone imports them all to
list them.

Run as a program, it first re-executes itself once with glibc's huge-page
tunable set (gemma_jax.hugepages: XLA's CPU steps fault far less).

Every failure ends in one line on stderr, `gemma-jax COMMAND: error: ...`,
and exit status 2 for a config or usage error, 1 for anything else. `--debug`
(or GEMMA_JAX_DEBUG=1) shows the traceback instead.
"""

import argparse
import importlib
import os
import sys

COMMANDS = (
  "train",
  "eval",
  "report",
  "plot",
  "compile",
  "convert",
  "score",
  "sample",
  "tokenizer",
  "data",
  "fisher",
  "merge",
  "distill",
  "launch",
  "quantize",
  "lm-eval",
)


def _module(name):
  return importlib.import_module(f"gemma_jax.commands.{name.replace('-', '_')}")


class _Parser(argparse.ArgumentParser):
  """Usage errors in one line too (argparse prints the usage before it;
  `gemma-jax COMMAND --help` shows it)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def _parser(argv) -> argparse.ArgumentParser:
  parser = _Parser(
    prog="gemma-jax",
    description="Pretraining and continual pretraining of Gemma 1 and "
    "Gemma 2 in JAX/Flax.",
  )
  parser.add_argument(
    "--debug", action="store_true", help="show the Python traceback of an error"
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  chosen = next((a for a in argv if not a.startswith("-")), None)
  for name in COMMANDS:
    if name == chosen:
      module = _module(name)
      module.add_arguments(
        sub.add_parser(
          name,
          help=module.HELP,
          description=module.__doc__,
          formatter_class=argparse.RawDescriptionHelpFormatter,
        )
      )
    elif chosen is None:  # listing every command: `gemma-jax --help`
      sub.add_parser(name, help=_module(name).HELP)
    else:
      sub.add_parser(name, add_help=False)
  return parser


def one_line(error: BaseException) -> str:
  """The error as one line: the first line of its message, with the file
  an OSError is about (and a storage library's "disk full" told as one)."""
  from gemma_jax.errors import GemmaJaxError, os_error_line

  if isinstance(error, OSError) and error.strerror:
    return os_error_line(error)
  if not isinstance(error, GemmaJaxError):
    from gemma_jax.fileio import disk_full

    full = disk_full(error)
    if full is not None:
      return os_error_line(full)
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def main(argv=None) -> int:
  if argv is None:  # the console script, not a call from Python
    from gemma_jax.hugepages import reexec_with_hugepages

    reexec_with_hugepages()
  argv = sys.argv[1:] if argv is None else list(argv)
  # --debug may stand anywhere on the line.
  debug = "--debug" in argv or os.environ.get("GEMMA_JAX_DEBUG") == "1"
  argv = [a for a in argv if a != "--debug"]
  try:
    args = _parser(argv).parse_args(argv)
  except SystemExit as e:  # a usage error (printed), or --help
    if e.code == 0:
      raise
    return int(e.code or 2)
  if not debug:
    # Libraries' own warnings (orbax's absl logging) would bury the one
    # line a failure prints; --debug shows them.
    import logging

    # Orbax logs a failed background save as ERRORs with tracebacks (one
    # per thread); the failure is reported in one line (the checkpointer
    # reads those records: they are kept from the console, not dropped).
    absl = logging.getLogger("absl")
    absl.setLevel(logging.ERROR)
    absl.propagate = False
    absl.addHandler(logging.NullHandler())  # not Python's last resort
    # asyncio's "Task exception was never retrieved" of the same failure.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # asyncio's "Exception ignored in coroutine" after a failed read: the
    # error it ignores is the one reported.
    sys.unraisablehook = lambda unraisable: None
  from gemma_jax.errors import GemmaJaxError

  try:
    return _module(args.command).main(args) or 0
  except KeyboardInterrupt:
    print(f"gemma-jax {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # every failure: one line
    if debug:
      raise
    if isinstance(e, GemmaJaxError):
      message, code = one_line(e), e.exit_code
    elif isinstance(e, OSError):
      message, code = one_line(e), 1
    else:  # a bug, or a library error we do not translate yet
      message = (
        f"{type(e).__name__}: {one_line(e)} (unexpected; rerun with "
        f"--debug for the traceback)"
      )
      code = 1
    print(f"gemma-jax {args.command}: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
  sys.exit(main())
