"""Fixtures for the trainer tests; helpers live in gemma_jax.train.testing.
(`tiny_tokenizer` and `compile_cache` are suite-wide: tests/conftest.py.)"""

import os
import sys
import time

import pytest
import yaml

import gemma_jax.features  # noqa: F401  (registers them with the core)
from gemma_jax.train.testing import (
  RUN_TIMEOUT_S,
  subprocess_env,
  texts,
  tiny_config_dict,
  write_config,
)


@pytest.fixture
def tiny_config_path(tiny_tokenizer, tmp_path):
  path = tmp_path / "tiny.yaml"
  path.write_text(
    yaml.safe_dump(tiny_config_dict(tiny_tokenizer), sort_keys=False)
  )
  return str(path)


@pytest.fixture(scope="session")
def uninterrupted_run(compile_cache, tmp_path_factory):
  """The reference: one process, 2 CPU devices, no interruption; (config,
  result), where result() waits for it and returns its workdir.

  One run per test session, however many pytest-xdist workers need it
  (test_resume, test_gcs_workdir and test_multiprocess, the longest tests,
  start on different workers): the first to need it starts it in the
  background in a folder every worker shares, with its own tokenizer; the
  others wait for its exit status there."""
  from gemma_jax.tokenizer import train_tokenizer

  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's base is a folder of the session's own.
  root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / (
    "uninterrupted"
  )
  root.mkdir(parents=True, exist_ok=True)
  config, status, log = root / "run.yaml", root / "exit_status", root / "log"
  proc = None  # the run, where this worker started it
  try:
    os.close(os.open(root / "claimed", os.O_CREAT | os.O_EXCL))
  except FileExistsError:  # another worker starts it
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not config.exists():
      assert time.monotonic() < deadline, "the reference run never started"
      time.sleep(0.1)
  else:
    train_tokenizer(
      texts(0, 300, "prose") + texts(1, 300, "code"),
      vocab_size=400,
      out_path=str(root / "tokenizer.model"),
    )
    write_config(root / "run.yaml.tmp", str(root / "tokenizer.model"))
    os.rename(root / "run.yaml.tmp", config)
    # The exit status is written by a shell, not this worker: the others
    # read it even after this one has ended.
    import subprocess

    cmd = [sys.executable, "-m", "gemma_jax.cli", "train", str(config)]
    cmd += ["--workdir", str(root / "run")]
    proc = subprocess.Popen(
      [
        "sh",
        "-c",
        '"$@" >"$LOG" 2>&1; echo $? >"$STATUS.tmp"; mv "$STATUS.tmp" "$STATUS"',
        "sh",
        *cmd,
      ],
      env=subprocess_env(compile_cache)
      | {"LOG": str(log), "STATUS": str(status)},
    )

  def result():
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not status.exists():
      assert time.monotonic() < deadline, "the reference run did not end"
      time.sleep(0.1)
    if proc is not None:
      proc.wait()
    assert status.read_text().strip() == "0", log.read_text()
    return root / "run"

  return str(config), result
