"""Two local JAX processes (CPU collectives over gloo) train exactly like
one process with the same devices, and resume from their checkpoint."""

import socket

import numpy as np

from gemma_jax.train.testing import (
    RESUME_STEPS, exported_params, losses, subprocess_env, train_process)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(config, workdir, cache, *extra):
  port = _free_port()
  procs = []
  for i in range(2):
    env = subprocess_env(cache, devices=1)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(train_process(config, workdir, env, *extra))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


def test_two_processes_match_one_and_resume(uninterrupted_run, compile_cache,
                                            tmp_path):
  config, reference = uninterrupted_run
  workdir = tmp_path / "run"
  # Same learning-rate schedule as the 40-step reference, stopped halfway.
  schedule = ("--set", f"optimizer.decay_steps={RESUME_STEPS}")
  half = RESUME_STEPS // 2
  outs = _run_two_processes(config, workdir, compile_cache, "--steps",
                            str(half), *schedule)
  assert f"step {half}/{half}" in outs[0]
  assert "step " not in outs[1]            # only process 0 logs
  outs = _run_two_processes(config, workdir, compile_cache, *schedule)
  assert f"resumed from {workdir}/checkpoints/{half}" in outs[0]

  ref = reference()
  assert losses(workdir) == losses(ref)
  for (path, a), (_, b) in zip(exported_params(workdir),
                               exported_params(ref)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
