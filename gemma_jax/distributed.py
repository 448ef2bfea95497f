"""Starting the JAX runtime: one process, several (jax.distributed), Pathways.

    initialize_runtime(cfg.runtime)     # before anything touches the devices

Multi-controller (the default): one JAX process per host, all running the
same program. `jax.distributed` starts from

  * JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID: any machine, the CPU included (collectives over gloo);
  * or a cluster JAX detects itself: Cloud TPU VMs (single and multi-slice;
    the TPU runtime writes MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES
    and MEGASCALE_SLICE_ID into each VM's `tpu-env` metadata, which JAX reads),
    GKE TPU pods, SLURM, Open MPI. GEMMA_JAX_DISTRIBUTED=1 asks for that
    detection where no variable shows it (`gemma-jax launch run` sets it).

Every process first prints whom it waits for. If not all processes have
connected after GEMMA_JAX_INIT_TIMEOUT_S seconds (default 300), it stops with
one line naming the coordinator, its own id and the process count, instead of
JAX's C++ abort ("another task died") after five silent minutes.

When a process dies later (killed, its host lost), the others would wait in
their next collective or barrier: CPU collectives (gloo) wait forever on a
silent peer, and JAX's coordination service aborts the process from C++
with a stack trace only after its heartbeat timeout (100 s by default). So
every process runs a watchdog: it writes a counter into the coordination
service's key-value store every few seconds and reads everyone's; a process
whose counter stands still for GEMMA_JAX_HEARTBEAT_TIMEOUT_S seconds
(default 60), or a coordinator that stops answering for that long, is lost.
Then every other process runs the hooks registered with `on_peer_lost` (the
trainer gives its workdir lease back), prints one line naming the lost
process and exits with status 1; a collective that fails first (gloo sees a
closed connection) ends the run the same way (`stop_for_lost_peer`).
Rerunning the same command on every host resumes from the last checkpoint.
A process that ends normally says so first, and is not mistaken for lost.

Single-controller (`runtime: {pathways: true}`): one Python process drives
every TPU slice through a Pathways proxy (JAX_PLATFORMS=proxy,
JAX_BACKEND_TARGET=grpc://HEAD:29000, as `xpk workload create-pathways` sets
them); `pathwaysutils.initialize()` registers the proxy backend, and
jax.distributed is not used.
"""

import contextlib
import dataclasses
import os
import re
import sys
import threading
import time
from collections.abc import Callable

from gemma_jax.errors import ConfigError, TrainingStopped

INIT_TIMEOUT_ENV = "GEMMA_JAX_INIT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 300
HEARTBEAT_ENV = "GEMMA_JAX_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# The hooks of a lost peer get this long before the process ends anyway.
_HOOKS_DEADLINE_S = 10.0
# JAX's own deadline is set this much later than ours: when it passes, JAX
# aborts the process from C++, so ours must always come first.
_JAX_DEADLINE_MARGIN_S = 120
# While waiting, a reminder line every this many seconds.
_REMIND_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How the JAX runtime starts (the `runtime:` section of a run config).

  pathways: single-controller Pathways on Cloud (needs the `pathwaysutils`
    package and a Pathways proxy); false: one JAX process per host.
  """

  pathways: bool = False


@dataclasses.dataclass(frozen=True)
class _Explicit:
  """jax.distributed arguments from the JAX_* variables."""

  coordinator: str
  num_processes: int
  process_id: int


def _int_env(env, name: str, minimum: int) -> int:
  text = env[name]
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise ConfigError(f"{name}={text!r}: expected an integer >= {minimum}")
  return value


def explicit_processes(env=None) -> _Explicit | None:
  """The JAX_* variables, checked; None when they do not ask for processes.

  JAX_NUM_PROCESSES or JAX_PROCESS_ID without JAX_COORDINATOR_ADDRESS, a
  value that is not a number, or an id outside [0, JAX_NUM_PROCESSES) is a
  ConfigError naming the variable.
  """
  env = os.environ if env is None else env
  names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  present = [n for n in names if env.get(n)]
  if "JAX_NUM_PROCESSES" not in present and "JAX_PROCESS_ID" not in present:
    return None  # JAX_COORDINATOR_ADDRESS alone: a detected cluster's hint
  for name in names:
    if name not in present:
      raise ConfigError(
        f"{name} is not set but {', '.join(present)} is: set "
        f"all three of {', '.join(names)} (or none)"
      )
  coordinator = env["JAX_COORDINATOR_ADDRESS"]
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(
      f"JAX_COORDINATOR_ADDRESS={coordinator!r}: expected "
      f"HOST:PORT of process 0, e.g. 10.0.0.2:8476"
    )
  num = _int_env(env, "JAX_NUM_PROCESSES", 1)
  pid = _int_env(env, "JAX_PROCESS_ID", 0)
  if pid >= num:
    raise ConfigError(
      f"JAX_PROCESS_ID={pid} must be below JAX_NUM_PROCESSES={num}"
    )
  return _Explicit(coordinator, num, pid)


def detected_cluster(env=None) -> bool:
  """Whether the environment shows a multi-host cluster JAX can detect."""
  env = os.environ if env is None else env

  def count(name):
    try:
      return int(env.get(name, "1"))
    except ValueError:
      return 1

  return bool(
    env.get("GEMMA_JAX_DISTRIBUTED") == "1"
    or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    or env.get("MEGASCALE_COORDINATOR_ADDRESS")
    or count("SLURM_NTASKS") > 1
    or count("OMPI_COMM_WORLD_SIZE") > 1
  )


def init_timeout_s(env=None) -> int:
  """GEMMA_JAX_INIT_TIMEOUT_S: seconds to wait for every process (> 0)."""
  env = os.environ if env is None else env
  if not env.get(INIT_TIMEOUT_ENV):
    return DEFAULT_INIT_TIMEOUT_S
  return _int_env(env, INIT_TIMEOUT_ENV, 1)


def heartbeat_timeout_s(env=None) -> int:
  """GEMMA_JAX_HEARTBEAT_TIMEOUT_S: seconds of silence after which a
  process counts as lost (> 0)."""
  env = os.environ if env is None else env
  if not env.get(HEARTBEAT_ENV):
    return DEFAULT_HEARTBEAT_TIMEOUT_S
  return _int_env(env, HEARTBEAT_ENV, 1)


def initialize_distributed(
  log: Callable[[str], None] | None = None, env=None
) -> None:
  """Starts jax.distributed when this is one of several processes.

  Prints one line saying whom it waits for, a reminder every 30 s, and raises
  TrainingStopped (one line: coordinator, process id, process count, what to
  check) when the processes have not all connected within
  GEMMA_JAX_INIT_TIMEOUT_S. Bad JAX_* values raise ConfigError first.
  """
  import jax

  log = log or _stderr
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return
  explicit = explicit_processes(env)
  timeout = init_timeout_s(env)
  heartbeat = heartbeat_timeout_s(env)
  if explicit is not None:
    if explicit.num_processes == 1:
      return
    # CPU processes need CPU collectives to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
      coordinator_address=explicit.coordinator,
      num_processes=explicit.num_processes,
      process_id=explicit.process_id,
    )
    who = (
      f"process {explicit.process_id} of {explicit.num_processes}, "
      f"coordinator {explicit.coordinator}"
    )
  elif detected_cluster(env):
    kwargs = {}
    who = "a detected cluster (" + _cluster_hint(env) + ")"
  else:
    return
  log(
    f"jax.distributed: {who}: waiting up to {timeout} s for every process "
    f"to connect ({INIT_TIMEOUT_ENV})"
  )
  # JAX's own heartbeat abort (C++, a stack trace) comes after ours.
  kwargs["heartbeat_timeout_seconds"] = max(100, 2 * heartbeat + 10)
  _initialize_with_deadline(kwargs, timeout, who, log)
  _start_watchdog(heartbeat)
  log(f"jax.distributed: connected ({who})")


def _cluster_hint(env) -> str:
  hints = [
    f"{n}={env[n]}"
    for n in (
      "MEGASCALE_COORDINATOR_ADDRESS",
      "MEGASCALE_NUM_SLICES",
      "MEGASCALE_SLICE_ID",
      "TPU_WORKER_ID",
      "SLURM_NTASKS",
      "OMPI_COMM_WORLD_SIZE",
    )
    if env.get(n)
  ]
  return ", ".join(hints) or "Cloud TPU metadata"


def _initialize_with_deadline(
  kwargs: dict, timeout: int, who: str, log: Callable[[str], None]
) -> None:
  """jax.distributed.initialize on a helper thread, waited for `timeout`.

  JAX's connect blocks in C++ and, at its own deadline, aborts the process
  with a stack trace; waiting on a thread lets this process say who it is
  and stop with a Python exception instead.
  """
  import jax

  errors = []

  def connect():
    try:
      jax.distributed.initialize(
        **kwargs, initialization_timeout=timeout + _JAX_DEADLINE_MARGIN_S
      )
    except BaseException as e:  # re-raised on the caller
      errors.append(e)

  thread = threading.Thread(
    target=connect, name="jax-distributed-init", daemon=True
  )
  start = time.monotonic()
  thread.start()
  while thread.is_alive():
    left = timeout - (time.monotonic() - start)
    if left <= 0:
      break
    thread.join(min(left, _REMIND_EVERY_S))
    if thread.is_alive() and time.monotonic() - start < timeout:
      log(
        f"jax.distributed: still waiting after "
        f"{time.monotonic() - start:.0f} s ({who})"
      )
  if errors:
    raise errors[0]
  if thread.is_alive():
    _exit_quickly_at_interpreter_exit()
    raise TrainingStopped(
      f"jax.distributed: not every process connected within {timeout} s "
      f"({who}); start the same command on every host, check that they "
      f"reach the coordinator's port, or raise {INIT_TIMEOUT_ENV}"
    )


# A lost peer.
_peer_lost_hooks: list[Callable[[], None]] = []
error_prefix = "gemma-jax"
# What a collective with a vanished process raises (gloo on CPU; the
# coordination service once it has noticed).
_PEER_FAILURE = re.compile(
  r"gloo|connection (closed|reset) by peer|"
  r"heartbeat timeout|tasks are unhealthy",
  re.I,
)


def on_peer_lost(hook: Callable[[], None]) -> Callable[[], None]:
  """Runs `hook()` before this process stops because another process was
  lost; returns a function that removes it."""
  _peer_lost_hooks.append(hook)

  def remove() -> None:
    if hook in _peer_lost_hooks:
      _peer_lost_hooks.remove(hook)

  return remove


def is_peer_failure(error: BaseException) -> bool:
  """Whether `error` (from a step or a collective) means that another
  process of a multi-process run is gone."""
  import jax

  return (
    jax.process_count() > 1
    and isinstance(error, jax.errors.JaxRuntimeError)
    and bool(_PEER_FAILURE.search(str(error)))
  )


def lost_message(who: str, why: str) -> str:
  import jax

  return (
    f"jax.distributed: {who} was lost ({why}); process "
    f"{jax.process_index()} of {jax.process_count()} stops too; rerun "
    f"the same command on every host to resume from the last "
    f"checkpoint"
  )


def stop_for_lost_peer(message: str) -> None:
  """Runs the hooks (at most 10 s), prints one line, exits with status 1
  without JAX's teardown (its shutdown barrier waits for the lost peer)."""
  timer = threading.Timer(
    _HOOKS_DEADLINE_S, lambda: os._exit(TrainingStopped.exit_code)
  )
  timer.daemon = True
  timer.start()
  for hook in list(_peer_lost_hooks):
    with contextlib.suppress(BaseException):  # stopping anyway
      hook()
  sys.stdout.flush()
  print(f"{error_prefix}: error: {message}", file=sys.stderr, flush=True)
  os._exit(TrainingStopped.exit_code)


class PeerWatchdog:
  """Finds a lost process through the coordination service's key-value
  store (see module docstring). `client` is jax.distributed's."""

  PREFIX = "gemma_jax/alive/"

  def __init__(
    self,
    client,
    process_id: int,
    num_processes: int,
    timeout_s: float,
    lost=stop_for_lost_peer,
  ):
    self.client, self.me, self.n = client, process_id, num_processes
    self.timeout_s = timeout_s
    self.every_s = max(0.2, min(5.0, timeout_s / 5))
    self._lost = lost
    self._beats = 0
    now = time.monotonic()
    self._seen = dict.fromkeys(range(num_processes), (None, now))
    self._answered = now
    self._stop = threading.Event()

  def start(self) -> None:
    for target, name in ((self._beat, "beat"), (self._judge, "judge")):
      threading.Thread(
        target=target, daemon=True, name=f"gemma-jax-peers-{name}"
      ).start()

  def done(self) -> None:
    """This process ends normally: peers stop watching it, it them."""
    self._stop.set()
    with contextlib.suppress(Exception):
      self.client.key_value_set(
        f"{self.PREFIX}{self.me}", "done", allow_overwrite=True
      )

  def _beat(self) -> None:
    while not self._stop.wait(self.every_s):
      try:
        self._beats += 1
        self.client.key_value_set(
          f"{self.PREFIX}{self.me}", str(self._beats), allow_overwrite=True
        )
        values = dict(self.client.key_value_dir_get(self.PREFIX))
      except Exception:  # judged by its age
        continue
      now = time.monotonic()
      self._answered = now
      for key, value in values.items():
        peer = int(key.rsplit("/", 1)[-1])
        if value == "done":
          self._seen.pop(peer, None)
        elif peer in self._seen and self._seen[peer][0] != value:
          self._seen[peer] = (value, now)

  def _judge(self) -> None:
    while not self._stop.wait(self.every_s):
      now = time.monotonic()
      if self.me != 0 and now - self._answered > self.timeout_s:
        message = lost_message(
          "the coordinator (process 0)", f"no answer for {self.timeout_s:g} s"
        )
      else:
        silent = [
          p
          for p, (_, t) in sorted(self._seen.items())
          if p != self.me and now - t > self.timeout_s
        ]
        if not silent:
          continue
        message = lost_message(
          f"process {silent[0]}", f"silent for {self.timeout_s:g} s"
        )
      self._stop.set()
      self._lost(message)
      return


_watchdog: PeerWatchdog | None = None


def _start_watchdog(timeout_s: int) -> None:
  """The watchdog of this process, stopped as done at interpreter exit
  (registered after jax's own exit hook, so it runs first)."""
  import atexit

  import jax

  # jax.distributed's client has no public accessor in JAX 0.10;
  # jax.experimental.multihost_utils reads it from here too.
  from jax._src import distributed as jax_distributed

  global _watchdog
  _watchdog = PeerWatchdog(
    jax_distributed.global_state.client,
    jax.process_index(),
    jax.process_count(),
    timeout_s,
  )
  _watchdog.start()
  atexit.register(_watchdog.done)


def _exit_quickly_at_interpreter_exit() -> None:
  """Ends the process without JAX's teardown once Python is done.

  The half-started runtime cannot be shut down: its coordination service
  takes seconds to stop and logs C++ errors after our message, and the
  connecting thread would abort the process at JAX's deadline. An atexit
  hook registered now runs before JAX's own (atexit runs last-in first-out)
  and ends the process with TrainingStopped's status, 1.
  """
  import atexit

  def end():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(TrainingStopped.exit_code)

  atexit.register(end)


def initialize_runtime(
  cfg: RuntimeConfig = RuntimeConfig(),
  log: Callable[[str], None] | None = None,
  command: str | None = None,
) -> None:
  """Starts Pathways (cfg.pathways) or jax.distributed; call before any
  device work. `command` names the CLI command in the line printed when a
  peer is lost (`gemma-jax train: error: ...`)."""
  global error_prefix
  if command:
    error_prefix = f"gemma-jax {command}"
  if not cfg.pathways:
    initialize_distributed(log)
    return
  try:
    import pathwaysutils
  except ImportError:
    raise ConfigError(
      "runtime.pathways is true but the 'pathwaysutils' "
      "package is not installed: pip install pathwaysutils "
      "(or set runtime.pathways: false)"
    ) from None
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if "proxy" not in platforms:
    raise ConfigError(
      f"runtime.pathways is true but JAX_PLATFORMS={platforms!r} does not "
      f"name the Pathways 'proxy' backend: run under Pathways (`gemma-jax "
      f"launch gke --pathways` renders the workload) with "
      f"JAX_PLATFORMS=proxy and JAX_BACKEND_TARGET=grpc://HEAD:29000"
    )
  pathwaysutils.initialize()
  (log or _stderr)(
    f"pathways: single controller via "
    f"{os.environ.get('JAX_BACKEND_TARGET', 'the proxy')}"
  )


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier called `name`; does
  nothing in a single-process run. Every process must call it, in the same
  order as the other barriers (the name only labels it in JAX's errors)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
