"""One trainer per workdir: a lease file, WORKDIR/LOCK.

    lease = WorkdirLease(workdir)
    lease.acquire()          # WorkdirBusy naming the holder if one is alive
    lease.check()            # before every write: LeaseLost if taken over
    lease.release()

The lease is a small JSON object {host, pid, token, command, started,
heartbeat} (times in seconds since the epoch). A thread rewrites it every
`heartbeat_s` seconds (GEMMA_JAX_LEASE_HEARTBEAT_S, default 30). A lease is
stale, and is taken over with a warning, when its heartbeat is older than
`timeout_s` (GEMMA_JAX_LEASE_TIMEOUT_S, default 4 x heartbeat = 120 s), or
when its holder ran on this host and that process no longer exists (a
killed run restarts at once). A live holder's lease is never taken.

Creating the lease is exclusive: locally `open(..., "x")` (O_CREAT|O_EXCL),
so of two trainers starting together exactly one wins. Taking over a stale
lease first creates, exclusively, a claim file named after the stale token,
so that of two restarts racing for one stale lease one wins too. On object
stores (gs://) there is no exclusive create through etils epath: the lease
is written, and read back after a short pause; a writer that does not find
its own token has lost the race. That is a read-after-write check, weaker
than a precondition on the object's generation, but it is what every
filesystem epath supports offers.

Every writer of a run (metrics, config.yaml, checkpoints, the params export)
calls `check()` first: it compares the token in the file with ours (at most
every `check_every_s` seconds unless forced), so a trainer whose lease was
taken over stops with a clear message instead of overwriting another run.
"""

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time

from etils import epath

from gemma_jax import fileio
from gemma_jax.errors import ConfigError, TrainingStopped

LOCK_FILE = "LOCK"
HEARTBEAT_ENV = "GEMMA_JAX_LEASE_HEARTBEAT_S"
TIMEOUT_ENV = "GEMMA_JAX_LEASE_TIMEOUT_S"
DEFAULT_HEARTBEAT_S = 30.0
# Object stores: how long a write waits before reading its lease back.
_SETTLE_S = 1.0


class WorkdirBusy(TrainingStopped):
  """Another live trainer holds the workdir. Exit 1, not 2: unlike a config
  error, trying again later can succeed (`gemma-jax launch watch` retries),
  e.g. once a hard-killed trainer's lease on another host goes stale."""


class LeaseLost(TrainingStopped):
  """This trainer's lease was taken over: it must not write any more."""


def _float_env(name: str, default: float) -> float:
  text = os.environ.get(name)
  if not text:
    return default
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ConfigError(f"{name}={text!r}: expected a number of seconds > 0")
  return value


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


def describe(holder: dict) -> str:
  """`pid 123 on host-a, heartbeat 4 s ago` for messages."""
  if holder.get("token") == "torn":
    return "a torn, unreadable lease"
  age = time.time() - float(holder.get("heartbeat", 0))
  return (
    f"pid {holder.get('pid')} on {holder.get('host')}, heartbeat "
    f"{age:.0f} s ago"
  )


class WorkdirLease:
  """The lease on one workdir (see module docstring)."""

  def __init__(
    self,
    workdir,
    heartbeat_s: float | None = None,
    timeout_s: float | None = None,
    command: str = "train",
    warn=None,
  ):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.heartbeat_s = heartbeat_s or _float_env(
      HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S
    )
    self.timeout_s = timeout_s or _float_env(TIMEOUT_ENV, 4 * self.heartbeat_s)
    self.check_every_s = min(5.0, self.heartbeat_s)
    self.command = command
    self.token: str | None = None
    self.lost: str | None = None
    self._warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    self._last_check = 0.0
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._lock = threading.Lock()

  # Reading.
  def read(self) -> dict | None:
    """The lease in the file; None if there is none. A torn or unreadable
    lease (a writer killed mid-write on a filesystem without atomic
    rename) reads as a stale one."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    except UnicodeDecodeError:  # garbage bytes: torn, like cut JSON
      text = ""
    try:
      data = json.loads(text)
      if not isinstance(data, dict):
        raise ValueError
      return data
    except ValueError:
      return {"token": "torn", "heartbeat": 0, "pid": -1, "host": "?"}

  def is_stale(self, holder: dict) -> bool:
    if time.time() - float(holder.get("heartbeat", 0)) > self.timeout_s:
      return True
    return (
      holder.get("host") == socket.gethostname()
      and isinstance(holder.get("pid"), int)
      and holder["pid"] != os.getpid()
      and not _pid_alive(holder["pid"])
    )

  # Taking and giving back.
  def acquire(self) -> None:
    """Takes the lease, taking over a stale one with a warning; raises
    WorkdirBusy (one line naming the holder) if a live trainer holds it."""
    self.token = secrets.token_hex(8)
    for _ in range(3):
      holder = self.read()
      if holder is None:
        if self._create():
          break
        continue  # someone created it first: look at theirs
      if not self.is_stale(holder):
        raise WorkdirBusy(
          f"--workdir {self.path.parent} is in use by another trainer "
          f"({describe(holder)}; lease {self.path}, stale once its "
          f"heartbeat is {self.timeout_s:.0f} s old); wait for it to end, "
          f"stop it, or choose another --workdir"
        )
      if self._take_over(holder):
        self._warn(
          f"gemma-jax: warning: took over the stale lease "
          f"{self.path} of {describe(holder)}"
        )
        break
    else:
      raise WorkdirBusy(
        f"--workdir {self.path.parent}: could not take the "
        f"lease {self.path} (other trainers are starting); "
        f"try again"
      )
    self._last_check = time.monotonic()
    self._thread = threading.Thread(
      target=self._beat, daemon=True, name="gemma-jax-lease"
    )
    self._thread.start()

  def release(self) -> None:
    """Stops the heartbeat and removes the lease if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    if self.token is None:
      return
    with self._lock:
      holder = self.read()
      if holder is not None and holder.get("token") == self.token:
        with contextlib.suppress(OSError):
          self.path.unlink()
      self.token = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  # While holding it.
  def check(self, what: str = "write", force: bool = False) -> None:
    """Raises LeaseLost if another trainer took the lease over."""
    if self.token is None:
      return
    now = time.monotonic()
    if not self.lost and (
      force or now - self._last_check >= self.check_every_s
    ):
      self._last_check = now
      self._verify()
    if self.lost:
      raise LeaseLost(
        f"not writing the {what}: {self.lost}; this trainer "
        f"stops so as not to overwrite the other run"
      )

  def _verify(self) -> None:
    holder = self.read()
    if holder is None or holder.get("token") != self.token:
      who = describe(holder) if holder else "nobody (the lease was removed)"
      self.lost = f"the lease {self.path} is now held by {who}"

  def _record(self, started: float | None = None) -> str:
    now = time.time()
    return json.dumps(
      {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": self.token,
        "command": self.command,
        "started": started or now,
        "heartbeat": now,
      }
    )

  def _create(self) -> bool:
    """Creates the lease file if none exists; whether we did."""
    data = self._record()
    if fileio.is_local(self.path):
      try:
        with open(self.path, "x") as f:
          f.write(data)
        return True
      except FileExistsError:
        return False
    # Object stores: write, wait, read back (see module docstring).
    self.path.write_text(data)
    time.sleep(_SETTLE_S)
    holder = self.read()
    return holder is not None and holder.get("token") == self.token

  def _take_over(self, stale: dict) -> bool:
    """Replaces the stale lease `stale`; False if another process won."""
    claim = self.path.parent / f".{LOCK_FILE}.takeover-{stale.get('token')}"
    if fileio.is_local(claim):
      try:
        if time.time() - os.path.getmtime(claim) > self.timeout_s:
          os.remove(claim)  # a claimer killed before it finished
      except FileNotFoundError:
        pass
      try:
        with open(claim, "x"):
          pass
      except FileExistsError:
        return False
    try:
      current = self.read()
      if current is not None and current.get("token") != stale.get("token"):
        return False  # replaced meanwhile (not by a claimer)
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()
      return self._create()
    finally:
      with contextlib.suppress(OSError):
        claim.unlink()

  def _beat(self) -> None:
    started = time.time()
    while not self._stop.wait(self.heartbeat_s):
      with self._lock:
        if self.token is None or self.lost:
          return
        try:
          self._verify()
          if not self.lost:
            fileio.atomic_write(self.path, self._record(started))
        except OSError as e:  # a full or flaky disk: retried next beat
          self._warn(
            f"gemma-jax: warning: cannot refresh the lease {self.path}: {e}"
          )
