"""Benchmark results as a markdown table, JSON, per-item JSONL and a bar chart.

Results are {checkpoint name: {task: {metric: value, metric_stderr: value,
'n': count}}}, checkpoints in the order they should appear (the first is
the baseline the table's last column compares against):

    results = {"base": base_metrics, "step 200": after_metrics}
    print(markdown_table(results))
    write_json("bench.json", results)
    write_items("items.jsonl", items)
    bar_chart(results, "bench.png")
"""

import io
import json
import math
from typing import Mapping, Sequence

from gemma_jax import fileio

Results = Mapping[str, Mapping[str, Mapping[str, float]]]

# The metric shown for a task when none is named: the first it has.
DEFAULT_METRICS = ("acc", "acc_norm", "exact_match,strict-match",
                   "exact_match,flexible-extract")


def _tasks(results: Results) -> list[str]:
  seen = {}
  for per_task in results.values():
    seen.update(dict.fromkeys(per_task))
  return list(seen)


def _metrics(results: Results, task: str, metrics: Sequence[str]):
  present = set()
  for per_task in results.values():
    present.update(per_task.get(task, {}))
  return [m for m in metrics if m in present]


def _cell(metrics: Mapping[str, float] | None, name: str) -> str:
  if not metrics or name not in metrics:
    return "-"
  value, err = metrics[name], metrics.get(f"{name}_stderr")
  if err is None or not math.isfinite(err):
    return f"{value:.4f}"
  return f"{value:.4f} ± {err:.4f}"


def markdown_table(results: Results,
                   metrics: Sequence[str] = DEFAULT_METRICS) -> str:
  """One row per (task, metric), one column per checkpoint, and with two or
  more checkpoints a last column: last minus first."""
  names = list(results)
  header = ["task", "metric", "n", *names]
  if len(names) > 1:
    header.append(f"Δ ({names[-1]} - {names[0]})")
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for task in _tasks(results):
    for metric in _metrics(results, task, metrics):
      per = [results[n].get(task) for n in names]
      n = next((m["n"] for m in per if m and "n" in m), "")
      row = [task, metric, str(n), *(_cell(m, metric) for m in per)]
      if len(names) > 1:
        first, last = per[0], per[-1]
        row.append(f"{last[metric] - first[metric]:+.4f}"
                   if first and last and metric in first and metric in last
                   else "-")
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def _clean(x):
  """NaN/inf -> None, so the JSON is standard."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def write_json(path, results: Results) -> None:
  fileio.atomic_write(path, json.dumps(_clean(results), indent=1) + "\n")


def write_items(path, items: Sequence[dict]) -> None:
  """One JSON object per scored document (see evaluate_* for the keys)."""
  fileio.atomic_write(path, "".join(
      json.dumps(_clean(it), ensure_ascii=False) + "\n" for it in items))


def chart_metric(results: Results, task: str,
                 metric_for: Mapping[str, str] | None = None) -> str | None:
  """The metric charted for `task`: metric_for[task], else the first of
  DEFAULT_METRICS that it has."""
  if metric_for and task in metric_for:
    return metric_for[task]
  found = _metrics(results, task, DEFAULT_METRICS)
  return found[0] if found else None


def bar_chart(results: Results, path, metric_for: Mapping[str, str] |
              None = None, title: str = "Benchmarks") -> None:
  """Grouped bars: one group per task, one bar per checkpoint, with stderr
  whiskers. Written as PNG (matplotlib, Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  tasks = [t for t in _tasks(results) if chart_metric(results, t, metric_for)]
  names = list(results)
  width = 0.8 / max(1, len(names))
  fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4.5))
  x = np.arange(len(tasks))
  for k, name in enumerate(names):
    values, errors = [], []
    for task in tasks:
      m = results[name].get(task, {})
      metric = chart_metric(results, task, metric_for)
      values.append(m.get(metric, np.nan))
      err = m.get(f"{metric}_stderr")
      errors.append(err if err is not None and math.isfinite(err) else 0.0)
    ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, yerr=errors,
           capsize=2, label=name)
  labels = [f"{t}\n{chart_metric(results, t, metric_for)}" for t in tasks]
  ax.set_xticks(x, labels, fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("score")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  fileio.atomic_write(path, png.getvalue())
