"""`watch` on spot capacity, driven by a fake gcloud that answers from a
script of queued-resource states and training statuses: the exact commands,
the waits, and the timestamped event lines."""

import pathlib
import shlex

import pytest

from gemma_jax.errors import TrainingStopped
from gemma_jax.launch import tpu as tpu_lib
from gemma_jax.launch.gcloud import Result
from gemma_jax.launch.slices import parse_tpu
from gemma_jax.launch.watch import WatchPolicy, watch

ROOT = pathlib.Path(__file__).parents[2]
CONFIG = str(ROOT / "configs/pods/gemma-7b-v5e.yaml")
QR = "gcloud compute tpus queued-resources"
DESCRIBE = f"{QR} describe g7b --zone=z '--format=value(state.state)'"
DELETE = f"{QR} delete g7b --zone=z --force --quiet"
CREATE = (f"{QR} create g7b --node-id=g7b --accelerator-type=v5litepod-256 "
          f"--runtime-version=v2-alpha-tpuv5-lite --zone=z --spot")
STATUS = ("gcloud compute tpus tpu-vm ssh g7b --worker=0 --zone=z "
          + shlex.quote("--command=" + tpu_lib.REMOTE_EXIT))


class FakeCloud:
  """Answers describe from `states` and worker 0's status from `statuses`;
  every other command succeeds. Records each command line."""

  def __init__(self, states, statuses):
    self.states, self.statuses = list(states), list(statuses)
    self.calls = []

  def __call__(self, argv, capture=False):
    line = shlex.join(argv)
    self.calls.append(line)
    if line == DESCRIBE:
      state = self.states.pop(0)
      if state == "NOT_FOUND":
        return Result(1, "", "ERROR: (gcloud) NOT_FOUND: g7b")
      return Result(0, state + "\n")
    if line == STATUS:
      return Result(0, self.statuses.pop(0) + "\n")
    return Result(0)


def _target():
  return tpu_lib.Target("g7b", "z", parse_tpu("v5e:16x16"), capacity="spot")


def _start(cloud, tmp_path):
  def start():
    tpu_lib.ship_and_start(_target(), CONFIG, "gs://b/r", [], cloud,
                           str(tmp_path), log=lambda _: None)
  archive = f"{tmp_path}/code.tar.gz"
  remote = tpu_lib.remote_start(0, "gemma-7b-v5e.yaml", "gs://b/r", [])
  commands = [
      f"git -C {ROOT} stash create",
      f"git -C {ROOT} archive --format=tar.gz -o {archive} --prefix=.launch/ "
      f"--add-file={CONFIG} --prefix= HEAD",
      f"gcloud compute tpus tpu-vm scp {archive} g7b:gemma_jax.tar.gz "
      f"--worker=all --zone=z",
      "gcloud compute tpus tpu-vm ssh g7b --worker=all --zone=z "
      + shlex.quote("--command=" + remote)]
  return start, commands


POLICY = WatchPolicy(poll_s=30, max_retries=3, backoff_s=100,
                     max_backoff_s=250)


def _watch(cloud, tmp_path, lines, sleeps):
  start, _ = _start(cloud, tmp_path)
  clock = iter(range(0, 10_000, 7))
  return watch(_target(), start, cloud, POLICY, sleep=sleeps.append,
               now=lambda: next(clock), print_line=lines.append)


def test_preempted_run_is_requeued_and_resumed(tmp_path):
  cloud = FakeCloud(
      states=["WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "SUSPENDED",
              "PROVISIONING", "ACTIVE", "ACTIVE"],
      statuses=["none", "running", "none", "0"])
  lines, sleeps = [], []
  assert _watch(cloud, tmp_path, lines, sleeps) == 0
  _, start = _start(cloud, tmp_path)
  assert cloud.calls == [
      DESCRIBE,                          # waiting
      DESCRIBE, STATUS, *start,          # active: start training
      DESCRIBE, STATUS,                  # running
      DESCRIBE, DELETE, CREATE,          # preempted: delete, re-queue
      DESCRIBE,                          # provisioning
      DESCRIBE, STATUS, *start,          # active again: start (resumes)
      DESCRIBE, STATUS,                  # exit 0: done
  ]
  assert sleeps == [30, 30, 30, 100, 30, 30]
  assert lines == [
      "1970-01-01T00:00:00Z watch g7b: watching 1 x v5litepod-256 in z "
      "(poll every 30 s)",
      "1970-01-01T00:00:07Z watch g7b: queued resource is "
      "WAITING_FOR_RESOURCES",
      "1970-01-01T00:00:14Z watch g7b: queued resource is ACTIVE",
      "1970-01-01T00:00:21Z watch g7b: starting training",
      "1970-01-01T00:00:28Z watch g7b: queued resource is SUSPENDED",
      "1970-01-01T00:00:35Z watch g7b: queued resource preempted "
      "(SUSPENDED); retry 1/3 in 100 s",
      "1970-01-01T00:00:42Z watch g7b: deleting it",
      "1970-01-01T00:00:49Z watch g7b: re-creating it",
      "1970-01-01T00:00:56Z watch g7b: queued resource is PROVISIONING",
      "1970-01-01T00:01:03Z watch g7b: queued resource is ACTIVE",
      "1970-01-01T00:01:10Z watch g7b: starting training",
      "1970-01-01T00:01:17Z watch g7b: training finished (exit 0)",
  ]


def test_retries_are_bounded_with_doubling_backoff(tmp_path):
  cloud = FakeCloud(states=["FAILED", "FAILED", "NOT_FOUND", "FAILED"],
                    statuses=[])
  lines, sleeps = [], []
  with pytest.raises(TrainingStopped, match="gave up after 3 retries"):
    _watch(cloud, tmp_path, lines, sleeps)
  assert cloud.calls == [DESCRIBE, DELETE, CREATE,
                         DESCRIBE, DELETE, CREATE,
                         DESCRIBE, CREATE,          # gone: nothing to delete
                         DESCRIBE]
  assert sleeps == [100, 200, 250]                  # doubling, capped
  assert lines[-1].endswith("queued resource FAILED; giving up after 3 "
                            "retries")


def test_a_crash_restarts_on_the_same_allocation_but_a_config_error_stops(
    tmp_path):
  cloud = FakeCloud(states=["ACTIVE"] * 4,
                    statuses=["running", "1", "none", "2"])
  lines, sleeps = [], []
  with pytest.raises(TrainingStopped, match="training exited 2"):
    _watch(cloud, tmp_path, lines, sleeps)
  _, start = _start(cloud, tmp_path)
  assert cloud.calls == [DESCRIBE, STATUS,            # adopts a running job
                         DESCRIBE, STATUS,            # it crashed: retry
                         DESCRIBE, STATUS, *start,    # restart (resumes)
                         DESCRIBE, STATUS]            # exit 2: stop
  assert sleeps == [30, 100, 30]
  assert "training is already running; watching it" in lines[2]
  assert lines[3].endswith("training ended (1) on an active allocation; "
                           "retry 1/3 in 100 s")
