"""Several tasks with one model; groups averaged as the harness's MMLU."""

import math

import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.evals import evaluate, tasks
from gemma_jax.evals.readers import Doc


def test_group_is_the_size_weighted_mean_with_pooled_stderr():
  a = {"acc": 0.5, "acc_stderr": 0.1, "n": 10}
  b = {"acc": 0.8, "acc_stderr": 0.2, "n": 30}
  g = evaluate.group_metrics([a, b])
  assert g["acc"] == pytest.approx((0.5 * 10 + 0.8 * 30) / 40)
  # pooled_sample_stderr: sum((n-1) s^2 n) / (N - k), over N, square root.
  var = (9 * 0.01 * 10 + 29 * 0.04 * 30) / (40 - 2)
  assert g["acc_stderr"] == pytest.approx(math.sqrt(var / 40))
  assert g["n"] == 40


def test_evaluate_tasks_dispatches_by_kind_and_adds_groups():
  mc = [tasks.Task(f"mmlu_{s}", "multiple_choice",
                   (Doc("q", ("A", "B"), 0),) * n, group="mmlu")
        for s, n in (("x", 2), ("y", 4))]
  gen = tasks.Task("math", "generate_until", (Doc("Q:", target="#### 3"),))

  calls = []

  def ll(requests):          # always prefers " A": acc 1 everywhere
    calls.append(len(requests))
    return [-1.0 if cont == " A" else -2.0 for _, cont in requests]

  def generate(prompts, n):
    return [" #### 3"] * len(prompts)
  results, items = evaluate.evaluate_tasks([*mc, gen], ll, generate)
  assert list(results) == ["mmlu_x", "mmlu_y", "math", "mmlu"]
  assert results["mmlu"]["acc"] == 1.0 and results["mmlu"]["n"] == 6
  assert calls == [12]       # every choice of both subjects in one call
  assert results["math"]["exact_match,strict-match"] == 1.0
  assert len(items) == 7
  with pytest.raises(ConfigError, match="math: generation needs a generate"):
    evaluate.evaluate_tasks([gen], ll)
  with pytest.raises(ConfigError, match="task names must be unique"):
    evaluate.evaluate_tasks([gen, gen], ll, generate)
