"""Rendering and running the commands the launcher issues.

Every gcloud command is built by `gcloud()`: one place decides the spelling
(`--flag=value`, bare `--flag` for switches, flags in the order given), so
`--dry-run` prints exactly what would run and tests compare whole command
lines. Commands run through a `Runner`: `Shell` runs them (or only prints
them), and tests pass a fake that answers from a script.
"""

import dataclasses
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Protocol

from gemma_jax.errors import GemmaJaxError


class GcloudError(GemmaJaxError):
  """gcloud is missing, not logged in, or a gcloud command failed."""


def gcloud(group: str, /, *positional: str, **flags) -> list[str]:
  """['gcloud', *group.split(), *positional, --flag=value ...].

  Keyword names become flags with '-' for '_'; True gives a bare switch,
  False and None leave the flag out; other values are written `--k=v`.
  """
  argv = ["gcloud", *group.split(), *positional]
  for key, value in flags.items():
    if value is None or value is False:
      continue
    flag = "--" + key.replace("_", "-")
    argv.append(flag if value is True else f"{flag}={value}")
  return argv


def show(argv: list[str]) -> str:
  """A command line as a shell would take it."""
  return shlex.join(argv)


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str = ""
  stderr: str = ""

  @property
  def ok(self) -> bool:
    return self.returncode == 0


class Runner(Protocol):
  def __call__(self, argv: list[str], capture: bool = False) -> Result:
    """Runs argv; with capture, returns its output instead of showing it."""


class Shell:
  """Runs commands with subprocess; with dry_run prints them instead and
  answers as if each had succeeded with no output."""

  def __init__(self, dry_run: bool = False, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def __call__(self, argv, capture=False) -> Result:
    if self.dry_run:
      print(show(argv), file=self.out, flush=True)
      return Result(0)
    if capture:
      p = subprocess.run(argv, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
      return Result(p.returncode, p.stdout, p.stderr)
    return Result(subprocess.run(argv).returncode)


def check(result: Result, argv: list[str]) -> Result:
  """GcloudError with the command and its first error line unless ok."""
  if not result.ok:
    detail = (result.stderr or result.stdout).strip().splitlines()
    raise GcloudError(f"`{show(argv)}` failed (exit {result.returncode})"
                      + (f": {detail[-1]}" if detail else ""))
  return result


def preflight(run: Runner,
              which: Callable[[str], str | None] = shutil.which) -> str:
  """The active gcloud account; GcloudError before anything is created
  when gcloud is not on PATH or no account is logged in."""
  if which("gcloud") is None:
    raise GcloudError("gcloud is not on PATH: install the Google Cloud CLI "
                      "(https://cloud.google.com/sdk/docs/install), then "
                      "`gcloud auth login`")
  argv = gcloud("auth list", filter="status:ACTIVE", format="value(account)")
  result = run(argv, capture=True)
  account = result.stdout.strip()
  if not result.ok or not account:
    raise GcloudError("gcloud has no active account: run `gcloud auth login` "
                      "(or `gcloud auth activate-service-account`) first")
  return account.splitlines()[0]
