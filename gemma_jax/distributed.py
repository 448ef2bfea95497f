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

Single-controller (`runtime: {pathways: true}`): one Python process drives
every TPU slice through a Pathways proxy (JAX_PLATFORMS=proxy,
JAX_BACKEND_TARGET=grpc://HEAD:29000, as `xpk workload create-pathways` sets
them); `pathwaysutils.initialize()` registers the proxy backend, and
jax.distributed is not used.
"""

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable

from gemma_jax.errors import ConfigError, TrainingStopped

INIT_TIMEOUT_ENV = "GEMMA_JAX_INIT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 300
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
    return None   # JAX_COORDINATOR_ADDRESS alone: a detected cluster's hint
  for name in names:
    if name not in present:
      raise ConfigError(f"{name} is not set but {', '.join(present)} is: set "
                        f"all three of {', '.join(names)} (or none)")
  coordinator = env["JAX_COORDINATOR_ADDRESS"]
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"JAX_COORDINATOR_ADDRESS={coordinator!r}: expected "
                      f"HOST:PORT of process 0, e.g. 10.0.0.2:8476")
  num = _int_env(env, "JAX_NUM_PROCESSES", 1)
  pid = _int_env(env, "JAX_PROCESS_ID", 0)
  if pid >= num:
    raise ConfigError(f"JAX_PROCESS_ID={pid} must be below "
                      f"JAX_NUM_PROCESSES={num}")
  return _Explicit(coordinator, num, pid)


def detected_cluster(env=None) -> bool:
  """Whether the environment shows a multi-host cluster JAX can detect."""
  env = os.environ if env is None else env

  def count(name):
    try:
      return int(env.get(name, "1"))
    except ValueError:
      return 1
  return bool(env.get("GEMMA_JAX_DISTRIBUTED") == "1"
              or "," in env.get("TPU_WORKER_HOSTNAMES", "")
              or env.get("MEGASCALE_COORDINATOR_ADDRESS")
              or count("SLURM_NTASKS") > 1
              or count("OMPI_COMM_WORLD_SIZE") > 1)


def init_timeout_s(env=None) -> int:
  """GEMMA_JAX_INIT_TIMEOUT_S: seconds to wait for every process (> 0)."""
  env = os.environ if env is None else env
  if not env.get(INIT_TIMEOUT_ENV):
    return DEFAULT_INIT_TIMEOUT_S
  return _int_env(env, INIT_TIMEOUT_ENV, 1)


def initialize_distributed(log: Callable[[str], None] | None = None,
                           env=None) -> None:
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
  if explicit is not None:
    if explicit.num_processes == 1:
      return
    # CPU processes need CPU collectives to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=explicit.coordinator,
                  num_processes=explicit.num_processes,
                  process_id=explicit.process_id)
    who = (f"process {explicit.process_id} of {explicit.num_processes}, "
           f"coordinator {explicit.coordinator}")
  elif detected_cluster(env):
    kwargs = {}
    who = "a detected cluster (" + _cluster_hint(env) + ")"
  else:
    return
  log(f"jax.distributed: {who}: waiting up to {timeout} s for every process "
      f"to connect ({INIT_TIMEOUT_ENV})")
  _initialize_with_deadline(kwargs, timeout, who, log)
  log(f"jax.distributed: connected ({who})")


def _cluster_hint(env) -> str:
  hints = [f"{n}={env[n]}" for n in ("MEGASCALE_COORDINATOR_ADDRESS",
                                      "MEGASCALE_NUM_SLICES",
                                      "MEGASCALE_SLICE_ID", "TPU_WORKER_ID",
                                      "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
           if env.get(n)]
  return ", ".join(hints) or "Cloud TPU metadata"


def _initialize_with_deadline(kwargs: dict, timeout: int, who: str,
                              log: Callable[[str], None]) -> None:
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
          **kwargs,
          initialization_timeout=timeout + _JAX_DEADLINE_MARGIN_S)
    except BaseException as e:  # noqa: BLE001  (re-raised on the caller)
      errors.append(e)

  thread = threading.Thread(target=connect, name="jax-distributed-init",
                            daemon=True)
  start = time.monotonic()
  thread.start()
  while thread.is_alive():
    left = timeout - (time.monotonic() - start)
    if left <= 0:
      break
    thread.join(min(left, _REMIND_EVERY_S))
    if thread.is_alive() and time.monotonic() - start < timeout:
      log(f"jax.distributed: still waiting after "
          f"{time.monotonic() - start:.0f} s ({who})")
  if errors:
    raise errors[0]
  if thread.is_alive():
    _exit_quickly_at_interpreter_exit()
    raise TrainingStopped(
        f"jax.distributed: not every process connected within {timeout} s "
        f"({who}); start the same command on every host, check that they "
        f"reach the coordinator's port, or raise {INIT_TIMEOUT_ENV}")


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


def initialize_runtime(cfg: RuntimeConfig = RuntimeConfig(),
                       log: Callable[[str], None] | None = None) -> None:
  """Starts Pathways (cfg.pathways) or jax.distributed; call before any
  device work."""
  if not cfg.pathways:
    initialize_distributed(log)
    return
  try:
    import pathwaysutils
  except ImportError:
    raise ConfigError("runtime.pathways is true but the 'pathwaysutils' "
                      "package is not installed: pip install pathwaysutils "
                      "(or set runtime.pathways: false)") from None
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if "proxy" not in platforms:
    raise ConfigError(
        f"runtime.pathways is true but JAX_PLATFORMS={platforms!r} does not "
        f"name the Pathways 'proxy' backend: run under Pathways (`gemma-jax "
        f"launch gke --pathways` renders the workload) with "
        f"JAX_PLATFORMS=proxy and JAX_BACKEND_TARGET=grpc://HEAD:29000")
  pathwaysutils.initialize()
  (log or _stderr)(f"pathways: single controller via "
                   f"{os.environ.get('JAX_BACKEND_TARGET', 'the proxy')}")


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
