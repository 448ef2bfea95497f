"""Held-out evaluation per data source: loss (nats/token) and perplexity."""

import math

import jax
import numpy as np


def evaluate(program, params, pipe, num_batches: int) -> dict[str, dict]:
  """Mean held-out loss of each source over `num_batches` batches.

  Args:
    program: the run's TrainProgram (its compiled eval step and batch
      placement).
    params: the model parameters (sharded like `program.param_shardings`).
    pipe: the data pipeline; `pipe.eval_batches(source, n)` yields numpy
      batches of one source.
    num_batches: batches per source.

  Returns:
    {source: {"loss", "perplexity", "tokens"}}; sources without held-out
    tokens are left out. One host sync per source.
  """
  results = {}
  for name in pipe.source_names:
    outs = [program.eval_step(params, program.put(batch))
            for batch in pipe.eval_batches(name, num_batches)]
    if not outs:
      continue
    outs = jax.device_get(outs)
    loss_sum = float(np.sum([o["loss_sum"] for o in outs]))
    tokens = float(np.sum([o["tokens"] for o in outs]))
    if tokens == 0:
      continue
    loss = loss_sum / tokens
    results[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                     "tokens": int(tokens)}
  return results


def eval_record(step: int, results: dict[str, dict]) -> dict:
  """Flat record for eval.jsonl: eval/<source>/{loss,perplexity,tokens}."""
  record = {"step": step}
  for name, r in results.items():
    for key, value in r.items():
      record[f"eval/{name}/{key}"] = value
  return record
