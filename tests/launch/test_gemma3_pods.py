"""The Gemma 3 pod configs (configs/pods/gemma3-*.yaml) on the hardware the
Gemma 3 report lists (arXiv 2503.19786, Table 2: 1B TPUv5e 512 chips, 4B
TPUv5e 2048, 12B TPUv4 6144, 27B TPUv5p 6144) and a 4B continual
pretraining on one v5e pod: the mesh fills the launch shape, and the global
batch splits evenly over the data groups and over the hosts (one JAX
process per 4 chips), as the data pipeline needs. Their fit is measured with
`gemma-jax compile` (docs/pods.md)."""

import pathlib
import re

import pytest

from gemma_jax.launch.slices import parse_tpu
from gemma_jax.sharding.mesh import mesh_shape
from gemma_jax.train.config import load_config

PODS = pathlib.Path(__file__).parents[2] / "configs" / "pods"
REPORT_CHIPS = {  # Table 2 of the Gemma 3 report
  "gemma3-1b-v5e-2slices": ("v5e", 512),
  "gemma3-4b-v5e-8slices": ("v5e", 2048),
  "gemma3-12b-v4-24slices": ("v4", 6144),
  "gemma3-27b-v5p": ("v5p", 6144),
  "gemma3-4b-cpt-v5e": ("v5e", 256),
}


def launch_shape(config: pathlib.Path) -> tuple[str, int]:
  header = config.read_text()
  topology = re.search(r"--topology (\S+)", header)
  slices = re.search(r"--topology \S+ --slices (\d+)", header)
  assert topology, f"{config.name}: its header names no --topology"
  return topology.group(1), int(slices.group(1)) if slices else 1


def test_every_gemma3_config_is_listed():
  assert sorted(p.stem for p in PODS.glob("gemma3-*.yaml")) == sorted(
    REPORT_CHIPS
  )


@pytest.mark.parametrize("name", sorted(REPORT_CHIPS))
def test_mesh_and_batch_fit_the_report_hardware(name):
  config = PODS / f"{name}.yaml"
  cfg = load_config(str(config), [])
  tpu, slices = launch_shape(config)
  shape = parse_tpu(tpu)
  assert (shape.generation, shape.chips * slices) == REPORT_CHIPS[name]
  assert cfg.model.name == name.split("-v")[0].replace("-cpt", "")
  ici, dcn = mesh_shape(cfg.mesh, shape.chips * slices, slices)
  groups = ici["data"] * ici["fsdp"] * dcn["data"] * dcn["fsdp"]
  hosts = shape.gke_nodes * slices
  batch = cfg.train.batch_size
  assert batch % groups == 0, (batch, groups)
  assert batch % hosts == 0, (batch, hosts)
  # Sharded dimensions divide: d_model over fsdp, heads over tensor.
  assert cfg.model.d_model % ici["fsdp"] == 0
  assert cfg.model.num_kv_heads % ici["tensor"] == 0
