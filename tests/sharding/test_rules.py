"""Logical axis rules -> shardings of parameters and optimizer state."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma_jax import configlib
from gemma_jax.model import Transformer
from gemma_jax.model.testing import TINY_GEMMA2_SHARDED
from gemma_jax.sharding import rules
from gemma_jax.sharding.config import MeshConfig
from gemma_jax.sharding.mesh import make_mesh

MODEL = TINY_GEMMA2_SHARDED


def boxed_params():
  return jax.eval_shape(
    Transformer(MODEL).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
  )["params"]


def mesh_config(**mesh) -> MeshConfig:
  return configlib.from_dict(MeshConfig, mesh, "mesh")


def param_specs(**mesh):
  """(mesh PartitionSpecs of the params, unsharded notes) on 8 devices."""
  cfg = mesh_config(**mesh)
  return rules.mesh_specs(boxed_params(), make_mesh(cfg), cfg)


def param_shardings(**mesh):
  cfg = mesh_config(**mesh)
  mesh = make_mesh(cfg)
  return rules.named(mesh, rules.mesh_specs(boxed_params(), mesh, cfg)[0])


def spec(sharding):
  return tuple(sharding.spec) + (None,) * 5


def test_tensor_axis_shards_heads_mlp_and_vocab():
  params = param_shardings(ici_data=1, ici_tensor=8)
  layers = params["layers"]
  assert spec(layers["attn"]["q_einsum"]["w"])[:4] == (
    None,
    "tensor",
    None,
    None,
  )
  assert spec(layers["mlp"]["gating_einsum"]["w"])[:4] == (
    None,
    None,
    None,
    "tensor",
  )
  assert spec(layers["mlp"]["linear"]["w"])[:3] == (None, "tensor", None)
  assert spec(params["embedder"]["embedding"])[:2] == ("tensor", None)


def test_too_few_kv_heads_for_the_tensor_axis_are_replicated_and_reported():
  specs, notes = param_specs(ici_data=1, ici_tensor=8)
  assert specs["layers"]["attn"]["kv_einsum"]["w"] == P(
    None, None, None, None, None
  )
  assert notes == {
    "layers/attn/kv_einsum/w": ["dim 2 (size 2) not sharded over ('tensor',)"]
  }


def test_fsdp_shards_the_embed_dimension_of_every_parameter():
  params = param_shardings(ici_data=1, ici_fsdp=8)
  shapes_axes = {
    "embedder/embedding": 1,
    "final_norm/scale": 0,
    "layers/attn/q_einsum/w": 2,
    "layers/attn/kv_einsum/w": 3,
    "layers/attn/attn_vec_einsum/w": 3,
    "layers/mlp/linear/w": 2,
    "layers/mlp/gating_einsum/w": 2,
    "layers/pre_ffw_norm/scale": 1,
  }
  for path, dim in shapes_axes.items():
    node = params
    for k in path.split("/"):
      node = node[k]
    assert spec(node)[dim] == "fsdp", path


def test_zero_spec_picks_the_largest_dimension_it_divides():
  mesh = make_mesh(mesh_config(ici_data=4, ici_tensor=2))
  assert rules.zero_spec(P(None, "tensor"), (12, 64), mesh) == P(
    None, ("tensor", "data")
  )
  assert rules.zero_spec(P(None, None), (8, 6), mesh) == P("data", None)
  assert rules.zero_spec(
    P(
      None,
    ),
    (6,),
    mesh,
  ) == P(None)  # nothing divides


def test_batch_rows_split_over_data_and_fsdp():
  assert rules.batch_spec(mesh_config()) == P(("data", "fsdp"))


def test_rules_are_config_data():
  params = param_shardings(
    ici_data=1, ici_tensor=8, rules=[["mlp", []], ["heads", ["tensor"]]]
  )
  assert params["layers"]["mlp"]["linear"]["w"].is_fully_replicated
  assert spec(params["layers"]["attn"]["q_einsum"]["w"])[1] == "tensor"
