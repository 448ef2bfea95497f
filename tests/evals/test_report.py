"""Markdown table, JSON, per-item JSONL and bar chart of benchmark results."""

import json
import math

import pytest

from gemma_jax.evals import report

RESULTS = {
  "base": {
    "arc_easy": {
      "acc": 0.5,
      "acc_stderr": 0.05,
      "acc_norm": 0.55,
      "acc_norm_stderr": 0.05,
      "n": 100,
    },
    "gsm8k": {
      "exact_match,strict-match": 0.1,
      "exact_match,strict-match_stderr": 0.03,
      "n": 50,
    },
  },
  "step 200": {
    "arc_easy": {
      "acc": 0.45,
      "acc_stderr": 0.05,
      "acc_norm": 0.6,
      "acc_norm_stderr": 0.05,
      "n": 100,
    },
    "gsm8k": {
      "exact_match,strict-match": 0.25,
      "exact_match,strict-match_stderr": float("nan"),
      "n": 50,
    },
  },
}


def test_markdown_table_has_a_column_per_checkpoint_and_the_change():
  lines = report.markdown_table(RESULTS).splitlines()
  assert lines[0] == (
    "| task | metric | n | base | step 200 | Δ (step 200 - base) |"
  )
  assert lines[2] == (
    "| arc_easy | acc | 100 | 0.5000 ± 0.0500 | 0.4500 ± 0.0500 | -0.0500 |"
  )
  assert lines[3].startswith("| arc_easy | acc_norm | 100 |")
  assert lines[4] == (
    "| gsm8k | exact_match,strict-match | 50 | "
    "0.1000 ± 0.0300 | 0.2500 | +0.1500 |"
  )
  assert len(lines) == 5


def test_a_task_missing_for_one_checkpoint_shows_a_dash():
  results = {"a": {"t": {"acc": 0.5, "n": 2}}, "b": {}}
  assert "| t | acc | 2 | 0.5000 | - | - |" in report.markdown_table(results)


def test_json_and_items_files(tmp_path):
  report.write_json(tmp_path / "r.json", RESULTS)
  back = json.loads((tmp_path / "r.json").read_text())
  assert back["step 200"]["gsm8k"]["exact_match,strict-match_stderr"] is None
  assert back["base"]["arc_easy"]["acc"] == 0.5
  items = [
    {"task": "t", "loglikelihoods": [-1.5, -2.0], "context": "é"},
    {"task": "t", "acc_stderr": math.inf},
  ]
  report.write_items(tmp_path / "i.jsonl", items)
  lines = (tmp_path / "i.jsonl").read_text(encoding="utf-8").splitlines()
  assert [json.loads(line) for line in lines] == [
    items[0],
    {"task": "t", "acc_stderr": None},
  ]
  assert "é" in lines[0]


def test_chart_metric_defaults_and_overrides():
  assert report.chart_metric(RESULTS, "arc_easy") == "acc"
  assert report.chart_metric(RESULTS, "gsm8k") == "exact_match,strict-match"
  assert (
    report.chart_metric(RESULTS, "arc_easy", {"arc_easy": "acc_norm"})
    == "acc_norm"
  )


@pytest.mark.slow
def test_bar_chart_writes_a_png(tmp_path):
  report.bar_chart(RESULTS, tmp_path / "bench.png", title="before / after")
  data = (tmp_path / "bench.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
