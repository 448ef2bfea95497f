"""The `gemma-jax` console script: every command listed and reachable."""

import subprocess
import sys

import pytest

from gemma_jax import cli


def test_help_lists_every_command_with_its_purpose(capsys):
  try:
    cli.main(["--help"])
  except SystemExit as e:
    assert e.code == 0
  out = capsys.readouterr().out
  for name in cli.COMMANDS:
    assert f"    {name}" in out
  assert "ahead-of-time compile the train step" in out


@pytest.mark.slow
def test_each_command_has_its_own_help():
  for name in ("convert", "sample", "train"):
    out = subprocess.run(
      [sys.executable, "-m", "gemma_jax.cli", name, "--help"],
      capture_output=True,
      text=True,
      env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert f"usage: gemma-jax {name}" in out.stdout
