"""lm-evaluation-harness tasks during training: the `harness:` section.

    harness:
      tasks: [arc_easy, hellaswag]
      every: 500              # steps (0: at the end only)
      limit: 200

A Feature whose one hook scores the trainer's live params every
harness.every steps (and at the end). The scoring itself sits above the
features in the package's stack (gemma_jax/evals/during_training.py: the
harness, its tasks, the gemma_jax model class), so it plugs itself in here
when imported (`plug`); `gemma-jax train` imports it. A run whose config
names tasks without it refuses to start, saying so.
"""

from typing import Any

from gemma_jax.errors import ConfigError
from gemma_jax.features.base import Feature

# The scoring: an object with start(cfg, program, pipe) -> a session (task
# names checked; fails before anything trains) and run(session, trainer,
# step) (scores and logs). Set by gemma_jax.evals.during_training.
_runner: Any = None


def plug(runner) -> None:
  global _runner
  _runner = runner


class HarnessEval(Feature):
  """harness.tasks: the harness's tasks scored every harness.every steps."""

  name = "harness"

  def prepare(self, program, pipe) -> None:
    if _runner is None:
      raise ConfigError(
        "harness.tasks needs the harness's scoring: import "
        "gemma_jax.evals.during_training before training (gemma-jax train "
        "does) and install the `eval` extra"
      )
    self.session = _runner.start(self.cfg, program, pipe)

  def hooks(self, program) -> list:
    del program
    return [(self.cfg.harness.every, self.evaluate)]

  def evaluate(self, trainer, step: int) -> None:
    _runner.run(self.session, trainer, step)
