"""Scores a list of tasks with one model and averages groups (MMLU).

    ll = scoring.make_loglikelihood_fn(params, cfg, tokenizer, batch_size=8)
    gen = generation.make_generate_fn(params, cfg, tokenizer, batch_size=8)
    metrics, items = evaluate_tasks(tasks, ll, gen)
    # metrics: {task or group: {"acc": .., "acc_stderr": .., "n": ..}}

A group's metric is the mean over all its documents (the harness's
`weight_by_size: true`), its stderr the harness's pooled_sample_stderr of
the members' stderrs.
"""

import math
from typing import Sequence

from gemma_jax.errors import ConfigError
from gemma_jax.evals import generation, scoring
from gemma_jax.evals.tasks import FEWSHOT_SEED, Task


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
  """lm_eval.api.metrics.pooled_sample_stderr."""
  var = sum((n - 1) * s ** 2 * n for s, n in zip(stderrs, sizes)) / (
      sum(sizes) - len(sizes))
  return math.sqrt(var / sum(sizes))


def group_metrics(members: Sequence[dict]) -> dict:
  """Size-weighted means (and pooled stderrs) of the members' metrics."""
  sizes = [m["n"] for m in members]
  out = {}
  names = [k for k in members[0] if k != "n" and not k.endswith("_stderr")]
  for name in names:
    out[name] = sum(m[name] * n for m, n in zip(members, sizes)) / sum(sizes)
    out[f"{name}_stderr"] = pooled_stderr(
        [m[f"{name}_stderr"] for m in members], sizes)
  out["n"] = sum(sizes)
  return out


def evaluate_task(task: Task, loglikelihood_fn=None, generate_fn=None,
                  seed: int = FEWSHOT_SEED) -> tuple[dict, list[dict]]:
  """(metrics, items) of one task with the function its kind needs."""
  if task.kind == "multiple_choice":
    if loglikelihood_fn is None:
      raise ConfigError(f"{task.name}: multiple choice needs a "
                        "loglikelihood function")
    return scoring.evaluate_multiple_choice(task, loglikelihood_fn, seed)
  if generate_fn is None:
    raise ConfigError(f"{task.name}: generation needs a generate function")
  return generation.evaluate_generative(task, generate_fn, seed)


def evaluate_tasks(tasks: Sequence[Task], loglikelihood_fn=None,
                   generate_fn=None, seed: int = FEWSHOT_SEED
                   ) -> tuple[dict[str, dict], list[dict]]:
  """({task or group: metrics}, all items) over `tasks`, groups last."""
  results, items, groups = {}, [], {}
  for task in tasks:
    metrics, task_items = evaluate_task(task, loglikelihood_fn, generate_fn,
                                        seed)
    results[task.name] = metrics
    items += task_items
    if task.group:
      groups.setdefault(task.group, []).append(metrics)
  for name, members in groups.items():
    results[name] = group_metrics(members)
  return results, items
