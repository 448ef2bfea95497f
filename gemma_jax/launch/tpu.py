"""Cloud TPU VMs through queued resources: create, ship and start, inspect.

A launch target is one queued resource (QR) named NAME. One slice: its TPU
VM node is also NAME (`--node-id`). N slices (multislice): the QR makes N
nodes NAME-0 ... NAME-(N-1) (`--node-count`, `--node-prefix`) that the TPU
runtime joins into one job over the data-centre network: it writes
MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID
into every VM's `tpu-env` metadata, where JAX and libtpu read them.

gcloud syntax, from the reference pages under
https://cloud.google.com/sdk/gcloud/reference/compute/tpus/:
  queued-resources/create
  (QUEUED_RESOURCE --zone --runtime-version
   (--accelerator-type | --type --topology)
   (--node-id | --node-count --node-prefix) [--spot] [--reserved]),
  .../queued-resources/describe, .../queued-resources/delete (--force
  deletes the nodes first), .../tpu-vm/scp and .../tpu-vm/ssh (--worker=all
  | N, --command). Node ids of a multislice QR: "np-0", "np-1", ... for
  node_id_prefix "np" (QueuedResource.Tpu.NodeSpec.MultisliceParams, TPU
  API v2). States: https://cloud.google.com/tpu/docs/queued-resources.

On every worker host (`run`): the code (this git checkout, uncommitted
edits of tracked files included, plus the run config as .launch/CONFIG) is
unpacked into ~/gemma_jax, and launch/tpu_worker.sh starts `gemma-jax train`
there, one JAX process per host, with JAX_PLATFORMS=tpu and
GEMMA_JAX_DISTRIBUTED=1; it keeps ~/gemma_jax_run/{train.log, exit_code}
and copies the log to WORKDIR/logs/ every few minutes and at the end.
"""

import dataclasses
import os
import pathlib
import shlex
from collections.abc import Callable
from typing import Literal

from gemma_jax.errors import ConfigError
from gemma_jax.launch.gcloud import Runner, check, gcloud
from gemma_jax.launch.slices import TpuSlice

Capacity = Literal["on-demand", "spot", "reserved"]
REMOTE_CODE = "~/gemma_jax"
REMOTE_RUN = "~/gemma_jax_run"
REMOTE_ARCHIVE = "~/gemma_jax.tar.gz"
# The environment of every training process (tpu_worker.sh adds the slice
# and worker ids). JAX_PLATFORMS=tpu: launch/setup.sh defaults to the CPU.
TRAIN_ENV = (
  ("JAX_PLATFORMS", "tpu"),
  ("GEMMA_JAX_DISTRIBUTED", "1"),
  ("GEMMA_JAX_EXTRAS", "tpu"),
)

# Queued-resource states (TPU API v2 QueuedResourceState.State).
WAITING = (
  "CREATING",
  "ACCEPTED",
  "WAITING_FOR_RESOURCES",
  "PROVISIONING",
  "DELETING",
  "SUSPENDING",
)
LOST = ("FAILED", "SUSPENDED")
MISSING = "NOT_FOUND"


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a run lives: a queued resource of `slices` slices of `tpu`."""

  name: str
  zone: str
  tpu: TpuSlice | None  # None: commands that need no slice shape
  slices: int = 1
  project: str | None = None
  capacity: Capacity = "on-demand"

  def __post_init__(self):
    if (
      not self.name
      or not all(c.isalnum() or c == "-" for c in self.name)
      or not self.name[0].isalpha()
    ):
      raise ConfigError(
        f"--name {self.name!r}: use letters, digits and '-', "
        f"starting with a letter"
      )
    if self.slices < 1:
      raise ConfigError(f"--slices must be >= 1, got {self.slices}")

  @property
  def tpu_slice(self) -> TpuSlice:
    """`tpu`, for the commands that create or start on the slice."""
    if self.tpu is None:  # their CLI parses --tpu into a TpuSlice first
      raise ConfigError(
        f"--name {self.name}: this command needs the slice "
        f"shape: --tpu GENERATION:SHAPE, e.g. v5e:16x16"
      )
    return self.tpu

  @property
  def nodes(self) -> list[str]:
    """TPU VM node ids, one per slice."""
    if self.slices == 1:
      return [self.name]
    return [f"{self.name}-{i}" for i in range(self.slices)]

  @property
  def where(self) -> dict:
    return dict(zone=self.zone, project=self.project)


# --- gcloud commands --------------------------------------------------------


def create_command(t: Target) -> list[str]:
  nodes = (
    dict(node_id=t.name)
    if t.slices == 1
    else dict(node_count=t.slices, node_prefix=t.name)
  )
  return gcloud(
    "compute tpus queued-resources create",
    t.name,
    **nodes,
    **t.tpu_slice.gcloud_shape,
    runtime_version=t.tpu_slice.runtime_version,
    **t.where,
    spot=t.capacity == "spot",
    reserved=t.capacity == "reserved",
  )


def describe_command(t: Target) -> list[str]:
  return gcloud(
    "compute tpus queued-resources describe",
    t.name,
    **t.where,
    format="value(state.state)",
  )


def delete_command(t: Target) -> list[str]:
  # --force deletes the TPU VMs first; --quiet skips the prompt.
  return gcloud(
    "compute tpus queued-resources delete",
    t.name,
    **t.where,
    force=True,
    quiet=True,
  )


def scp_command(t: Target, source: str, dest: str, worker="all") -> list[str]:
  """Copies to or from the TPU named in `source` or `dest` (NODE:PATH)."""
  return gcloud(
    "compute tpus tpu-vm scp", source, dest, worker=worker, **t.where
  )


def ssh_command(t: Target, node: str, command: str, worker="all") -> list[str]:
  return gcloud(
    "compute tpus tpu-vm ssh", node, worker=worker, **t.where, command=command
  )


def workers_command(t: Target, node: str) -> list[str]:
  """One line per worker VM of `node` (its internal IP)."""
  return gcloud(
    "compute tpus tpu-vm describe",
    node,
    **t.where,
    flatten="networkEndpoints[]",
    format="csv[no-heading](networkEndpoints.ipAddress)",
  )


# --- the commands run on the workers -----------------------------------------


def remote_start(
  slice_index: int, config_name: str, workdir: str, train_args: list[str]
) -> str:
  """Shell run on every worker of one slice: unpack, start in background."""
  env = " ".join(f"{k}={v}" for k, v in TRAIN_ENV)
  train = shlex.join(
    [f".launch/{config_name}", "--workdir", workdir, *train_args]
  )
  return (
    f"set -e; mkdir -p {REMOTE_CODE} {REMOTE_RUN}; "
    # The previous checkout goes, its .venv stays (setup.sh reinstalls
    # only when pyproject.toml changed).
    f"find {REMOTE_CODE} -mindepth 1 -maxdepth 1 ! -name .venv "
    f"-exec rm -rf {{}} +; "
    f"tar xzf {REMOTE_ARCHIVE} -C {REMOTE_CODE}; cd {REMOTE_CODE}; "
    f"{env} nohup bash launch/tpu_worker.sh {slice_index} {train} "
    f"> /dev/null 2>&1 < /dev/null &"
  )


# Worker 0's training: its exit code file, else `running` while
# tpu_worker.sh lives, else `none` (never started here).
REMOTE_EXIT = (
  f"cat {REMOTE_RUN}/exit_code 2>/dev/null || "
  f"(test -f {REMOTE_RUN}/worker.pid && echo running) || "
  f"echo none"
)
REMOTE_STOP = (
  f"test -f {REMOTE_RUN}/worker.pid && "
  f"kill -TERM $(cat {REMOTE_RUN}/worker.pid) || true"
)


def repo_root() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parents[2]


def ship_and_start(
  t: Target,
  config: str,
  workdir: str,
  train_args: list[str],
  run: Runner,
  log_dir: str,
  log: Callable[[str], None] = print,
) -> None:
  """Packs this checkout with the config, copies it to every worker of every
  slice, and starts training there (background; see launch/tpu_worker.sh)."""
  if not os.path.isfile(config):
    raise ConfigError(f"config file not found: {config}")
  root = str(repo_root())
  archive = os.path.abspath(os.path.join(log_dir, "code.tar.gz"))
  # `git stash create` makes a commit of the working tree's tracked files
  # without touching it (nothing to stash: empty output, ship HEAD).
  stash = run(["git", "-C", root, "stash", "create"], capture=True)
  tree = (stash.stdout.strip() or "HEAD") if stash.ok else "HEAD"
  argv = [
    "git",
    "-C",
    root,
    "archive",
    "--format=tar.gz",
    "-o",
    archive,
    "--prefix=.launch/",
    f"--add-file={os.path.abspath(config)}",
    "--prefix=",
    tree,
  ]
  check(run(argv), argv)
  for node in t.nodes:
    # scp's remote paths are relative to the home directory.
    argv = scp_command(t, archive, f"{node}:{REMOTE_ARCHIVE[2:]}")
    check(run(argv), argv)
  for i, node in enumerate(t.nodes):
    argv = ssh_command(
      t, node, remote_start(i, os.path.basename(config), workdir, train_args)
    )
    check(run(argv), argv)
  log(
    f"started on {t.slices} slice(s) of {t.tpu_slice.short_name}: "
    f"{', '.join(t.nodes)}; logs: gemma-jax launch logs --name {t.name} "
    f"--zone {t.zone} --tpu {t.tpu} --slices {t.slices}"
  )


def state(t: Target, run: Runner) -> str:
  """The QR's state, NOT_FOUND when it does not exist; GcloudError for any
  other failure."""
  argv = describe_command(t)
  result = run(argv, capture=True)
  if not result.ok and "NOT_FOUND" in (result.stderr + result.stdout):
    return MISSING
  check(result, argv)
  return result.stdout.strip() or "STATE_UNSPECIFIED"


def training_status(t: Target, run: Runner) -> str:
  """'running', 'none' (not started on these VMs), 'terminated' (SIGTERM:
  stopped or preempted), 'setup-failed', an exit code as text, or 'unknown'
  when worker 0 cannot be asked."""
  result = run(ssh_command(t, t.nodes[0], REMOTE_EXIT, worker=0), capture=True)
  lines = result.stdout.strip().splitlines()
  return lines[-1].strip() if result.ok and lines else "unknown"


def fetch_logs(t: Target, run: Runner, log_dir: str) -> list[str]:
  """Copies every worker's train.log to log_dir/slice-S-worker-W.log."""
  paths = []
  for s, node in enumerate(t.nodes):
    argv = workers_command(t, node)
    workers = check(run(argv, capture=True), argv).stdout.split()
    for w in range(max(len(workers), 1)):
      path = os.path.join(log_dir, f"slice-{s}-worker-{w}.log")
      argv = scp_command(
        t, f"{node}:{REMOTE_RUN[2:]}/train.log", path, worker=w
      )
      check(run(argv), argv)
      paths.append(path)
  return paths
