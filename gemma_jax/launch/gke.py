"""GKE: the same run as an xpk workload or a JobSet manifest.

    w = Workload("g7b", tpu=parse_tpu("v5e:16x16"), slices=2, image=...,
                 config="configs/pods/gemma-7b-v5e.yaml",
                 workdir="gs://bucket/runs/g7b")
    xpk_command(w, cluster="my-cluster")   # xpk workload create ...
    jobset(w)                               # a dict; yaml.safe_dump it

Multi-controller (default): a JobSet with one replicated job `slice` of
`slices` replicas; each is a Job of one pod per TPU node (4 chips), all on
one node pool (the exclusive-topology annotation), selected by
`cloud.google.com/gke-tpu-accelerator` and `cloud.google.com/gke-tpu-topology`.
GKE's TPU webhook gives each pod TPU_WORKER_ID / TPU_WORKER_HOSTNAMES and,
for several slices, the MEGASCALE_* variables; JAX detects them
(GEMMA_JAX_DISTRIBUTED=1). Layout as in the JobSet TPU multislice example
(https://jobset.sigs.k8s.io/docs/tasks/tpu_multislice/) and xpk's rendered
workloads (recipes/Workload_create.md in AI-Hypercomputer/xpk).

Pathways (single controller, `pathways=True`): xpk `workload create-pathways`,
or a JobSet with a `pathways-head` job (proxy and resource manager as
sidecars, the gemma-jax process as its main container, JAX_PLATFORMS=proxy)
and a `worker` job running the Pathways server on every TPU node, as xpk
renders it (recipes/Workload_create_pathways.md and its template
src/xpk/templates/pathways_workload_create.yaml.j2): the JobSet succeeds
when the head job does (`successPolicy`), so the workers, which never exit
on their own, stop with it; the head starts before the workers
(`startupPolicy` InOrder).

Restarts: a JobSet restarts all its jobs on any failure, a spot preemption
included, up to `max_restarts` times; each restart resumes from the
workdir's last checkpoint. Spot workloads default to SPOT_MAX_RESTARTS.

The image must hold this checkout with gemma-jax installed (`pip install
'.[tpu]'`; for Pathways also `pathwaysutils`), the config at the path given.
"""

import dataclasses
import shlex

from gemma_jax.errors import ConfigError
from gemma_jax.launch.slices import TpuSlice

PATHWAYS_SERVER = "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/server:latest"
PATHWAYS_PROXY = (
  "us-docker.pkg.dev/cloud-tpu-v2-images/pathways/proxy_server:latest"
)
_EXCLUSIVE = {
  "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
}
_TPU_TOLERATION = [{"key": "google.com/tpu", "operator": "Exists"}]
# Restarts a spot workload gets unless told: every preemption of any of its
# nodes costs one, so 0 (the JobSet and xpk default) ends a spot run at its
# first preemption. Ten ride out the preemptions of a multi-day spot run,
# and a run that keeps failing for another reason still stops after ten
# tries rather than holding its slices forever.
SPOT_MAX_RESTARTS = 10


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  tpu: TpuSlice
  image: str
  config: str
  workdir: str
  slices: int = 1
  train_args: tuple[str, ...] = ()
  pathways: bool = False
  spot: bool = False
  priority: str | None = None  # a PriorityClass (xpk clusters have them)
  max_restarts: int | None = None  # None: SPOT_MAX_RESTARTS on spot, else 0
  queue: str | None = None  # Kueue LocalQueue

  @property
  def restarts(self) -> int:
    if self.max_restarts is not None:
      return self.max_restarts
    return SPOT_MAX_RESTARTS if self.spot else 0

  @property
  def env(self) -> dict[str, str]:
    if self.pathways:
      return {
        "JAX_PLATFORMS": "proxy",
        "XCLOUD_ENVIRONMENT": "GCP",
        "JAX_BACKEND_TARGET": "grpc://$(PATHWAYS_HEAD):29000",
      }
    return {"JAX_PLATFORMS": "tpu", "GEMMA_JAX_DISTRIBUTED": "1"}

  @property
  def command(self) -> str:
    """The shell command of the gemma-jax container."""
    extra = ("--set", "runtime.pathways=true") if self.pathways else ()
    return shlex.join(
      [
        "gemma-jax",
        "train",
        self.config,
        "--workdir",
        self.workdir,
        *self.train_args,
        *extra,
      ]
    )

  @property
  def pathways_scratch(self) -> str:
    return self.workdir.rstrip("/") + "/pathways-tmp"


def xpk_command(
  w: Workload, cluster: str, zone: str | None = None, project: str | None = None
) -> list[str]:
  """`xpk workload create[-pathways]` for this workload (flags as in xpk's
  src/xpk/parser/workload.py: --tpu-type takes PREFIX-TOPOLOGY, e.g.
  v5litepod-16x16, so the slice shape is exact; --spot selects spot
  capacity). xpk submits to its own Kueue LocalQueue (multislice-queue, in
  src/xpk/core/kueue_manager.py) and has no flag for another: a `queue` is
  refused here rather than dropped."""
  if w.queue:
    raise ConfigError(
      f"--queue {w.queue}: xpk submits to its own Kueue queue "
      f"(multislice-queue) and has no flag for another; drop --queue, or "
      f"render a JobSet (--format jobset), which carries it"
    )
  argv = [
    "xpk",
    "workload",
    "create-pathways" if w.pathways else "create",
    f"--cluster={cluster}",
    f"--workload={w.name}",
    f"--tpu-type={w.tpu.xpk_tpu_type}",
    f"--num-slices={w.slices}",
    f"--docker-image={w.image}",
    f"--command={w.command}",
    f"--max-restarts={w.restarts}",
  ]
  if w.spot:
    argv.append("--spot")
  if w.priority:
    argv.append(f"--priority={w.priority}")
  if w.pathways:
    argv.append(f"--pathways-gcs-location={w.pathways_scratch}")
  else:
    argv += [f"--env={k}={v}" for k, v in w.env.items()]
  argv += [f"--{k}={v}" for k, v in (("zone", zone), ("project", project)) if v]
  return argv


def _env_list(env: dict) -> list[dict]:
  return [
    {"name": k, "value": v}
    if isinstance(v, str)
    else {"name": k, "valueFrom": {"fieldRef": {"fieldPath": v[0]}}}
    for k, v in env.items()
  ]


def _metadata(w: Workload, annotations: dict | None) -> dict:
  labels = {"app": "gemma-jax"}
  if w.queue:
    labels["kueue.x-k8s.io/queue-name"] = w.queue
  meta: dict[str, object] = {"name": w.name, "labels": labels}
  if annotations:
    meta["annotations"] = dict(annotations)
  return meta


def _tpu_selector(w: Workload) -> dict:
  selector = {
    "cloud.google.com/gke-tpu-accelerator": w.tpu.gke_accelerator,
    "cloud.google.com/gke-tpu-topology": w.tpu.topology,
  }
  if w.spot:
    selector["cloud.google.com/gke-spot"] = "true"
  return selector


def jobset(w: Workload) -> dict:
  """The JobSet manifest as a dict (yaml.safe_dump writes it)."""
  if w.pathways:
    return _pathways_jobset(w)
  nodes = w.tpu.gke_nodes
  container = {
    "name": "gemma-jax",
    "image": w.image,
    "command": ["bash", "-c", w.command],
    "env": _env_list(w.env),
    "securityContext": {"privileged": True},
    "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
    "resources": {"limits": {"google.com/tpu": w.tpu.chips_per_gke_node}},
  }
  pod = {
    "restartPolicy": "Never",
    "hostNetwork": True,
    "dnsPolicy": "ClusterFirstWithHostNet",
    "terminationGracePeriodSeconds": 30,
    "nodeSelector": _tpu_selector(w),
    "tolerations": _TPU_TOLERATION,
    "containers": [container],
  }
  if w.priority:
    pod["priorityClassName"] = w.priority
  return {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": _metadata(w, _EXCLUSIVE),
    "spec": {
      # A restart re-runs every pod; the trainer resumes from the
      # workdir's last checkpoint.
      "failurePolicy": {"maxRestarts": w.restarts},
      "replicatedJobs": [
        {
          "name": "slice",
          "replicas": w.slices,
          "template": {
            "spec": {
              "parallelism": nodes,
              "completions": nodes,
              "backoffLimit": 0,
              "template": {"spec": pod},
            }
          },
        }
      ],
    },
  }


def _fieldref(path: str) -> tuple[str]:
  return (path,)


_COORDINATOR = _fieldref("metadata.labels['jobset.sigs.k8s.io/coordinator']")


def _pathways_jobset(w: Workload) -> dict:
  """Head (proxy, resource manager, the gemma-jax client) + TPU workers."""
  scratch = f"--gcs_scratch_location={w.pathways_scratch}"
  proxy = {
    "name": "pathways-proxy",
    "image": PATHWAYS_PROXY,
    "restartPolicy": "Always",
    "args": [
      "--server_port=29000",
      "--resource_manager_address=$(PATHWAYS_HEAD):29001",
      scratch,
    ],
    "env": _env_list({"PATHWAYS_HEAD": _COORDINATOR}),
    "ports": [{"containerPort": 29000}],
  }
  resource_manager = {
    "name": "pathways-rm",
    "image": PATHWAYS_SERVER,
    "restartPolicy": "Always",
    "args": [
      "--server_port=29001",
      scratch,
      "--node_type=resource_manager",
      f"--instance_count={w.slices}",
      f"--instance_type={w.tpu.pathways_instance_type}",
    ],
    "env": _env_list({"TPU_SKIP_MDS_QUERY": "true"}),
    "ports": [{"containerPort": 29001}, {"containerPort": 29002}],
  }
  client = {
    "name": "gemma-jax",
    "image": w.image,
    "command": ["bash", "-c", w.command],
    "env": _env_list({"PATHWAYS_HEAD": _COORDINATOR, **w.env}),
  }
  head = {
    "name": "pathways-head",
    "replicas": 1,
    "template": {
      "spec": {
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": 0,
        "completionMode": "Indexed",
        "template": {
          "spec": {
            "hostNetwork": True,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "restartPolicy": "Never",
            "nodeSelector": {"cloud.google.com/gke-nodepool": "cpu-np"},
            "initContainers": [proxy, resource_manager],
            "containers": [client],
          }
        },
      }
    },
  }
  nodes = w.tpu.gke_nodes
  server = {
    "name": "pathways-worker",
    "image": PATHWAYS_SERVER,
    "args": [
      "--server_port=29005",
      "--resource_manager_address=$(PATHWAYS_HEAD):29001",
      scratch,
    ],
    "env": _env_list(
      {
        "PATHWAYS_HEAD": _COORDINATOR,
        "MEGASCALE_COORDINATOR_ADDRESS": _COORDINATOR,
        "MEGASCALE_NUM_SLICES": _fieldref(
          "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']"
        ),
        "MEGASCALE_SLICE_ID": _fieldref(
          "metadata.labels['jobset.sigs.k8s.io/job-index']"
        ),
      }
    ),
    "ports": [{"containerPort": p} for p in (29005, 29006, 8471, 8080)],
    "resources": {"limits": {"google.com/tpu": w.tpu.chips_per_gke_node}},
  }
  workers = {
    "name": "worker",
    "replicas": w.slices,
    "template": {
      "metadata": {"annotations": _EXCLUSIVE},
      "spec": {
        "parallelism": nodes,
        "completions": nodes,
        # As xpk: each worker pod may fail and restart in place about four
        # times (restartPolicy OnFailure) before its slice's Job fails.
        "backoffLimit": 4 * nodes,
        "completionMode": "Indexed",
        "template": {
          "spec": {
            "hostNetwork": True,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "restartPolicy": "OnFailure",
            "terminationGracePeriodSeconds": 30,
            "nodeSelector": _tpu_selector(w),
            "tolerations": _TPU_TOLERATION,
            "containers": [server],
            **({"priorityClassName": w.priority} if w.priority else {}),
          }
        },
      },
    },
  }
  return {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": _metadata(w, None),
    "spec": {
      "coordinator": {"replicatedJob": "pathways-head"},
      "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
      "failurePolicy": {
        "restartStrategy": "Recreate",
        "maxRestarts": w.restarts,
      },
      # The head job (the gemma-jax process) decides: the JobSet succeeds
      # when it does, and the Pathways workers, which serve until stopped,
      # end with it. The head starts first: the workers dial its resource
      # manager.
      "successPolicy": {
        "operator": "All",
        "targetReplicatedJobs": ["pathways-head"],
      },
      "startupPolicy": {"startupPolicyOrder": "InOrder"},
      "replicatedJobs": [head, workers],
    },
  }
