"""Starting the runtime: checked JAX_* variables, a bounded wait for the other
processes that says whom it waits for, and the Pathways switch."""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import types

import pytest

from gemma_jax import distributed
from gemma_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).parents[1]


def _env(**values):
  return {k: str(v) for k, v in values.items()}


@pytest.mark.parametrize(
  "env, message",
  [
    (
      _env(
        JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="two", JAX_PROCESS_ID=0
      ),
      "JAX_NUM_PROCESSES='two': expected an integer >= 1",
    ),
    (
      _env(
        JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=-1
      ),
      "JAX_PROCESS_ID='-1': expected an integer >= 0",
    ),
    (
      _env(
        JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=2
      ),
      "JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2",
    ),
    (
      _env(JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=0),
      "JAX_COORDINATOR_ADDRESS is not set",
    ),
    (
      _env(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES=2),
      "JAX_PROCESS_ID is not set",
    ),
    (
      _env(
        JAX_COORDINATOR_ADDRESS="10.0.0.2",
        JAX_NUM_PROCESSES=2,
        JAX_PROCESS_ID=1,
      ),
      "JAX_COORDINATOR_ADDRESS='10.0.0.2': expected HOST:PORT",
    ),
  ],
)
def test_bad_process_variables_name_the_variable(env, message):
  with pytest.raises(
    ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
  ):
    distributed.initialize_distributed(env=env)


def test_process_variables_parse():
  got = distributed.explicit_processes(
    _env(
      JAX_COORDINATOR_ADDRESS="10.0.0.2:8476",
      JAX_NUM_PROCESSES=4,
      JAX_PROCESS_ID=3,
    )
  )
  assert (got.coordinator, got.num_processes, got.process_id) == (
    "10.0.0.2:8476",
    4,
    3,
  )
  # No variables, or only a coordinator hint for a detected cluster.
  assert distributed.explicit_processes({}) is None
  assert (
    distributed.explicit_processes(_env(JAX_COORDINATOR_ADDRESS="h:1")) is None
  )


def test_cluster_detection_and_timeout_variables():
  assert not distributed.detected_cluster({})
  assert distributed.detected_cluster(_env(GEMMA_JAX_DISTRIBUTED=1))
  assert distributed.detected_cluster(_env(TPU_WORKER_HOSTNAMES="a,b"))
  assert not distributed.detected_cluster(_env(TPU_WORKER_HOSTNAMES="a"))
  assert distributed.detected_cluster(_env(SLURM_NTASKS=4))
  assert distributed.init_timeout_s({}) == 300
  assert distributed.init_timeout_s(_env(GEMMA_JAX_INIT_TIMEOUT_S=45)) == 45
  with pytest.raises(ConfigError, match="GEMMA_JAX_INIT_TIMEOUT_S='soon'"):
    distributed.init_timeout_s(_env(GEMMA_JAX_INIT_TIMEOUT_S="soon"))
  assert distributed.heartbeat_timeout_s({}) == 60
  assert (
    distributed.heartbeat_timeout_s(_env(GEMMA_JAX_HEARTBEAT_TIMEOUT_S=8)) == 8
  )
  with pytest.raises(ConfigError, match="GEMMA_JAX_HEARTBEAT_TIMEOUT_S='0'"):
    distributed.heartbeat_timeout_s(_env(GEMMA_JAX_HEARTBEAT_TIMEOUT_S=0))


def test_one_process_needs_no_distributed_runtime():
  lines = []
  distributed.initialize_distributed(
    lines.append,
    env=_env(
      JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES=1, JAX_PROCESS_ID=0
    ),
  )
  distributed.initialize_distributed(lines.append, env={})
  assert lines == []


_ONE_OF_TWO = """
import sys
from gemma_jax import distributed
from gemma_jax.errors import GemmaJaxError
try:
  distributed.initialize_distributed()
except GemmaJaxError as e:   # as the CLI prints it
  print(f"gemma-jax train: error: {e}", file=sys.stderr)
  sys.exit(e.exit_code)
"""


@pytest.mark.multiprocess
def test_a_missing_process_ends_the_wait_with_one_line(tmp_path):
  """2 processes configured, only process 0 started: it says whom it waits
  for, then stops after GEMMA_JAX_INIT_TIMEOUT_S with one line, exit 1, and
  no C++ abort."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(
    os.environ,
    PYTHONPATH=str(ROOT),
    JAX_PLATFORMS="cpu",
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    JAX_NUM_PROCESSES="2",
    JAX_PROCESS_ID="0",
    GEMMA_JAX_INIT_TIMEOUT_S="3",
  )
  env.pop("XLA_FLAGS", None)
  start = time.monotonic()
  out = subprocess.run(
    [sys.executable, "-c", _ONE_OF_TWO],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  elapsed = time.monotonic() - start
  assert out.returncode == 1, out.stderr
  assert elapsed < 3 + 10, elapsed  # 3 s wait + imports
  who = f"process 0 of 2, coordinator 127.0.0.1:{port}"
  lines = out.stderr.strip().splitlines()
  assert lines[0] == (
    f"jax.distributed: {who}: waiting up to 3 s for every "
    f"process to connect (GEMMA_JAX_INIT_TIMEOUT_S)"
  )
  assert lines[-1] == (
    f"gemma-jax train: error: jax.distributed: not every process connected "
    f"within 3 s ({who}); start the same command on every host, check that "
    f"they reach the coordinator's port, or raise GEMMA_JAX_INIT_TIMEOUT_S"
  )
  assert "another task died" not in out.stderr
  assert "stack trace" not in out.stderr


def test_pathways_needs_its_package_and_the_proxy_backend(monkeypatch):
  monkeypatch.setitem(sys.modules, "pathwaysutils", None)  # not installed
  with pytest.raises(
    ConfigError,
    match="'pathwaysutils' package is not installed: pip install pathwaysutils",
  ):
    distributed.initialize_runtime(distributed.RuntimeConfig(pathways=True))

  calls = []
  fake = types.ModuleType("pathwaysutils")
  fake.initialize = lambda: calls.append("initialize")
  monkeypatch.setitem(sys.modules, "pathwaysutils", fake)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  with pytest.raises(
    ConfigError,
    match="JAX_PLATFORMS='cpu' does not name the Pathways 'proxy' backend",
  ):
    distributed.initialize_runtime(distributed.RuntimeConfig(pathways=True))
  assert calls == []
  monkeypatch.setenv("JAX_PLATFORMS", "proxy")
  monkeypatch.setenv("JAX_BACKEND_TARGET", "grpc://head:29000")
  lines = []
  distributed.initialize_runtime(
    distributed.RuntimeConfig(pathways=True), lines.append
  )
  assert calls == ["initialize"]
  assert lines == ["pathways: single controller via grpc://head:29000"]


class _Store:
  """The coordination service's key-value store, as the watchdog uses it;
  `down` makes every call fail (the coordinator is gone)."""

  def __init__(self):
    self.values, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Socket closed")
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError("UNAVAILABLE: Socket closed")
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _watch(store, me, n, timeout_s=0.5):
  lost = []
  dog = distributed.PeerWatchdog(store, me, n, timeout_s, lost=lost.append)
  dog.start()
  return dog, lost


def _wait(condition, seconds=10):
  deadline = time.monotonic() + seconds
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.02)


def test_a_silent_process_is_named_lost_and_one_that_ended_is_not(monkeypatch):
  monkeypatch.setattr("jax.process_count", lambda: 3)
  store = _Store()
  dogs = [_watch(store, i, 3) for i in range(3)]
  time.sleep(1.0)  # two timeouts: nobody is lost
  assert [lost for _, lost in dogs] == [[], [], []]
  dogs[2][0].done()  # ends normally
  time.sleep(1.0)
  assert [lost for _, lost in dogs] == [[], [], []]
  dogs[1][0]._stop.set()  # silent from now on (hung, killed)
  _wait(lambda: dogs[0][1])
  assert len(dogs[0][1]) == 1
  assert re.match(
    r"jax\.distributed: process 1 was lost \(silent for "
    r"0\.5 s\); process \d of 3 stops too; rerun the same "
    r"command on every host",
    dogs[0][1][0],
  )
  dogs[0][0].done()


def test_a_coordinator_that_stops_answering_is_named(monkeypatch):
  monkeypatch.setattr("jax.process_count", lambda: 2)
  store = _Store()
  dog, lost = _watch(store, 1, 2)
  store.down = True
  _wait(lambda: lost)
  assert lost and lost[0].startswith(
    "jax.distributed: the coordinator (process 0) was lost (no answer "
    "for 0.5 s)"
  )
  dog.done()


def test_a_barrier_of_one_process_returns_at_once(monkeypatch):
  from jax.experimental import multihost_utils

  monkeypatch.setattr(
    multihost_utils,
    "sync_global_devices",
    lambda name: pytest.fail("a single process has no one to wait for"),
  )
  distributed.barrier("alone")
