"""Optional parts of training, each a Feature (gemma_jax.features.base)
registered with the core here, in the order the core calls them:

  lora     model.lora: adapters trained over a frozen (or QLoRA) base
  distill  distill: online (a teacher in the step) or offline (a dump)
  ewc      continual.ewc_lambda > 0: the EWC penalty, its Fisher and anchor
  ema      train.ema_decay > 0: an EMA of the weights, evaluated and exported
  harness  harness.tasks: lm-evaluation-harness tasks every N steps (its
           scoring plugs in from gemma_jax/evals/during_training.py)

Importing this package registers them; whatever builds a TrainProgram
imports it first (TrainProgram refuses a config whose feature is missing).
"""

from gemma_jax.features import distill, ema, ewc, harness_eval, lora
from gemma_jax.features.base import Extra, Feature, Variant
from gemma_jax.train import program as _program

_program.register(
  lora.LoRA, distill.Distill, ewc.EWC, ema.EMA, harness_eval.HarnessEval
)

__all__ = ["Extra", "Feature", "Variant"]
