"""`gemma-jax` runs with glibc's huge-page tunable, once, and only where it
does something."""

import os
import subprocess
import sys

import pytest

from gemma_jax import cli, hugepages

needs_support = pytest.mark.skipif(
  not hugepages._supported(), reason="no glibc >= 2.35 with THP here"
)


@needs_support
def test_the_tunable_is_added_to_the_others():
  env = hugepages.env_with_hugepages({"PATH": "/bin"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = hugepages.env_with_hugepages(
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  )
  assert (
    env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  )


def test_nothing_to_do_when_set_or_turned_off():
  set_already = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
  assert hugepages.env_with_hugepages(set_already) is None
  assert hugepages.env_with_hugepages({"GEMMA_JAX_HUGEPAGES": "0"}) is None


def test_nothing_to_do_where_unsupported(monkeypatch):
  monkeypatch.setattr(sys, "platform", "darwin")
  assert hugepages.env_with_hugepages({}) is None


@needs_support
def test_console_script_reexecutes_itself_once(monkeypatch):
  calls = []

  def fake_execve(path, args, env):
    calls.append((path, args, env))
    raise SystemExit(0)

  monkeypatch.setattr(os, "execve", fake_execve)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("GEMMA_JAX_HUGEPAGES", raising=False)
  monkeypatch.setattr(sys, "argv", ["gemma-jax", "train", "--help"])
  with pytest.raises(SystemExit):
    cli.main()
  [(path, args, env)] = calls
  assert path == sys.executable
  assert args == sys.orig_argv  # the same command line, options included
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"

  # The re-executed process has the tunable and runs the command.
  calls.clear()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  with pytest.raises(SystemExit) as e:
    cli.main()
  assert e.value.code == 0 and not calls


@needs_support
def test_a_failed_reexecution_runs_on_without_it(monkeypatch):
  def refuse(*args):
    raise PermissionError("no exec here")

  monkeypatch.setattr(os, "execve", refuse)
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("GEMMA_JAX_HUGEPAGES", raising=False)
  monkeypatch.setattr(sys, "argv", ["gemma-jax", "train", "--help"])
  with pytest.raises(SystemExit) as e:
    cli.main()
  assert e.value.code == 0


def test_called_from_python_it_does_not_reexecute(monkeypatch):
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--help"])
  assert e.value.code == 0


_FAULTS = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buf = libc.malloc(size)
ctypes.memset(buf, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env) -> int:
  out = subprocess.run(
    [sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env
  )
  assert out.returncode == 0, out.stderr
  return int(out.stdout)


@needs_support
def test_the_tunable_cuts_the_page_faults_of_a_large_buffer():
  # What the re-execution is for: touching a fresh 256 MiB malloc faults
  # per 4 KiB page (65,536) without the tunable, per 2 MiB page with it.
  plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  assert _faults(plain) > 60_000
  assert _faults(hugepages.env_with_hugepages(plain)) < 6_000


@pytest.mark.slow
@needs_support
def test_the_reexecuted_console_script_runs():
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run(
    [sys.executable, "-c", "from gemma_jax import cli; cli.main()", "--help"],
    capture_output=True,
    text=True,
    env=env,
  )
  assert out.returncode == 0, out.stderr
  assert "usage: gemma-jax" in out.stdout
