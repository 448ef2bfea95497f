"""`gemma-jax lm-eval ...`: lm-evaluation-harness's own command line, with
our model registered as `gemma_jax`.

    gemma-jax lm-eval --model gemma_jax \\
        --model_args checkpoint=DIR,dtype=bfloat16,mesh=-1x1x2 \\
        --tasks arc_easy,hellaswag --batch_size 8 --limit 100 \\
        --num_fewshot 5 --gen_kwargs temperature=0 --seed 1234 \\
        --output_path out/ --log_samples --include_path my_tasks/

Every argument after `lm-eval` goes to the harness unchanged (`lm-eval run`
and its options: --model, --model_args, --tasks, --include_path, --limit,
--num_fewshot, --batch_size, --gen_kwargs, --output_path, --log_samples,
--seed, --device, ...; `gemma-jax lm-eval run --help` lists them all). The
harness's own `lm-eval` command finds only the models its package names
(lm_eval/models/__init__.py), not one that another package registers, so this
command imports gemma_jax.evals.harness (which registers `gemma_jax`) and
then runs the harness's entry point. Needs the `eval` extra
(pip install 'gemma-jax[eval]'); `--model hf` also needs torch and
transformers.

On several processes (a TPU pod: the same command on every host), every
process scores every request over the global mesh (`gemma_jax` tells the
harness it is one process, so no process is given a share of the
documents); only process 0 prints the table and writes --output_path.
"""

import argparse
import contextlib
import os
import sys

HELP = "run lm-evaluation-harness with --model gemma_jax (every option passed)"


def add_arguments(parser):
  parser.add_argument(
    "harness_args",
    nargs=argparse.REMAINDER,
    metavar="...",
    help="lm-eval's arguments, passed as they are",
  )
  # No option is ours: every `-x`/`--xyz` after `lm-eval` is the harness's
  # (including --help), so none may be taken for an option of this parser.
  parser.prefix_chars = "\0"


def main(args) -> int:
  from gemma_jax.errors import ConfigError
  from gemma_jax.evals.benchmarks import HARNESS_MISSING

  try:
    from lm_eval.__main__ import cli_evaluate
  except ImportError:
    raise ConfigError(HARNESS_MISSING) from None
  import gemma_jax.evals.harness  # noqa: F401  (registers `gemma_jax`)
  from gemma_jax import distributed

  distributed.initialize_runtime(command="lm-eval")
  import jax

  sys.argv = ["lm-eval", *args.harness_args]
  if jax.process_index() == 0:
    cli_evaluate()
  else:
    with quiet_follower():
      cli_evaluate()
  return 0


@contextlib.contextmanager
def quiet_follower():
  """The harness on a process other than 0: it computes as process 0 does
  but prints nothing and writes no results or sample files."""
  from lm_eval.loggers import EvaluationTracker

  saved = {
    name: getattr(EvaluationTracker, name)
    for name in (
      "save_results_aggregated",
      "save_results_samples",
      "recreate_metadata_card",
    )
  }
  try:
    for name in saved:
      setattr(EvaluationTracker, name, lambda *a, **k: None)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
      yield
  finally:
    for name, fn in saved.items():
      setattr(EvaluationTracker, name, fn)
