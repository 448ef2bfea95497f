"""Keeps a run going on spot (or any) capacity until it finishes.

    watch(target, start, run)     # start: ships the code and starts training

A loop over the queued resource's state, polled every `poll_s`:

  ACTIVE, training not started on this allocation -> start it (or adopt a
                                                     run already going)
  ACTIVE, training exited 0                       -> done
  ACTIVE, exited 2 (a config error)               -> stop: rerunning won't help
  ACTIVE, exited otherwise or was terminated      -> start it again (retry)
  waiting states (WAITING_FOR_RESOURCES, PROVISIONING, ...) -> keep polling
  FAILED, SUSPENDED (preempted), or gone          -> delete, wait, re-create
                                                     (retry)

Retries (re-queues and restarts together) are bounded by `max_retries`,
with a backoff that doubles from `backoff_s` up to `max_backoff_s`. The
trainer resumes from the last checkpoint in the workdir, so every restart
continues the run. Each event is one line with a UTC timestamp.
"""

import dataclasses
import time
from collections.abc import Callable

from gemma_jax.errors import TrainingStopped
from gemma_jax.launch import tpu
from gemma_jax.launch.gcloud import GcloudError, Runner, check


@dataclasses.dataclass(frozen=True)
class WatchPolicy:
  poll_s: float = 60.0
  max_retries: int = 5
  backoff_s: float = 60.0
  max_backoff_s: float = 1800.0

  def backoff(self, retry: int) -> float:
    return min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)


def _stamp(now: float) -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def watch(
  t: tpu.Target,
  start: Callable[[], None],
  run: Runner,
  policy: WatchPolicy = WatchPolicy(),
  sleep: Callable[[float], None] = time.sleep,
  now: Callable[[], float] = time.time,
  print_line: Callable[[str], None] = print,
) -> int:
  """Runs the loop above; returns 0 when training finished, raises
  TrainingStopped when retries run out or the config is wrong."""

  def log(message):
    print_line(f"{_stamp(now())} watch {t.name}: {message}")

  retries = 0
  started = False
  last_state = None

  def retry(reason: str) -> float:
    nonlocal retries
    retries += 1
    if retries > policy.max_retries:
      log(f"{reason}; giving up after {policy.max_retries} retries")
      raise TrainingStopped(
        f"watch {t.name}: {reason}; gave up after {policy.max_retries} retries"
      )
    wait = policy.backoff(retries)
    log(f"{reason}; retry {retries}/{policy.max_retries} in {wait:.0f} s")
    return wait

  log(
    f"watching {t.slices} x {t.tpu_slice.short_name} in {t.zone} "
    f"(poll every {policy.poll_s:.0f} s)"
  )
  while True:
    state = tpu.state(t, run)
    if state != last_state:
      log(f"queued resource is {state}")
      last_state = state
    if state == "ACTIVE":
      status = tpu.training_status(t, run)
      if not started and status == "running":
        log("training is already running; watching it")
        started = True
      elif not started:
        log("starting training")
        start()
        started = True
      else:
        if status == "0":
          log("training finished (exit 0)")
          return 0
        if status == "2":
          log("training exited 2 (a config or usage error); not retrying")
          raise TrainingStopped(
            f"watch {t.name}: training exited 2 (a config error): see its log"
          )
        if status not in ("running", "unknown"):
          sleep(retry(f"training ended ({status}) on an active allocation"))
          started = False
          continue
    elif state in tpu.LOST or state == tpu.MISSING:
      what = {
        "SUSPENDED": "preempted (SUSPENDED)",
        "FAILED": "FAILED",
        tpu.MISSING: "gone",
      }[state]
      wait = retry(f"queued resource {what}")
      if state != tpu.MISSING:
        log("deleting it")
        argv = tpu.delete_command(t)
        check(run(argv), argv)
      sleep(wait)
      log("re-creating it")
      argv = tpu.create_command(t)
      check(run(argv), argv)
      started = False
      last_state = None
      continue
    elif state not in tpu.WAITING:
      raise GcloudError(
        f"watch {t.name}: unexpected queued resource state {state!r}"
      )
    sleep(policy.poll_s)
