"""`gemma-jax launch gke`: JobSet manifests (parsed back with yaml.safe_load)
and xpk commands for the same run, one slice, several, and Pathways.

Expected layout: the JobSet TPU multislice example
(https://jobset.sigs.k8s.io/docs/tasks/tpu_multislice/: exclusive-topology
annotation, `replicas` = slices, `parallelism` = `completions` = nodes per
slice, 4 chips per node, gke-tpu-accelerator / gke-tpu-topology selectors)
and xpk's rendered workloads (AI-Hypercomputer/xpk recipes/Workload_create.md
and Workload_create_pathways.md)."""

import pathlib
import shlex

import pytest
import yaml

from gemma_jax import cli

ROOT = pathlib.Path(__file__).parents[2]
IMAGE = "us-docker.pkg.dev/proj/repo/gemma-jax:1"


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
  monkeypatch.chdir(ROOT)


def gke(capsys, config, *args):
  code = cli.main(
    [
      "launch",
      "gke",
      config,
      "--name",
      "g2",
      "--image",
      IMAGE,
      "--workdir",
      "gs://b/runs/g2",
      *args,
    ]
  )
  out, err = capsys.readouterr()
  assert code == 0, err
  return out


def _env(container):
  return {
    e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]
  }


def test_multislice_jobset(capsys):
  manifest = yaml.safe_load(
    gke(
      capsys,
      "configs/pods/gemma2-2b-v5e-2slices.yaml",
      "--tpu",
      "v5e:16x16",
      "--slices",
      "2",
      "--spot",
      "--max-restarts",
      "10",
      "--queue",
      "q",
      "--set",
      "train.steps=100",
    )
  )
  assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
  assert manifest["kind"] == "JobSet"
  assert manifest["metadata"]["name"] == "g2"
  assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
  assert manifest["metadata"]["annotations"] == {
    "alpha.jobset.sigs.k8s.io/exclusive-topology": (
      "cloud.google.com/gke-nodepool"
    )
  }
  spec = manifest["spec"]
  assert spec["failurePolicy"] == {"maxRestarts": 10}
  [job] = spec["replicatedJobs"]
  assert job["replicas"] == 2  # slices
  assert job["template"]["spec"]["parallelism"] == 64  # 256 chips / 4
  assert job["template"]["spec"]["completions"] == 64
  pod = job["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
    "cloud.google.com/gke-tpu-topology": "16x16",
    "cloud.google.com/gke-spot": "true",
  }
  assert pod["hostNetwork"] is True
  assert "priorityClassName" not in pod  # only with --priority
  [container] = pod["containers"]
  assert container["image"] == IMAGE
  assert container["command"][:2] == ["bash", "-c"]
  assert shlex.split(container["command"][2]) == [
    "gemma-jax",
    "train",
    "configs/pods/gemma2-2b-v5e-2slices.yaml",
    "--workdir",
    "gs://b/runs/g2",
    "--set",
    "train.steps=100",
  ]
  assert _env(container) == {
    "JAX_PLATFORMS": "tpu",
    "GEMMA_JAX_DISTRIBUTED": "1",
  }
  assert container["resources"]["limits"] == {"google.com/tpu": 4}


def test_one_v5p_slice_jobset(capsys):
  manifest = yaml.safe_load(
    gke(capsys, "configs/pods/gemma2-27b-v5p.yaml", "--tpu", "v5p:8x24x32")
  )
  [job] = manifest["spec"]["replicatedJobs"]
  assert job["replicas"] == 1
  assert job["template"]["spec"]["parallelism"] == 1536  # 6144 chips / 4
  pod = job["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
    "cloud.google.com/gke-tpu-topology": "8x24x32",
  }


def test_pathways_jobset(capsys):
  manifest = yaml.safe_load(
    gke(
      capsys,
      "configs/pods/gemma2-2b-v5e-2slices.yaml",
      "--tpu",
      "v5e:16x16",
      "--slices",
      "2",
      "--pathways",
    )
  )
  spec = manifest["spec"]
  assert spec["coordinator"] == {"replicatedJob": "pathways-head"}
  head, workers = spec["replicatedJobs"]
  assert (head["name"], head["replicas"]) == ("pathways-head", 1)
  head_pod = head["template"]["spec"]["template"]["spec"]
  proxy, rm = head_pod["initContainers"]
  assert "--instance_count=2" in rm["args"]
  assert "--instance_type=tpuv5e:16x16" in rm["args"]
  assert "--gcs_scratch_location=gs://b/runs/g2/pathways-tmp" in proxy["args"]
  [client] = head_pod["containers"]
  assert client["image"] == IMAGE
  assert shlex.split(client["command"][2])[-2:] == [
    "--set",
    "runtime.pathways=true",
  ]
  env = _env(client)
  assert env["JAX_PLATFORMS"] == "proxy"
  assert env["JAX_BACKEND_TARGET"] == "grpc://$(PATHWAYS_HEAD):29000"
  assert "GEMMA_JAX_DISTRIBUTED" not in env
  assert (workers["name"], workers["replicas"]) == ("worker", 2)
  assert workers["template"]["spec"]["parallelism"] == 64
  worker_pod = workers["template"]["spec"]["template"]["spec"]
  assert worker_pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
    "cloud.google.com/gke-tpu-topology": "16x16",
  }
  [server] = worker_pod["containers"]
  assert server["resources"]["limits"] == {"google.com/tpu": 4}
  assert _env(server)["MEGASCALE_SLICE_ID"] == {
    "fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}
  }


def test_xpk_commands(capsys):
  base = [
    "--tpu",
    "v5e:16x16",
    "--slices",
    "2",
    "--format",
    "xpk",
    "--cluster",
    "c",
    "--zone",
    "us-west4-a",
  ]
  out = gke(capsys, "configs/pods/gemma2-2b-v5e-2slices.yaml", *base)
  assert shlex.split(out) == [
    "xpk",
    "workload",
    "create",
    "--cluster=c",
    "--workload=g2",
    "--tpu-type=v5litepod-16x16",
    "--num-slices=2",
    f"--docker-image={IMAGE}",
    "--command=gemma-jax train configs/pods/gemma2-2b-v5e-2slices.yaml "
    "--workdir gs://b/runs/g2",
    "--max-restarts=0",
    "--env=JAX_PLATFORMS=tpu",
    "--env=GEMMA_JAX_DISTRIBUTED=1",
    "--zone=us-west4-a",
  ]
  out = gke(
    capsys,
    "configs/pods/gemma2-2b-v5e-2slices.yaml",
    *base,
    "--pathways",
    "--priority",
    "high",
  )
  assert shlex.split(out) == [
    "xpk",
    "workload",
    "create-pathways",
    "--cluster=c",
    "--workload=g2",
    "--tpu-type=v5litepod-16x16",
    "--num-slices=2",
    f"--docker-image={IMAGE}",
    "--command=gemma-jax train configs/pods/gemma2-2b-v5e-2slices.yaml "
    "--workdir gs://b/runs/g2 --set runtime.pathways=true",
    "--max-restarts=0",
    "--priority=high",
    "--pathways-gcs-location=gs://b/runs/g2/pathways-tmp",
    "--zone=us-west4-a",
  ]


def test_gke_checks_the_mesh_too(capsys):
  code = cli.main(
    [
      "launch",
      "gke",
      "configs/pods/gemma-7b-v5e.yaml",
      "--name",
      "g",
      "--image",
      IMAGE,
      "--workdir",
      "gs://b/r",
      "--tpu",
      "v5e:8x8",
    ]
  )
  assert code == 2
  assert "does not fit 1 x v5litepod-64" in capsys.readouterr().err


def test_pathways_jobset_ends_with_its_head_and_starts_it_first(capsys):
  # As xpk's src/xpk/templates/pathways_workload_create.yaml.j2: without the
  # successPolicy the Pathways workers would serve forever after training.
  spec = yaml.safe_load(
    gke(
      capsys,
      "configs/pods/gemma2-2b-v5e-2slices.yaml",
      *("--tpu", "v5e:16x16", "--slices", "2", "--pathways"),
    )
  )["spec"]
  assert spec["successPolicy"] == {
    "operator": "All",
    "targetReplicatedJobs": ["pathways-head"],
  }
  assert spec["startupPolicy"] == {"startupPolicyOrder": "InOrder"}
  assert [j["name"] for j in spec["replicatedJobs"]] == [
    "pathways-head",
    "worker",
  ]


@pytest.mark.parametrize(
  "args, restarts",
  [
    ([], 0),
    (["--spot"], 10),  # one preemption no longer ends the run
    (["--spot", "--max-restarts", "3"], 3),
    (["--spot", "--max-restarts", "0"], 0),
    (["--max-restarts", "5"], 5),
  ],
)
def test_spot_workloads_restart_after_preemption(capsys, args, restarts):
  config = "configs/pods/gemma-7b-v5e.yaml"
  tpu = ("--tpu", "v5e:16x16")
  manifest = yaml.safe_load(gke(capsys, config, *tpu, *args))
  assert manifest["spec"]["failurePolicy"] == {"maxRestarts": restarts}
  pathways = yaml.safe_load(gke(capsys, config, *tpu, "--pathways", *args))
  assert pathways["spec"]["failurePolicy"]["maxRestarts"] == restarts
  argv = shlex.split(gke(capsys, config, *tpu, "--format", "xpk", *args))
  assert f"--max-restarts={restarts}" in argv
  assert ("--spot" in argv) == ("--spot" in args)


def _refused(capsys, *args):
  code = cli.main(
    [
      *("launch", "gke", "configs/pods/gemma-7b-v5e.yaml", "--name", "g"),
      *("--image", IMAGE, "--workdir", "gs://b/r", "--tpu", "v5e:16x16"),
      *args,
    ]
  )
  out, err = capsys.readouterr()
  assert code == 2 and out == ""
  [line] = err.splitlines()
  return line


def test_flags_a_format_cannot_carry_are_refused_not_dropped(capsys):
  assert _refused(capsys, "--format", "xpk", "--queue", "q") == (
    "gemma-jax launch: error: --queue q: xpk submits to its own Kueue "
    "queue (multislice-queue) and has no flag for another; drop --queue, "
    "or render a JobSet (--format jobset), which carries it"
  )
  assert _refused(capsys, "--cluster", "c", "--project", "p") == (
    "gemma-jax launch: error: --cluster, --project: a JobSet manifest "
    "carries no cluster/project (kubectl applies it to its current "
    "cluster); drop --cluster --project, or render the xpk command "
    "(--format xpk)"
  )
  assert "--zone: a JobSet manifest carries no zone" in _refused(
    capsys, "--zone", "us-west4-a"
  )
  assert "--max-restarts -1: must be >= 0" in _refused(
    capsys, "--max-restarts", "-1"
  )
  assert _refused(capsys, "--format", "xpk", "--zone", "us-central2-b") == (
    "gemma-jax launch: error: --zone 'us-central2-b': Cloud TPU offers v5e "
    "in us-central1-a, us-south1-a, us-west1-c, us-west4-a, us-west4-b, "
    "us-east5-a, us-east5-b, us-east5-c, europe-west4-b "
    "(cloud.google.com/tpu/docs/regions-zones); give the zone of a cluster "
    "with v5e node pools"
  )


def test_pathways_workers_restart_in_place_as_xpk_lets_them(capsys):
  # xpk (src/xpk/commands/workload.py): worker backoffLimit = 4 x VMs.
  _, workers = yaml.safe_load(
    gke(
      capsys,
      "configs/pods/gemma2-2b-v5e-2slices.yaml",
      *("--tpu", "v5e:16x16", "--slices", "2", "--pathways"),
    )
  )["spec"]["replicatedJobs"]
  job = workers["template"]["spec"]
  assert job["backoffLimit"] == 4 * 64
  assert job["template"]["spec"]["restartPolicy"] == "OnFailure"
