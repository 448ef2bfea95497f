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
