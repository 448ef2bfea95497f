"""A run whose workdir is on gs:// (the emulator of tests/conftest.py):
killed with SIGKILL and resumed, it matches an uninterrupted local run step
for step and in its final parameters, and everything it wrote reads back."""

import json
import re
import time

import jax
import numpy as np
import pytest
from etils import epath

from gemma_jax.checkpoint import native
from gemma_jax.train.testing import (
  RESUME_STEPS,
  RUN_TIMEOUT_S,
  exported_params,
  losses,
  subprocess_env,
  train_process,
)


def _committed(workdir) -> list[int]:
  """Complete checkpoints: on gs:// orbax writes a step in place and marks
  it complete with commit_success.txt, written last."""
  path = epath.Path(workdir) / "checkpoints"
  if not path.exists():
    return []
  return sorted(
    int(p.name)
    for p in path.iterdir()
    if p.name.isdigit() and (p / "commit_success.txt").exists()
  )


@pytest.mark.slow
def test_killed_and_resumed_on_gs_matches_a_local_run(
  uninterrupted_run, compile_cache, gcs_bucket, tmp_path
):
  config, reference = uninterrupted_run
  workdir = f"{gcs_bucket}/run"
  env = subprocess_env(compile_cache)  # carries the emulator's env

  # 1. SIGKILL once a checkpoint is complete (a later save may be half
  # written: it must be ignored).
  proc = train_process(config, workdir, env)
  deadline = time.time() + RUN_TIMEOUT_S
  while not _committed(workdir) or _committed(workdir)[-1] < 4:
    assert proc.poll() is None, proc.communicate()[0]
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.2)
  proc.kill()
  out, _ = proc.communicate(timeout=60)
  killed_at = _committed(workdir)[-1]
  assert killed_at < RESUME_STEPS, "the run ended before SIGKILL arrived"

  # 2. The rerun takes over the dead run's lease, resumes, finishes.
  proc = train_process(config, workdir, env)
  out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 0, out
  assert "took over the stale lease" in out
  resumed = int(
    re.search(r"resumed from gs://.*/checkpoints/(\d+)\n", out).group(1)
  )
  assert killed_at <= resumed < RESUME_STEPS

  # 3. Bitwise what the local run computed; everything read back.
  ref = reference()
  assert losses(workdir) == losses(ref)
  assert sorted(losses(workdir)) == list(range(1, RESUME_STEPS + 1))
  for (path, a), (_, b) in zip(exported_params(workdir), exported_params(ref)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  run = epath.Path(workdir)
  assert (run / "eval.jsonl").read_text() == (ref / "eval.jsonl").read_text()
  assert (run / "config.yaml").read_text() == (ref / "config.yaml").read_text()
  events = [
    p
    for p in (run / "tensorboard").iterdir()
    if p.name.startswith("events.out.tfevents")
  ]
  assert len(events) == 2 and all(p.stat().length > 100 for p in events)
  assert not (run / "LOCK").exists()
  assert _committed(workdir)[-1] == RESUME_STEPS

  # 4. The commands that read a run read it on gs:// too.
  from gemma_jax import cli

  assert (
    cli.main(
      ["eval", "--workdir", workdir, "--out", f"{workdir}/eval-out.json"]
    )
    == 0
  )
  result = json.loads((run / "eval-out.json").read_text())
  final = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
  assert result["step"] == RESUME_STEPS
  for name, r in result["sources"].items():
    np.testing.assert_allclose(r["loss"], final[f"eval/{name}/loss"], rtol=1e-5)
  assert (
    cli.main(
      [
        "convert",
        "--from",
        "native",
        "--to",
        "hf",
        f"{workdir}/params",
        f"{workdir}/hf",
      ]
    )
    == 0
  )
  assert (
    cli.main(
      [
        "convert",
        "--from",
        "hf",
        "--to",
        "native",
        f"{workdir}/hf",
        str(tmp_path / "back"),
      ]
    )
    == 0
  )
  back, _ = native.load(tmp_path / "back")
  for (path, a), (_, b) in zip(
    jax.tree_util.tree_leaves_with_path(back), exported_params(ref)
  ):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  assert cli.main(["plot", workdir]) == 0
  assert sorted(p.name for p in (run / "plots").iterdir()) == [
    "learning_rate.png",
    "loss.png",
    "throughput.png",
  ]
