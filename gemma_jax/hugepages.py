"""Transparent huge pages for the buffers of XLA's CPU runtime.

XLA's CPU runtime mallocs each execution's temporary buffer (2 GiB for the
8 x 512 benchmark step of scripts/bench_vs_hf.py) and frees it afterwards.
glibc serves an allocation that large with a fresh mmap, so every step
touches every page of it anew: measured here, 540,000 page faults and
1.5-1.8 s of kernel time per 8 s train step on 2 cores. glibc 2.35 and
newer can advise transparent huge pages for such mappings
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, see the glibc manual's "Memory
Allocation Tunables"): 2 MiB pages, ~35x fewer faults (15,000 a step).

glibc reads tunables once, when a process starts, so `gemma-jax` re-executes
itself with the setting before it imports anything heavy
(`reexec_with_hugepages`). GEMMA_JAX_HUGEPAGES=0 turns this off; where the
kernel's transparent huge pages are off ("never"), glibc is not glibc or is
older, or the setting is already there, nothing happens.
"""

import os
import pathlib
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _supported() -> bool:
  if sys.platform != "linux":
    return False
  libc, version = platform.libc_ver()
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:
    return False
  if libc != "glibc" or (major, minor) < (2, 35):
    return False
  try:  # e.g. "always [madvise] never": the chosen mode is bracketed
    return "[never]" not in _THP.read_text()
  except OSError:
    return False


def env_with_hugepages(environ=None) -> dict[str, str] | None:
  """`environ` (default os.environ) with the tunable added, or None where
  it is already set, turned off, or would do nothing here."""
  environ = dict(os.environ if environ is None else environ)
  tunables = environ.get("GLIBC_TUNABLES", "")
  if environ.get("GEMMA_JAX_HUGEPAGES") == "0" or "malloc.hugetlb" in tunables:
    return None
  if not _supported():
    return None
  environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  return environ


def reexec_with_hugepages() -> None:
  """Replaces this process by the same command line (sys.orig_argv:
  interpreter options included) with the tunable set: same PID, open
  files and signal handling by the parent. Returns if it is not needed; the
  new process finds the tunable set and does not re-execute."""
  env = env_with_hugepages()
  if env is None or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:  # e.g. an embedded interpreter: run on without the tunable
    return
