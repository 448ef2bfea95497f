"""launch/tpu_worker.sh, the per-host wrapper, with a stand-in gemma-jax:
its log, its exit-code file (`terminated` after SIGTERM), the copy of the log
in the workdir, and the environment training sees."""

import os
import pathlib
import signal
import subprocess
import time

ROOT = pathlib.Path(__file__).parents[2]
# The wrapper with the stand-in runs in well under a second; this only
# bounds a hang, however loaded the machine. Nothing here depends on how
# long a step takes: the stand-in sleeps until SIGTERM where a test needs
# it running, and readiness is read from the log.
HANG_S = 300

FAKE = """#!/bin/bash
echo "args: $*"
echo "env: $JAX_PLATFORMS $GEMMA_JAX_DISTRIBUTED" \
  "slice=$GEMMA_JAX_SLICE worker=$GEMMA_JAX_WORKER"
if [[ $FAKE_SLEEP ]]; then
  trap 'kill $!; echo saved; exit 0' TERM
  sleep "$FAKE_SLEEP" & wait
fi
exit "${FAKE_EXIT:-0}"
"""


def _worker(tmp_path, **env):
  fake = tmp_path / "gemma-jax"
  fake.write_text(FAKE)
  fake.chmod(0o755)
  run_dir = tmp_path / "run"
  workdir = tmp_path / "workdir"
  env = dict(
    os.environ,
    GEMMA_JAX_BIN=str(fake),
    GEMMA_JAX_RUN_DIR=str(run_dir),
    TPU_WORKER_ID="3",
    JAX_PLATFORMS="tpu",
    GEMMA_JAX_DISTRIBUTED="1",
    **env,
  )
  proc = subprocess.Popen(
    [
      "bash",
      str(ROOT / "launch/tpu_worker.sh"),
      "1",
      "c.yaml",
      "--workdir",
      str(workdir),
      "--set",
      "train.steps=5",
    ],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,  # its own process group, to clean up after
  )
  return proc, run_dir, workdir


def _finish(proc) -> str:
  """The wrapper's output once it exited; kills its process group (the
  stand-in's sleep included) if it hangs past HANG_S or the test failed."""
  try:
    out, _ = proc.communicate(timeout=HANG_S)
    return out
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def test_a_finished_run_leaves_its_exit_code_and_log(tmp_path):
  proc, run_dir, workdir = _worker(tmp_path, FAKE_EXIT="3")
  out = _finish(proc)
  assert proc.returncode == 3
  assert (run_dir / "exit_code").read_text() == "3\n"
  assert not (run_dir / "worker.pid").exists()
  log = (run_dir / "train.log").read_text()
  assert f"args: train c.yaml --workdir {workdir} --set train.steps=5" in log
  assert "env: tpu 1 slice=1 worker=3" in log
  assert log.rstrip().endswith("exit 3")
  assert "args: train c.yaml" in out  # also on stdout (GKE logs)
  # The copy in the workdir is the whole log.
  assert (workdir / "logs/slice-1-worker-3.log").read_text() == log


def test_sigterm_stops_training_and_marks_the_run_terminated(tmp_path):
  # The stand-in trains "forever": only the SIGTERM can end it.
  proc, run_dir, _ = _worker(tmp_path, FAKE_SLEEP="3600")
  pid_file = run_dir / "worker.pid"
  try:
    deadline = time.monotonic() + HANG_S
    while (
      not (run_dir / "train.log").exists()
      or "env:" not in (run_dir / "train.log").read_text()
    ):
      assert proc.poll() is None, proc.communicate()[0]
      assert time.monotonic() < deadline, "the stand-in never started"
      time.sleep(0.05)
  except BaseException:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise
  os.kill(int(pid_file.read_text()), signal.SIGTERM)  # `launch stop`
  _finish(proc)
  assert proc.returncode == 0
  assert (run_dir / "exit_code").read_text() == "terminated\n"
  log = (run_dir / "train.log").read_text()
  assert "saved" in log and log.rstrip().endswith("exit 0 (SIGTERM)")
