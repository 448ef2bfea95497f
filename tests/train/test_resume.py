"""Exact resume: real processes stopped by SIGTERM and SIGKILL, then rerun,
match an uninterrupted run step for step and in the final parameters."""

import os
import re
import signal
import time

import numpy as np
import pytest

from gemma_jax.train.testing import (
  RESUME_STEPS,
  RUN_TIMEOUT_S,
  exported_params,
  losses,
  subprocess_env,
  train_process,
)

pytestmark = pytest.mark.slow


def _checkpoints(workdir) -> list[int]:
  """Complete checkpoints (orbax renames a step's directory when done)."""
  path = workdir / "checkpoints"
  return (
    sorted(int(n) for n in os.listdir(path) if n.isdigit())
    if (path.exists())
    else []
  )


def _wait(proc, condition, timeout=RUN_TIMEOUT_S):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition():
      return
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before the signal was sent"
  raise TimeoutError("condition not reached")


def test_sigterm_then_sigkill_then_resume_matches_uninterrupted(
  uninterrupted_run, compile_cache, tmp_path
):
  config, reference = uninterrupted_run
  env = subprocess_env(compile_cache)
  workdir = tmp_path / "run"

  # 1. SIGTERM mid-run: finish the step, save it, exit 0.
  proc = train_process(config, workdir, env)
  _wait(proc, lambda: max(losses(workdir), default=0) >= 3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, out
  stopped = max(losses(workdir))
  assert stopped < RESUME_STEPS, "the run ended before SIGTERM arrived"
  assert f"stopping at step {stopped} on SIGTERM" in out
  assert str(stopped) in os.listdir(workdir / "checkpoints")

  # 2. Rerun resumes there; SIGKILL it after its next checkpoint and a
  # few more steps (a later save may be in flight).
  proc = train_process(config, workdir, env)
  _wait(
    proc,
    lambda: (
      _checkpoints(workdir)[-1] > stopped
      and max(losses(workdir)) >= _checkpoints(workdir)[-1] + 2
    ),
  )
  saved = _checkpoints(workdir)[-1]
  proc.kill()
  out, _ = proc.communicate(timeout=60)
  assert f"resumed from {workdir}/checkpoints/{stopped}" in out, out
  killed = max(losses(workdir))
  assert killed < RESUME_STEPS, "the run ended before SIGKILL arrived"

  # 3. Rerun resumes from the last complete checkpoint and finishes.
  proc = train_process(config, workdir, env)
  out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, out
  resumed = int(re.search(r"resumed from .*/(\d+)\n", out).group(1))
  assert saved <= resumed <= killed

  ref = reference()
  assert losses(workdir) == losses(ref)  # bitwise, every step
  assert sorted(losses(workdir)) == list(range(1, RESUME_STEPS + 1))
  for (path, a), (_, b) in zip(exported_params(workdir), exported_params(ref)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
