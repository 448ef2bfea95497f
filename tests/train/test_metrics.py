"""Metrics: records, JSONL + TensorBoard files, progress line, MFU."""

import errno
import io
import json
import os

import numpy as np
import pytest

from gemma_jax.train import metrics


def _step(loss, skipped=0):
  return {
    "loss": loss,
    "grad_norm": 1.0,
    "learning_rate": 1e-3,
    "tokens": 10,
    "skipped": skipped,
    "source_loss_sum": np.array([2.0 * 6, 4.0 * 4]),
    "source_tokens": np.array([6, 4]),
  }


def test_train_record_means_and_per_source_values():
  r = metrics.train_record(
    20,
    [_step(3.0), _step(5.0, skipped=1)],
    seconds=2.0,
    source_names=("web", "code"),
    tokens_per_step=100,
    flops_per_token=6e3,
    num_devices=2,
    peak=1e6,
  )
  assert r["step"] == 20
  assert r["loss"] == 4.0
  assert r["tokens"] == 20
  assert r["tokens_per_sec"] == 100.0
  assert r["step_time_s"] == 1.0
  assert r["skipped"] == 1
  assert r["loss/web"] == pytest.approx(2.0)
  assert r["loss/code"] == pytest.approx(4.0)
  assert r["share/web"] == pytest.approx(0.6)
  assert r["mfu"] == pytest.approx(6e3 * 100 / 2e6)


def test_mfu_is_none_without_a_known_peak():
  assert metrics.mfu(1e9, 1e3, 8, None) is None


def test_writer_appends_jsonl_and_tensorboard_events(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))
  w.write({"step": 1, "loss": 2.5, "mfu": None})
  w.write({"step": 2, "loss": float("nan")})
  w.write({"step": 2, "eval/web/loss": 3.0}, name="eval")
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [
    {"step": 1, "loss": 2.5, "mfu": None},
    {"step": 2, "loss": None},
  ]
  assert metrics.read_jsonl(str(tmp_path / "eval.jsonl"))[0]["step"] == 2
  assert any(
    f.startswith("events.out.tfevents")
    for f in os.listdir(tmp_path / "tensorboard")
  )


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), enabled=False)
  w.write({"step": 1, "loss": 1.0})
  w.close()
  assert os.listdir(tmp_path) == []


def test_a_failed_write_names_the_file_it_could_not_write(tmp_path):
  # /dev/full fails every write with ENOSPC, as a full disk does; the
  # error of a flush names no file, the one raised names metrics.jsonl.
  os.symlink("/dev/full", tmp_path / "metrics.jsonl")
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  with pytest.raises(OSError) as raised:
    w.write({"step": 1, "loss": 2.5})
  assert raised.value.errno == errno.ENOSPC
  assert raised.value.filename == str(tmp_path / "metrics.jsonl")
  # The line is still buffered: closing fails the same way, named too.
  with pytest.raises(OSError) as raised:
    w.close()
  assert raised.value.filename == str(tmp_path / "metrics.jsonl")


def test_a_failed_tensorboard_flush_names_its_directory(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))

  class FullDisk:
    def close(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  w._tb.close()
  w._tb = FullDisk()
  with pytest.raises(OSError) as raised:
    w.close()
  assert raised.value.filename == str(tmp_path / "tensorboard")


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1}\n{"step": 2, "lo')
  assert metrics.read_jsonl(str(p)) == [{"step": 1}]


def test_progress_line_shows_step_loss_throughput_and_eta():
  out = io.StringIO()
  metrics.ProgressLine(100, stream=out).update(
    40, loss=2.3456, tokens_per_sec=12345, steps_per_sec=2.0
  )
  assert out.getvalue().strip() == (
    "step 40/100 | loss 2.3456 | 12.3k tok/s | ETA 0:30"
  )


def test_on_gs_records_are_stored_by_flush_and_truncated_exactly(gcs_bucket):
  """An object store has no append: records are stored by flush() (before
  every checkpoint, and at most every flush_every_s), whole-object."""
  from etils import epath

  workdir = f"{gcs_bucket}/run"
  w = metrics.MetricsWriter(workdir, flush_every_s=3600)
  for step in (1, 2, 3):
    w.write({"step": step, "loss": float(step)})
  assert not epath.Path(f"{workdir}/metrics.jsonl").exists()
  w.flush()
  assert [
    r["step"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")
  ] == [1, 2, 3]
  w.write({"step": 4, "loss": 4.0})
  w.write({"step": 3, "eval/web/loss": 3.0}, name="eval")
  w.close()  # close flushes
  events = list(epath.Path(f"{workdir}/tensorboard").iterdir())
  assert [p.name[:19] for p in events] == ["events.out.tfevents"]
  assert events[0].stat().length > 100  # the scalars, not a header

  # A resumed run (checkpoint 2) drops later records and appends after them.
  w = metrics.MetricsWriter(workdir, tensorboard=False)
  w.truncate_after(2)
  w.write({"step": 3, "loss": 30.0})
  w.close()
  assert metrics.read_jsonl(f"{workdir}/metrics.jsonl") == [
    {"step": 1, "loss": 1.0},
    {"step": 2, "loss": 2.0},
    {"step": 3, "loss": 30.0},
  ]
  assert metrics.read_jsonl(f"{workdir}/eval.jsonl") == []


def test_on_gs_a_write_flushes_once_flush_every_s_has_passed(
  gcs_bucket, monkeypatch
):
  import time

  workdir = f"{gcs_bucket}/run"
  monkeypatch.setenv("GEMMA_JAX_REMOTE_FLUSH_S", "0.2")
  w = metrics.MetricsWriter(workdir, tensorboard=False)
  w.write({"step": 1, "loss": 1.0})
  assert metrics.read_jsonl(f"{workdir}/metrics.jsonl") == []
  time.sleep(0.3)
  w.write({"step": 2, "loss": 2.0})
  assert len(metrics.read_jsonl(f"{workdir}/metrics.jsonl")) == 2
  w.close()
  monkeypatch.setenv("GEMMA_JAX_REMOTE_FLUSH_S", "often")
  with pytest.raises(ValueError, match="GEMMA_JAX_REMOTE_FLUSH_S='often'"):
    metrics.MetricsWriter(workdir, tensorboard=False)
