"""One trainer per workdir: the lease file WORKDIR/LOCK."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from gemma_jax.checkpoint.lease import LeaseLost, WorkdirBusy, WorkdirLease
from gemma_jax.train.metrics import MetricsWriter


def _write(workdir, **fields):
  holder = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "token": "t0",
    "command": "train",
    "started": time.time(),
    "heartbeat": time.time(),
    **fields,
  }
  (workdir / "LOCK").write_text(json.dumps(holder))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_second_lease_is_refused_naming_the_holder(tmp_path):
  first = WorkdirLease(tmp_path, heartbeat_s=60)
  first.acquire()
  holder = json.loads((tmp_path / "LOCK").read_text())
  assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  with pytest.raises(
    WorkdirBusy,
    match=rf"in use by another trainer \(pid "
    rf"{os.getpid()} on {socket.gethostname()}",
  ):
    WorkdirLease(tmp_path, heartbeat_s=60).acquire()
  first.release()
  assert not (tmp_path / "LOCK").exists()
  second = WorkdirLease(tmp_path, heartbeat_s=60)
  second.acquire()  # free again
  second.release()


def test_of_many_starting_together_exactly_one_wins(tmp_path):
  results = []

  def start():
    lease = WorkdirLease(tmp_path, heartbeat_s=60)
    try:
      lease.acquire()
      results.append(lease)
    except WorkdirBusy:
      results.append(None)

  threads = [threading.Thread(target=start) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [r for r in results if r is not None]
  assert len(winners) == 1 and len(results) == 8
  winners[0].release()


@pytest.mark.parametrize(
  "stale",
  [
    dict(pid="dead"),  # killed on this host
    dict(host="elsewhere", heartbeat=time.time() - 3600),  # silent too long
    "torn",  # half-written file
  ],
)
def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, stale):
  if stale == "torn":
    (tmp_path / "LOCK").write_text('{"host": "a", "pi')
  else:
    if stale.get("pid") == "dead":
      stale = dict(stale, pid=_dead_pid())
    _write(tmp_path, **stale)
  warnings = []
  lease = WorkdirLease(tmp_path, heartbeat_s=60, warn=warnings.append)
  lease.acquire()
  assert json.loads((tmp_path / "LOCK").read_text())["token"] == lease.token
  assert len(warnings) == 1 and "took over the stale lease" in warnings[0]
  assert not list(tmp_path.glob(".LOCK.takeover-*"))
  lease.release()


def test_a_live_lease_on_another_host_blocks(tmp_path):
  _write(tmp_path, host="other-host", pid=1)
  with pytest.raises(WorkdirBusy, match="pid 1 on other-host, heartbeat 0 s"):
    WorkdirLease(tmp_path, heartbeat_s=60).acquire()
  assert json.loads((tmp_path / "LOCK").read_text())["token"] == "t0"


def test_heartbeat_refreshes_and_a_takeover_stops_every_writer(tmp_path):
  lease = WorkdirLease(tmp_path, heartbeat_s=0.05)
  lease.acquire()
  first = json.loads((tmp_path / "LOCK").read_text())["heartbeat"]
  deadline = time.time() + 5
  while json.loads((tmp_path / "LOCK").read_text())["heartbeat"] == first:
    assert time.time() < deadline, "no heartbeat"
    time.sleep(0.02)
  writer = MetricsWriter(
    str(tmp_path),
    tensorboard=False,
    guard=lambda what: lease.check(what, force=True),
  )
  writer.write({"step": 1, "loss": 2.0})
  # Another trainer took the workdir over (say, this one hung too long).
  _write(tmp_path, host="other-host", token="theirs")
  with pytest.raises(
    LeaseLost,
    match="not writing the metrics.jsonl: the "
    "lease .* is now held by pid .* on other-host",
  ):
    writer.write({"step": 2, "loss": 2.0})
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1]
  lease.release()  # leaves the other trainer's lease alone
  assert json.loads((tmp_path / "LOCK").read_text())["token"] == "theirs"


def test_timeouts_come_from_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("GEMMA_JAX_LEASE_HEARTBEAT_S", "2")
  lease = WorkdirLease(tmp_path)
  assert (lease.heartbeat_s, lease.timeout_s) == (2.0, 8.0)
  monkeypatch.setenv("GEMMA_JAX_LEASE_TIMEOUT_S", "soon")
  with pytest.raises(ValueError, match="GEMMA_JAX_LEASE_TIMEOUT_S='soon'"):
    WorkdirLease(tmp_path)


def test_a_live_process_on_this_host_blocks_until_it_is_gone(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write(tmp_path, pid=proc.pid)
    with pytest.raises(WorkdirBusy, match=f"pid {proc.pid} on "):
      WorkdirLease(tmp_path, heartbeat_s=60).acquire()
  finally:
    proc.kill()
    proc.wait()
  lease = WorkdirLease(tmp_path, heartbeat_s=60, warn=lambda m: None)
  lease.acquire()  # killed: its lease no longer blocks a restart
  lease.release()


@pytest.mark.slow
def test_on_gs_one_of_several_wins_and_a_dead_holder_is_taken_over(gcs_bucket):
  """An object store has no exclusive create: the lease is written, read
  back after a pause, and kept only by the writer that finds its token."""
  from etils import epath

  workdir = epath.Path(f"{gcs_bucket}/run")
  results = []

  def start():
    lease = WorkdirLease(workdir, heartbeat_s=60)
    try:
      lease.acquire()
      results.append(lease)
    except WorkdirBusy:
      results.append(None)

  threads = [threading.Thread(target=start) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [r for r in results if r is not None]
  assert len(winners) == 1 and len(results) == 4
  holder = json.loads((workdir / "LOCK").read_text())
  assert holder["token"] == winners[0].token
  winners[0].release()
  assert not (workdir / "LOCK").exists()

  (workdir / "LOCK").write_text(
    json.dumps(dict(holder, pid=_dead_pid(), token="t0"))
  )
  warnings = []
  lease = WorkdirLease(workdir, heartbeat_s=60, warn=warnings.append)
  lease.acquire()
  assert "took over the stale lease" in warnings[0]
  lease.check(force=True)  # still ours on read-back
  lease.release()
