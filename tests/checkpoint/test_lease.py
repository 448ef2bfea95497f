"""One trainer per workdir: the lease file WORKDIR/LOCK."""

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from gemma_jax.checkpoint import lease as lease_module
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
    hour_ago = time.time() - 3600  # a fresh one may still be being written
    os.utime(tmp_path / "LOCK", (hour_ago, hour_ago))
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


def test_a_torn_lease_still_being_written_blocks(tmp_path):
  """A half-written LOCK is a starter between creating and filling it (on a
  filesystem without hard links), not a dead holder: it is stale only once
  it has not changed for TORN_AFTER_S seconds."""
  (tmp_path / "LOCK").write_text('{"host": "a", "pi')
  with pytest.raises(WorkdirBusy, match="a torn, unreadable lease written 0 s"):
    WorkdirLease(tmp_path, heartbeat_s=60).acquire()
  assert (tmp_path / "LOCK").read_text() == '{"host": "a", "pi'
  aged = time.time() - lease_module.TORN_AFTER_S - 1
  os.utime(tmp_path / "LOCK", (aged, aged))
  lease = WorkdirLease(tmp_path, heartbeat_s=60, warn=lambda m: None)
  lease.acquire()
  lease.release()


def test_the_lease_appears_whole_or_not_at_all(tmp_path, monkeypatch):
  """Created by a hard link from a complete file: a reader racing the
  creator sees no lease or all of it; no temporary file stays behind."""
  seen = []
  link = os.link

  def look_then_link(src, dst):
    seen.append((tmp_path / "LOCK").exists())
    link(src, dst)

  monkeypatch.setattr(os, "link", look_then_link)
  lease = WorkdirLease(tmp_path, heartbeat_s=60)
  lease.acquire()
  assert seen == [False]  # not there before the link, complete after
  assert json.loads((tmp_path / "LOCK").read_text())["token"] == lease.token
  assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]
  lease.release()


def test_without_hard_links_the_lease_is_still_created_exclusively(
  tmp_path, monkeypatch
):
  def no_links(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted")

  monkeypatch.setattr(os, "link", no_links)
  first = WorkdirLease(tmp_path, heartbeat_s=60)
  first.acquire()
  with pytest.raises(WorkdirBusy, match="in use by another trainer"):
    WorkdirLease(tmp_path, heartbeat_s=60).acquire()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]
  first.release()


# A starter in its own process: for each round it waits for `go-R`, tries
# to take the lease of WORKDIR/R, reports, and holds a won lease until
# `done-R` (so that every other starter met it).
_STARTER = """
import os, sys, time
from etils import epath
from gemma_jax.checkpoint.lease import WorkdirBusy, WorkdirLease
sync, workdir, me, rounds = sys.argv[1:4] + [int(sys.argv[4])]
def wait_for(name):
  while not os.path.exists(os.path.join(sync, name)):
    time.sleep(0.001)
open(os.path.join(sync, "ready-" + me), "w").close()
for r in range(rounds):
  wait_for(f"go-{r}")
  (epath.Path(workdir) / str(r)).mkdir(parents=True, exist_ok=True)
  lease = WorkdirLease(epath.Path(workdir) / str(r), heartbeat_s=60)
  try:
    lease.acquire()
    result = "won"
  except WorkdirBusy:
    result = "busy"
  report = os.path.join(sync, f"{r}-{me}")
  with open(report + ".tmp", "w") as f:
    f.write(result)
  os.rename(report + ".tmp", report)
  wait_for(f"done-{r}")
  if result == "won":
    lease.release()
"""


def _race(sync, workdir, starters=8, rounds=4, timeout_s=300):
  """Winners per round of `starters` processes taking one lease together."""
  sync.mkdir()
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _STARTER, sync, str(workdir), str(i), str(rounds)]
    )
    for i in range(starters)
  ]
  deadline = time.monotonic() + timeout_s
  try:

    def wait_for(names):
      while not all((sync / n).exists() for n in names):
        for p in procs:
          assert p.poll() is None, f"a starter exited with {p.returncode}"
        assert time.monotonic() < deadline, f"starters stuck waiting {names}"
        time.sleep(0.01)

    wait_for([f"ready-{i}" for i in range(starters)])
    winners = []
    for r in range(rounds):
      (sync / f"go-{r}").touch()
      names = [f"{r}-{i}" for i in range(starters)]
      wait_for(names)
      winners.append(sum((sync / n).read_text() == "won" for n in names))
      (sync / f"done-{r}").touch()
    for p in procs:
      assert p.wait(timeout=max(1, deadline - time.monotonic())) == 0
    return winners
  finally:
    for p in procs:
      p.kill()
      p.wait()


@pytest.mark.slow
def test_of_many_processes_starting_together_exactly_one_wins(tmp_path):
  winners = _race(tmp_path / "sync", tmp_path / "run", starters=8, rounds=5)
  assert winners == [1] * 5


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
  """On Cloud Storage the lease is created with the precondition "no such
  object yet" (ifGenerationMatch=0) and taken over with "still the
  generation read": of several writers exactly one succeeds."""
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


@pytest.mark.slow
def test_on_gs_of_many_processes_starting_together_exactly_one_wins(
  gcs_bucket, tmp_path
):
  winners = _race(tmp_path / "sync", f"{gcs_bucket}/run", starters=8, rounds=3)
  assert winners == [1] * 3


@pytest.mark.slow
def test_on_gs_a_heartbeat_never_overwrites_a_lease_taken_over(gcs_bucket):
  """The refresh is conditional on the generation of our last write: one
  racing a takeover (between the heartbeat's check and its write) fails
  and the trainer stops instead of writing over the other lease."""
  from etils import epath

  workdir = epath.Path(f"{gcs_bucket}/run")
  lease = WorkdirLease(workdir, heartbeat_s=60)
  lease.acquire()
  theirs = json.dumps({"host": "other-host", "pid": 1, "token": "theirs"})
  (workdir / "LOCK").write_text(theirs)
  assert not lease._store.refresh(lease._record())
  assert (workdir / "LOCK").read_text() == theirs
  with pytest.raises(LeaseLost, match="now held by pid 1 on other-host"):
    lease.check(force=True)
  lease.release()  # leaves the other trainer's lease alone
  assert (workdir / "LOCK").read_text() == theirs
