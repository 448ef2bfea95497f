"""Every configs/pods/*.yaml, launched as its header says (its `--topology`
and `--slices`), rendered in every format: the gcloud queued-resource
command, the GKE JobSet (multi-controller and Pathways) and the xpk
commands. Each JobSet is validated against the JobSet CRD's OpenAPI schema
(kubernetes-sigs/jobset v0.12.0, tests/fixtures/jobset/README.md), with
unknown fields refused as `kubectl apply` (strict field validation) does."""

import functools
import gzip
import pathlib
import re
import shlex

import jsonschema
import pytest
import yaml

from gemma_jax import cli
from gemma_jax.hardware import CHIPS
from gemma_jax.launch.slices import parse_tpu

ROOT = pathlib.Path(__file__).parents[2]
PODS = sorted((ROOT / "configs" / "pods").glob("*.yaml"))
CRD = ROOT / "tests" / "fixtures" / "jobset" / "jobset.x-k8s.io_jobsets.yaml.gz"


@functools.cache
def jobset_schema() -> dict:
  """The CRD's v1alpha2 openAPIV3Schema (the C YAML loader when built in:
  the file is 800 kB)."""
  loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
  with gzip.open(CRD, "rt") as f:
    crd = yaml.load(f, Loader=loader)
  [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
  return version["schema"]["openAPIV3Schema"]


def unknown_fields(instance, schema: dict, path: str = "") -> list[str]:
  """Keys the schema does not declare. Kubernetes drops them (structural
  schemas prune) and `kubectl apply` refuses them; jsonschema would not."""
  if isinstance(instance, list):
    items = schema.get("items", {})
    return [
      f for i, x in enumerate(instance) for f in unknown_fields(x, items, path)
    ]
  if not isinstance(instance, dict) or "properties" not in schema:
    return []
  found = []
  for key, value in instance.items():
    if key in schema["properties"]:
      found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif not schema.get("x-kubernetes-preserve-unknown-fields"):
      found.append(f"{path}.{key}")
  return found


def check_jobset(manifest: dict) -> None:
  schema = jobset_schema()
  errors = [
    f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
    for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)
  ]
  assert errors == [], errors
  assert unknown_fields(manifest, schema) == []


def launch_shape(config: pathlib.Path) -> tuple[str, int]:
  """The `--topology` and `--slices` the config's header gives."""
  header = config.read_text()
  topology = re.search(r"--topology (\S+)", header)
  slices = re.search(r"--topology \S+ --slices (\d+)", header)
  assert topology, f"{config.name}: its header names no --topology"
  return topology.group(1), int(slices.group(1)) if slices else 1


def main(capsys, *argv) -> str:
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  assert code == 0, err
  assert err == ""  # nothing dropped or warned about
  return out


def gke(capsys, config, tpu, slices, *extra) -> str:
  return main(
    capsys,
    *("launch", "gke", str(config), "--name", "run", "--tpu", tpu),
    *("--slices", str(slices), "--image", "img:1", "--workdir", "gs://b/r"),
    *extra,
  )


@pytest.mark.parametrize("config", PODS, ids=[p.stem for p in PODS])
def test_every_pod_config_renders_in_every_format(capsys, config):
  tpu, slices = launch_shape(config)
  shape = parse_tpu(tpu)
  zone = CHIPS[shape.generation].cloud.zones[0]

  # gcloud: one queued resource; the accelerator type only where it means
  # the shape, else --type and --topology.
  [line] = main(
    capsys,
    *("launch", "create", str(config), "--name", "run", "--zone", zone),
    *("--tpu", tpu, "--slices", str(slices), "--dry-run"),
  ).splitlines()
  argv = shlex.split(line)
  assert argv[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  if shape.named:
    assert f"--accelerator-type={shape.accelerator_type}" in argv
  else:
    assert [a for a in argv if a.startswith(("--type=", "--topology="))] == [
      f"--type={shape.gen.accelerator_prefix}",
      f"--topology={shape.topology}",
    ]
    assert not any(a.startswith("--accelerator-type") for a in argv)

  # GKE: both JobSets are valid, on-demand and spot.
  for extra in ([], ["--spot"]):
    manifest = yaml.safe_load(gke(capsys, config, tpu, slices, *extra))
    check_jobset(manifest)
    assert manifest["spec"]["replicatedJobs"][0]["replicas"] == slices
    pathways = yaml.safe_load(
      gke(capsys, config, tpu, slices, "--pathways", *extra)
    )
    check_jobset(pathways)
    assert pathways["spec"]["successPolicy"] == {
      "operator": "All",
      "targetReplicatedJobs": ["pathways-head"],
    }
    assert pathways["spec"]["startupPolicy"] == {
      "startupPolicyOrder": "InOrder"
    }

  # xpk: both commands, the exact slice shape.
  for extra in ([], ["--pathways"]):
    argv = shlex.split(
      gke(
        capsys, config, tpu, slices, "--format", "xpk", "--zone", zone, *extra
      )
    )
    assert argv[:3] == [
      "xpk",
      "workload",
      "create-pathways" if extra else "create",
    ]
    assert f"--tpu-type={shape.xpk_tpu_type}" in argv
    assert f"--num-slices={slices}" in argv


def test_the_schema_check_catches_what_the_api_server_refuses():
  good = yaml.safe_load(
    cli_render(["--tpu", "v5e:16x16", "--slices", "2", "--pathways"])
  )
  check_jobset(good)
  typo = yaml.safe_load(yaml.safe_dump(good))
  typo["spec"]["sucessPolicy"] = typo["spec"].pop("successPolicy")
  assert unknown_fields(typo, jobset_schema()) == [".spec.sucessPolicy"]
  wrong = yaml.safe_load(yaml.safe_dump(good))
  wrong["spec"]["successPolicy"]["operator"] = "Some"
  with pytest.raises(AssertionError, match="successPolicy.operator"):
    check_jobset(wrong)


def cli_render(args) -> str:
  import contextlib
  import io

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = cli.main(
      [
        *(
          "launch",
          "gke",
          str(ROOT / "configs/pods/gemma2-2b-v5e-2slices.yaml"),
        ),
        *("--name", "run", "--image", "img:1", "--workdir", "gs://b/r"),
        *args,
      ]
    )
  assert code == 0
  return out.getvalue()


@pytest.mark.parametrize("config", PODS, ids=[p.stem for p in PODS])
def test_every_pod_config_passes_the_trainers_startup_checks(config):
  """What `gemma-jax train` checks before its first step that needs no
  hardware, on the topology the config's header names: the config loads
  and validates; the mesh fills the slices exactly; the batch splits over
  the batch shards and microbatches (TrainProgram); one JAX process per
  host (4 chips each on every multi-host slice here). (The data shards,
  which need the topology's devices: the test below.)"""
  import math

  from gemma_jax.launch.slices import check_mesh
  from gemma_jax.sharding import rules
  from gemma_jax.train.config import load_config

  tpu, slices = launch_shape(config)
  shape = parse_tpu(tpu)
  cfg = load_config(config)
  ici, dcn = check_mesh(cfg.mesh, shape, slices, what=config.name)
  batch_axes = rules.axes_of(rules.batch_spec(cfg.mesh)[0])
  shards = math.prod(ici[a] * dcn[a] for a in batch_axes)
  rows, micro = cfg.train.batch_size, cfg.train.microbatches
  assert rows % (shards * micro) == 0, (rows, shards, micro)
  processes = shape.gke_nodes * slices
  assert processes == shape.chips * slices // 4


# (data shards, processes reading each) on the topology's devices, from
# scripts/pod_batch_owners.py: more than one reader where a tensor axis
# is wider than a host's 4 chips.
DATA_SHARDS = {
  "gemma-2b-v5e": (64, 1),
  "gemma-7b-v5e": (8, 8),
  "gemma2-27b-v5p": (384, 4),
  "gemma2-2b-v5e-2slices": (128, 1),
  "gemma2-9b-cpt-v4": (32, 1),
  "gemma2-9b-distill-v4": (512, 2),
  "gemma2-9b-lora-v4": (32, 1),
  "gemma2-9b-v4": (512, 2),
  "gemma3-12b-v4-24slices": (768, 2),
  "gemma3-1b-v5e-2slices": (128, 1),
  "gemma3-27b-v5p": (384, 4),
  "gemma3-4b-cpt-v5e": (64, 1),
  "gemma3-4b-v5e-8slices": (512, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", PODS, ids=[p.stem for p in PODS])
def test_every_pod_config_splits_its_batch_into_whole_data_shards(config):
  """On the devices of the config's topology (libtpu's description: each
  knows its host), the batch sharding's data shards
  (gemma_jax.sharding.data_shards, what the trainer feeds): the processes
  holding the same rows read one shard, and train.batch_size is a multiple
  of the shard count (Pipeline's check)."""
  pytest.importorskip("libtpu", reason="TPU topologies need the tpu extra")
  import collections

  from jax.sharding import NamedSharding

  from gemma_jax.data.pipeline import check_global_batch
  from gemma_jax.sharding import rules
  from gemma_jax.sharding.data_shards import data_shards
  from gemma_jax.sharding.mesh import make_mesh
  from gemma_jax.train import aot
  from gemma_jax.train.config import load_config

  tpu, slices = launch_shape(config)
  cfg = load_config(config)
  mesh = make_mesh(cfg.mesh, aot.topology_devices(tpu, slices))
  sharding = NamedSharding(mesh, rules.batch_spec(cfg.mesh))
  shards = data_shards(sharding, cfg.train.batch_size)
  assert len(shards) == parse_tpu(tpu).gke_nodes * slices  # every process
  [count] = {c for _, c in shards.values()}
  readers = set(collections.Counter(shards.values()).values())
  assert (count, *readers) == DATA_SHARDS[config.stem]
  check_global_batch(cfg.train.batch_size, count, dict(mesh.shape))


def test_the_startup_checks_refuse_a_batch_the_data_shards_cannot_share():
  """gemma-7b-v5e's 8 data shards (a tensor axis over 8 hosts): 12 rows
  would leave half a row each."""
  from gemma_jax.data.pipeline import check_global_batch
  from gemma_jax.errors import ConfigError

  with pytest.raises(
    ConfigError,
    match=r"train.batch_size \(12\) must be a positive multiple of the "
    r"number of data shards \(8;.* of the mesh \{'data': 8",
  ):
    check_global_batch(12, 8, {"data": 8, "fsdp": 1, "tensor": 32})
