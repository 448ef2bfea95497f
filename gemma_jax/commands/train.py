"""`gemma-jax train CONFIG --workdir DIR`: train, evaluate, checkpoint, resume.

Run the same command on every host of a multi-host job. Re-running it with
the same workdir resumes from the latest checkpoint (a damaged one is moved
to WORKDIR/checkpoints.damaged/ and the one before it is used). SIGTERM
finishes the current step, saves and exits 0. At the end the params are
exported to WORKDIR/params and train.sample_prompts are continued.

One trainer per workdir: a second one is refused, naming the first
(WORKDIR/LOCK). `--from-step N` resumes from checkpoint N, e.g. the newest
good one after a divergence; later checkpoints are moved to
WORKDIR/checkpoints.discarded/, never deleted (0 starts over).
"""

from gemma_jax.commands import add_overrides

HELP = "train (or resume) a model from a YAML run config"


def add_arguments(parser):
  parser.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
  parser.add_argument(
    "--workdir",
    required=True,
    help="run directory: checkpoints, metrics, exports",
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=None,
    help="train to this step (overrides train.steps)",
  )
  parser.add_argument(
    "--from-step",
    type=int,
    default=None,
    metavar="N",
    help="resume from checkpoint N (0: start over); "
    "later checkpoints are moved aside, not deleted",
  )
  add_overrides(parser)


def load_run_config(args):
  from gemma_jax.train.config import load_config

  overrides = list(args.overrides)
  if args.steps is not None:
    overrides.append(f"train.steps={args.steps}")
  return load_config(args.config, overrides)


def main(args) -> int:
  from gemma_jax import distributed

  cfg = load_run_config(args)  # bad config: fails before any device work
  # jax.distributed must start before anything touches the devices.
  distributed.initialize_runtime(cfg.runtime, command="train")
  import gemma_jax.evals.during_training  # scores `harness:` tasks
  import gemma_jax.features  # noqa: F401  (registers them with the core)
  from gemma_jax.train.trainer import Trainer

  Trainer(cfg, args.workdir, from_step=args.from_step).run()
  return 0
