"""Harness results side by side: tables, JSON and bar charts.

A harness result is what lm_eval.simple_evaluate returns: `results` maps a
task or group to {"metric,filter": value, "metric_stderr,filter": stderr,
"alias": ...}; `n-shot`, `higher_is_better` and `versions` sit beside it.
Checkpoints come in order, the first the base:

    rows = metric_rows({"base": r0, "cpt": r1})   # one per task/filter/metric
    print(comparison_table(rows, ["base", "cpt"]))
    bar_chart({"base": r0, "cpt": r1}, "benchmarks.png")

A change is marked `*` when |Δ| exceeds the stderr of the difference of two
independent means, sqrt(se_base² + se²); the harness's stderrs are
bootstrap or sample stderrs of each mean (lm_eval/api/metrics.py).
"""

import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from gemma_jax import fileio

# The metric a one-number summary shows for a task: the first it has.
MAIN_METRICS = (
  "acc,none",
  "exact_match,strict-match",
  "acc_norm,none",
  "exact_match,flexible-extract",
  "word_perplexity,none",
)
_NOT_METRICS = ("alias", "name", "sample_len", "sample_count", "samples")


@dataclasses.dataclass
class Row:
  """One task x filter x metric across checkpoints."""

  task: str
  alias: str
  metric: str
  filter: str
  n_shot: str
  higher_is_better: bool | None
  values: dict[str, float | None]
  stderrs: dict[str, float | None]

  @property
  def key(self) -> str:
    return f"{self.metric},{self.filter}"

  def delta(self, name: str, base: str) -> float | None:
    a, b = self.values.get(base), self.values.get(name)
    return None if a is None or b is None else b - a

  def significant(self, name: str, base: str) -> bool | None:
    """|Δ| > sqrt(se_base² + se²); None where a stderr is missing."""
    d = self.delta(name, base)
    s0, s1 = self.stderrs.get(base), self.stderrs.get(name)
    if d is None or s0 is None or s1 is None:
      return None
    return abs(d) > math.sqrt(s0**2 + s1**2)


def _number(x) -> float | None:
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None  # the harness writes "N/A" for a missing stderr
  return float(x) if math.isfinite(x) else None


def _entries(result: Mapping[str, Any]):
  """(task, its metrics) of results and groups, in the harness's order."""
  seen: dict[str, Any] = {}
  for part in ("results", "groups"):
    for task, metrics in result.get(part, {}).items():
      seen.setdefault(task, metrics)
  return seen.items()


def metric_rows(results: Mapping[str, Mapping[str, Any]]) -> list[Row]:
  """Every task x filter x metric any checkpoint has, first-seen order."""
  rows: dict[tuple[str, str], Row] = {}
  for name, result in results.items():
    for task, metrics in _entries(result):
      n_shot = str(result.get("n-shot", {}).get(task, ""))
      hib = result.get("higher_is_better", {}).get(task, {})
      for key, value in metrics.items():
        metric, _, filt = key.partition(",")
        if key in _NOT_METRICS or metric.endswith("_stderr"):
          continue
        row = rows.setdefault(
          (task, key),
          Row(
            task,
            str(metrics.get("alias", task)).strip(" -"),
            metric,
            filt,
            n_shot,
            hib.get(metric),
            {},
            {},
          ),
        )
        row.values[name] = _number(value)
        row.stderrs[name] = _number(metrics.get(f"{metric}_stderr,{filt}"))
  return list(rows.values())


def _cell(row: Row, name: str) -> str:
  value, err = row.values.get(name), row.stderrs.get(name)
  if value is None:
    return "-"
  return f"{value:.4f}" + ("" if err is None else f" ± {err:.4f}")


def comparison_table(rows: Sequence[Row], names: Sequence[str]) -> str:
  """Markdown like the harness's table (task, filter, n-shot, metric,
  value ± stderr) with a column per checkpoint and, after each later one,
  its change from the first (`*`: beyond the stderr of the difference)."""
  base = names[0]
  header = ["Tasks", "Filter", "n-shot", "Metric", "", base]
  for name in names[1:]:
    header += [name, f"Δ {name}"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  arrows = {True: "↑", False: "↓", None: ""}
  for row in rows:
    cells = [row.alias, row.filter, row.n_shot, row.metric]
    cells += [arrows[row.higher_is_better], _cell(row, base)]
    for name in names[1:]:
      d, sig = row.delta(name, base), row.significant(name, base)
      cells.append(_cell(row, name))
      cells.append("-" if d is None else f"{d:+.4f}" + (" *" if sig else ""))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main_metric(rows: Sequence[Row], task: str) -> Row | None:
  """The row a one-number summary shows for `task` (MAIN_METRICS order)."""
  mine = {r.key: r for r in rows if r.task == task}
  for key in MAIN_METRICS:
    if key in mine:
      return mine[key]
  return next(iter(mine.values()), None)


def _clean(x):
  """NaN/inf -> None, so the JSON is standard."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


def write_json(path, data) -> None:
  fileio.atomic_write(
    path, json.dumps(_clean(data), indent=1, default=str) + "\n"
  )


def bar_chart(
  series: Mapping[str, Mapping[str, tuple[float | None, float | None]]],
  path,
  title: str = "Benchmarks",
  ylabel: str = "score",
) -> None:
  """Grouped bars: {checkpoint: {label: (value, stderr)}}, one group per
  label, one bar per checkpoint, stderr whiskers. PNG (matplotlib, Agg)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  names = list(series)
  labels = list(dict.fromkeys(k for s in series.values() for k in s))
  width = 0.8 / max(1, len(names))
  fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) + 2), 4.5))
  x = np.arange(len(labels))
  for k, name in enumerate(names):
    pairs = [series[name].get(label, (None, None)) for label in labels]
    values = [np.nan if v is None else v for v, _ in pairs]
    errors = [0.0 if e is None else e for _, e in pairs]
    ax.bar(
      x + (k - (len(names) - 1) / 2) * width,
      values,
      width,
      yerr=errors,
      capsize=2,
      label=name,
    )
  ax.set_xticks(x, labels, fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  fileio.atomic_write(path, png.getvalue())
