"""`gemma-jax plot DIR` writes loss, learning-rate and throughput PNGs."""

import json

import pytest

from gemma_jax import cli
from gemma_jax.commands.plot import plot_run


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_plot_writes_three_pngs(tmp_path):
  _write(
    tmp_path / "metrics.jsonl",
    [
      {
        "step": s,
        "loss": 5.0 / s,
        "loss/web": 5.0 / s,
        "loss/code": 4.0 / s,
        "learning_rate": 1e-3,
        "tokens_per_sec": 1000.0,
        "mfu": 0.3,
      }
      for s in range(1, 6)
    ],
  )
  _write(tmp_path / "eval.jsonl", [{"step": 5, "eval/web/loss": 1.2}])
  paths = plot_run(str(tmp_path))
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
    "learning_rate.png",
    "loss.png",
    "throughput.png",
  ]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_command_on_an_empty_dir_fails_clearly(tmp_path, capsys):
  assert cli.main(["plot", str(tmp_path)]) == 2
  assert "no metrics.jsonl" in capsys.readouterr().err
