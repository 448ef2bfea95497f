"""Harness results side by side: the comparison table, JSON and bar chart."""

import json

import pytest

from gemma_jax.evals import report


def harness_result(acc, acc_se, norm, em, em_se):
  """A result as lm_eval.simple_evaluate returns it (the keys it has)."""
  return {
    "results": {
      "arc_easy": {
        "alias": "arc_easy",
        "acc,none": acc,
        "acc_stderr,none": acc_se,
        "acc_norm,none": norm,
        "acc_norm_stderr,none": 0.05,
      },
      "gsm8k": {
        "alias": "gsm8k",
        "exact_match,strict-match": em,
        "exact_match_stderr,strict-match": em_se,
      },
    },
    "n-shot": {"arc_easy": 0, "gsm8k": 5},
    "higher_is_better": {
      "arc_easy": {"acc": True, "acc_norm": True},
      "gsm8k": {"exact_match": True},
    },
  }


RESULTS = {
  "base": harness_result(0.5, 0.05, 0.55, 0.1, 0.03),
  "step 200": harness_result(0.45, 0.05, 0.7, 0.25, "N/A"),
}


def test_comparison_table_has_every_metric_stderr_nshot_filter_and_change():
  rows = report.metric_rows(RESULTS)
  lines = report.comparison_table(rows, list(RESULTS)).splitlines()
  assert lines[0] == (
    "| Tasks | Filter | n-shot | Metric |  | base | step 200 | Δ step 200 |"
  )
  # Within the stderr of the difference (0.0707): no mark.
  assert lines[2] == (
    "| arc_easy | none | 0 | acc | ↑ | 0.5000 ± 0.0500 | "
    "0.4500 ± 0.0500 | -0.0500 |"
  )
  # 0.15 > sqrt(0.05² + 0.05²): marked.
  assert lines[3] == (
    "| arc_easy | none | 0 | acc_norm | ↑ | 0.5500 ± 0.0500 | "
    "0.7000 ± 0.0500 | +0.1500 * |"
  )
  # The harness's "N/A" stderr: shown without one, no mark.
  assert lines[4] == (
    "| gsm8k | strict-match | 5 | exact_match | ↑ | 0.1000 ± 0.0300 | "
    "0.2500 | +0.1500 |"
  )
  assert len(lines) == 5


def test_a_task_missing_for_one_checkpoint_shows_a_dash():
  results = {
    "a": {"results": {"t": {"acc,none": 0.5}}},
    "b": {"results": {}},
  }
  table = report.comparison_table(report.metric_rows(results), ["a", "b"])
  assert "| t | none |  | acc |  | 0.5000 | - | - |" in table


def test_main_metric_prefers_acc_then_strict_match():
  rows = report.metric_rows(RESULTS)
  assert report.main_metric(rows, "arc_easy").key == "acc,none"
  assert report.main_metric(rows, "gsm8k").key == "exact_match,strict-match"
  assert report.main_metric(rows, "nope") is None


def test_json_is_standard(tmp_path):
  data = {"a": {"x": float("nan"), "y": [1.5, float("inf")], "z": "é"}}
  report.write_json(tmp_path / "r.json", data)
  text = (tmp_path / "r.json").read_text(encoding="utf-8")
  assert json.loads(text) == {"a": {"x": None, "y": [1.5, None], "z": "é"}}


@pytest.mark.slow
def test_bar_chart_writes_a_png(tmp_path):
  series = {
    "base": {"arc_easy acc": (0.5, 0.05), "gsm8k": (0.1, None)},
    "cpt": {"arc_easy acc": (0.45, 0.05)},
  }
  report.bar_chart(series, tmp_path / "bench.png", title="before / after")
  data = (tmp_path / "bench.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
