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
from gemma_jax.evals import tasks as tasks_lib
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
  results, items = evaluate_tasks([task], loglikelihood_fn, generate_fn,
                                  seed, groups=False)
  return results[task.name], items


def evaluate_tasks(tasks: Sequence[Task], loglikelihood_fn=None,
                   generate_fn=None, seed: int = FEWSHOT_SEED,
                   groups: bool = True) -> tuple[dict[str, dict], list[dict]]:
  """({task or group: metrics}, all items) over `tasks`, groups last.

  The requests of all multiple-choice tasks go to `loglikelihood_fn` in
  one call (full batches of one shape across many small MMLU subjects).
  """
  names = [t.name for t in tasks]
  if len(set(names)) != len(names):
    raise ConfigError(f"task names must be unique, got {names}")
  mc = [t for t in tasks if t.kind == "multiple_choice"]
  if mc and loglikelihood_fn is None:
    raise ConfigError(f"{mc[0].name}: multiple choice needs a "
                      "loglikelihood function")
  gen = [t for t in tasks if t.kind == "generate_until"]
  if gen and generate_fn is None:
    raise ConfigError(f"{gen[0].name}: generation needs a generate "
                      "function")
  contexts = {t.name: tasks_lib.contexts(t, seed) for t in mc}
  requests = [scoring.choice_requests(t, contexts[t.name]) for t in mc]
  lls = list(loglikelihood_fn([r for rs in requests for r in rs])) \
      if mc else []
  scored, start = {}, 0
  for t, rs in zip(mc, requests):
    scored[t.name] = scoring.choice_items(t, contexts[t.name],
                                          lls[start:start + len(rs)])
    start += len(rs)
  for t in gen:
    scored[t.name] = generation.evaluate_generative(t, generate_fn, seed)
  results, items, members = {}, [], {}
  for t in tasks:
    results[t.name], task_items = scored[t.name]
    items += task_items
    if groups and t.group:
      members.setdefault(t.group, []).append(results[t.name])
  for name, group in members.items():
    results[name] = group_metrics(group)
  return results, items
