"""Several local JAX processes (CPU collectives over gloo) train exactly like
one process with the same devices and resume from their checkpoint; when
one process is lost (hung, or the coordinator killed), the others stop
within seconds with one line, and a restart of all resumes exactly."""

import re
import signal
import time

import numpy as np
import pytest

from gemma_jax.train.testing import (
  RESUME_STEPS,
  RUN_TIMEOUT_S,
  exported_params,
  finish,
  losses,
  train_processes,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# What the tests below give a lost process before the others stop.
HEARTBEAT_S = 8


def _start(n, config, workdir, cache, *extra):
  heartbeat = {"GEMMA_JAX_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S)}
  return train_processes(n, config, workdir, cache, *extra, env=heartbeat)


def _run(n, config, workdir, cache, *extra):
  return finish(_start(n, config, workdir, cache, *extra))


def _when_checkpointed(procs, workdir, step, logged):
  """Waits until checkpoint `step` is complete and `logged` steps logged."""
  deadline = time.time() + RUN_TIMEOUT_S
  while not (
    (workdir / "checkpoints" / str(step)).is_dir()
    and max(losses(workdir), default=0) >= logged
  ):
    for p in procs:
      assert p.poll() is None, p.communicate()[0]
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.05)


def _stopped_within(procs, seconds) -> tuple[list[str], float]:
  """Outputs of `procs`, which must all end within `seconds`."""
  start = time.monotonic()
  outs = [p.communicate(timeout=seconds)[0] for p in procs]
  return outs, time.monotonic() - start


# Same learning-rate schedule as the 40-step reference, stopped early.
SCHEDULE = ("--set", f"optimizer.decay_steps={RESUME_STEPS}")


def _checkpoints(workdir) -> list[int]:
  path = workdir / "checkpoints"
  return sorted(int(n.name) for n in path.iterdir() if n.name.isdigit())


def test_two_processes_outlive_a_hang_and_their_coordinator_and_match_one(
  uninterrupted_run, compile_cache, tmp_path
):
  """One run, started three times (one killed run per fault, not one run
  each: every start costs a compile per process).

  1. SIGSTOP of process 1: it neither answers nor closes its connections
     (a hung host), so the collective waits; the watchdog ends process 0.
  2. Both restarted resume from the checkpoint; SIGKILL of process 0, which
     also hosts the coordination service: process 1 stops within seconds,
     naming the loss.
  3. Both restarted resume again, replay exactly the steps the killed run
     had logged, and the whole run equals one process's bit for bit: every
     logged loss and the final parameters."""
  config, reference = uninterrupted_run
  workdir = tmp_path / "run"

  # 1. A hang.
  procs = _start(2, config, workdir, compile_cache, *SCHEDULE)
  _when_checkpointed(procs, workdir, 4, 5)
  procs[1].send_signal(signal.SIGSTOP)
  outs, took = _stopped_within(procs[:1], HEARTBEAT_S + 30)
  procs[1].kill()
  procs[1].communicate()
  assert procs[0].returncode == 1, outs[0]
  errors = [l for l in outs[0].splitlines() if "error" in l.lower()]
  assert len(errors) == 1, outs[0]
  assert re.fullmatch(
    rf"gemma-jax train: error: jax\.distributed: process 1 was lost "
    rf"\(silent for {HEARTBEAT_S} s\); process 0 of 2 stops too; rerun "
    rf"the same command on every host to resume from the last checkpoint",
    errors[0],
  ), errors[0]
  assert took < HEARTBEAT_S + 20
  assert not (workdir / "LOCK").exists()  # given back before stopping
  print(f"process 0 stopped {took:.1f} s after process 1 hung")

  # 2. The coordinator lost, two steps past the restart's first checkpoint.
  saved = _checkpoints(workdir)[-1]
  procs = _start(2, config, workdir, compile_cache, *SCHEDULE)
  _when_checkpointed(procs, workdir, saved + 4, saved + 6)
  procs[0].kill()
  outs, took = _stopped_within(procs, HEARTBEAT_S + 30)
  resumed = int(re.search(r"resumed from .*/(\d+)\n", outs[0]).group(1))
  assert resumed >= 4
  assert "took over" not in outs[0]
  logged = losses(workdir)
  assert procs[1].returncode != 0, outs[1]
  # Ours, or JAX's client's when it notices first that the coordinator (its
  # service) is gone: either names the loss in one line.
  assert re.search(
    r"jax\.distributed: .* was lost \(.*\); process \d of "
    r"2 stops too|Terminating process because the JAX "
    r"distributed service detected fatal errors\. This "
    r"most likely indicates that another task died",
    outs[1],
  ), outs[1]
  assert took < HEARTBEAT_S + 20
  print(f"process 1 stopped {took:.1f} s after process 0 was killed")

  # 3. To the end.
  outs = _run(2, config, workdir, compile_cache, *SCHEDULE)
  resumed = int(re.search(r"resumed from .*/(\d+)\n", outs[0]).group(1))
  replayed = {s: v for s, v in logged.items() if s > resumed}
  assert replayed, "the killed run logged nothing past its checkpoint"
  assert f"step {RESUME_STEPS}/{RESUME_STEPS}" in outs[0]
  assert "step " not in outs[1]  # only process 0 logs
  final = losses(workdir)
  assert sorted(final) == list(range(1, RESUME_STEPS + 1))
  assert {s: final[s] for s in logged} == logged  # bitwise
  ref = reference()
  assert final == losses(ref)
  for (path, a), (_, b) in zip(exported_params(workdir), exported_params(ref)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
