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

Every write of the lease is whole or exclusive, so that no reader ever sees
a half-written lease and of several trainers starting together exactly one
wins. Locally the complete lease is written to a hidden file of its own and
hard-linked to LOCK: `os.link` fails if LOCK exists, atomically (POSIX
link(2)); the heartbeat replaces it with `os.replace`. Taking over a stale
local lease first creates, exclusively, a claim file named after the stale
lease's contents, so that of two restarts racing for one stale lease one
wins too. On Cloud Storage (gs://) an object becomes visible only once its
upload is complete, and every write carries a precondition on the object's
generation (https://cloud.google.com/storage/docs/request-preconditions):
0 to create, the generation read to take a stale lease over, the generation
of our last write to refresh it; of several writers racing, exactly one
succeeds, and a heartbeat never overwrites a lease taken over meanwhile.

A lease that does not parse (damaged by a crash or by hand, or being
written on a filesystem without hard links, where creating it falls back to
`open(..., "x")`) counts as stale only once it is `TORN_AFTER_S` seconds old.

Every writer of a run (metrics, config.yaml, checkpoints, the params export)
calls `check()` first: it compares the token in the file with ours (at most
every `check_every_s` seconds unless forced), so a trainer whose lease was
taken over stops with a clear message instead of overwriting another run.
"""

import contextlib
import dataclasses
import errno
import hashlib
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
# An unparsable lease younger than this may still be being written.
TORN_AFTER_S = 10.0
# os.link's errors on a filesystem without hard links (FAT, some FUSE).
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class WorkdirBusy(TrainingStopped):
  """Another live trainer holds the workdir. Exit 1, not 2: unlike a config
  error, trying again later can succeed (`gemma-jax launch watch` retries),
  e.g. once a hard-killed trainer's lease on another host goes stale."""


class LeaseLost(TrainingStopped):
  """This trainer's lease was taken over: it must not write any more."""


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
    age = time.time() - float(holder.get("written", 0))
    return f"a torn, unreadable lease written {age:.0f} s ago"
  age = time.time() - float(holder.get("heartbeat", 0))
  return (
    f"pid {holder.get('pid')} on {holder.get('host')}, heartbeat "
    f"{age:.0f} s ago"
  )


@dataclasses.dataclass(frozen=True)
class _Seen:
  """The lease as read: its text, when it was last written (seconds since
  the epoch) and, on gs://, the object's generation."""

  text: str
  written: float
  generation: int | None = None

  def holder(self) -> dict:
    """The lease's fields; a torn one's token is "torn"."""
    try:
      data = json.loads(self.text)
      if isinstance(data, dict):
        return data
    except ValueError:
      pass
    return {
      "token": "torn",
      "heartbeat": 0,
      "pid": -1,
      "host": "?",
      "written": self.written,
    }


class _LocalLock:
  """LOCK on a local (POSIX) filesystem (see module docstring)."""

  def __init__(self, path: str, claim_timeout_s: float):
    self.path = path
    self.claim_timeout_s = claim_timeout_s

  def _sibling(self, kind: str) -> str:
    return os.path.join(os.path.dirname(self.path), f".{LOCK_FILE}.{kind}")

  def load(self) -> _Seen | None:
    try:
      with open(self.path, "rb") as f:
        written = os.fstat(f.fileno()).st_mtime
        raw = f.read()
    except FileNotFoundError:
      return None
    return _Seen(raw.decode("utf-8", errors="replace"), written)

  def create(self, data: str) -> bool:
    tmp = self._sibling(f"new-{secrets.token_hex(8)}")
    with open(tmp, "x") as f:
      f.write(data)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      # NFS may answer a retransmitted link(2) that succeeded with EEXIST.
      return os.stat(tmp).st_nlink == 2
    except OSError as e:
      if e.errno not in _NO_LINKS:
        raise
      try:
        with open(self.path, "x") as f:
          f.write(data)
        return True
      except FileExistsError:
        return False
    finally:
      with contextlib.suppress(OSError):
        os.remove(tmp)

  def replace(self, stale: _Seen, data: str) -> bool:
    digest = hashlib.sha256(stale.text.encode()).hexdigest()[:16]
    claim = self._sibling(f"takeover-{digest}")
    try:
      if time.time() - os.path.getmtime(claim) > self.claim_timeout_s:
        os.remove(claim)  # a claimer killed before it finished
    except FileNotFoundError:
      pass
    try:
      with open(claim, "x"):
        pass
    except FileExistsError:
      return False
    try:
      current = self.load()
      if current is not None and current.text != stale.text:
        return False  # rewritten or replaced meanwhile
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      return self.create(data)
    finally:
      with contextlib.suppress(OSError):
        os.remove(claim)

  def refresh(self, data: str) -> bool:
    fileio.atomic_write(self.path, data)
    return True

  def remove(self, token: str) -> None:
    seen = self.load()
    if seen is not None and seen.holder().get("token") == token:
      with contextlib.suppress(OSError):
        os.remove(self.path)


class _GcsLock:
  """LOCK as a Cloud Storage object, every write conditional on its
  generation (see module docstring)."""

  def __init__(self, path: str):
    self.bucket, _, self.name = path[len("gs://") :].partition("/")
    self.generation: int | None = None  # of our last write
    self._client = None

  def _blob(self):
    from google.cloud import storage

    if self._client is None:
      self._client = storage.Client()
    return self._client.bucket(self.bucket).blob(self.name)

  def load(self) -> _Seen | None:
    from google.api_core import exceptions

    blob = self._blob()
    try:
      raw = blob.download_as_bytes()
    except exceptions.NotFound:
      return None
    if blob.updated is None:
      blob.reload(if_generation_match=blob.generation)
    return _Seen(
      raw.decode("utf-8", errors="replace"),
      blob.updated.timestamp(),
      blob.generation,
    )

  def _write(self, data: str, if_generation_match: int) -> bool:
    from google.api_core import exceptions

    blob = self._blob()
    try:
      blob.upload_from_string(
        data,
        content_type="application/json",
        if_generation_match=if_generation_match,
      )
    except exceptions.PreconditionFailed:
      # Also what a retried request whose first try succeeded gets.
      seen = self.load()
      if seen is None or seen.text != data:
        return False
      blob.generation = seen.generation
    self.generation = blob.generation
    return True

  def create(self, data: str) -> bool:
    return self._write(data, 0)

  def replace(self, stale: _Seen, data: str) -> bool:
    assert stale.generation is not None
    return self._write(data, stale.generation)

  def refresh(self, data: str) -> bool:
    assert self.generation is not None
    return self._write(data, self.generation)

  def remove(self, token: str) -> None:
    from google.api_core import exceptions

    with contextlib.suppress(
      exceptions.NotFound, exceptions.PreconditionFailed
    ):
      self._blob().delete(if_generation_match=self.generation)


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
    self.heartbeat_s = heartbeat_s or fileio.seconds_env(
      HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S
    )
    self.timeout_s = timeout_s or fileio.seconds_env(
      TIMEOUT_ENV, 4 * self.heartbeat_s
    )
    self.check_every_s = min(5.0, self.heartbeat_s)
    self.command = command
    self.token: str | None = None
    self.lost: str | None = None
    self._warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    self._last_check = 0.0
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._lock = threading.Lock()
    path = os.fspath(self.path)
    if fileio.is_local(path):
      self._store: _LocalLock | _GcsLock = _LocalLock(path, self.timeout_s)
    elif path.startswith("gs://"):
      self._store = _GcsLock(path)
    else:
      raise ConfigError(
        f"--workdir {workdir}: the workdir lease needs a local path or "
        f"gs://, where a write can be made exclusive"
      )

  # Reading.
  def read(self) -> dict | None:
    """The lease in the file; None if there is none. A torn or unreadable
    lease has the token "torn" and the time it was `written`."""
    seen = self._store.load()
    return None if seen is None else seen.holder()

  def is_stale(self, holder: dict) -> bool:
    if holder.get("token") == "torn":
      return time.time() - float(holder["written"]) > TORN_AFTER_S
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
      seen = self._store.load()
      if seen is None:
        if self._store.create(self._record()):
          break
        continue  # someone created it first: look at theirs
      holder = seen.holder()
      if not self.is_stale(holder):
        raise WorkdirBusy(
          f"--workdir {self.path.parent} is in use by another trainer "
          f"({describe(holder)}; lease {self.path}, stale once its "
          f"heartbeat is {self.timeout_s:.0f} s old); wait for it to end, "
          f"stop it, or choose another --workdir"
        )
      if self._store.replace(seen, self._record()):
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
      if not self.lost:
        self._store.remove(self.token)
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
      self._lose(holder)

  def _lose(self, holder: dict | None) -> None:
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

  def _beat(self) -> None:
    started = time.time()
    while not self._stop.wait(self.heartbeat_s):
      with self._lock:
        if self.token is None or self.lost:
          return
        try:
          self._verify()
          if not self.lost and not self._store.refresh(self._record(started)):
            self._lose(self.read())
        except Exception as e:  # a full disk, a flaky link: retried next beat
          self._warn(
            f"gemma-jax: warning: cannot refresh the lease {self.path}: {e}"
          )
