"""`gemma-jax plot DIR`: PNG curves of a run's metrics."""

HELP = "write PNG curves (loss per source, learning rate, throughput) of a run"


def add_arguments(parser):
  parser.add_argument("workdir", help="a run's --workdir (holds metrics.jsonl)")
  parser.add_argument(
    "--out", default=None, help="output folder (default: WORKDIR/plots)"
  )


def main(args) -> int:
  from gemma_jax.errors import ConfigError
  from gemma_jax.train.plot import plot_run

  try:
    paths = plot_run(args.workdir, args.out)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  for p in paths:
    print(p)
  return 0
