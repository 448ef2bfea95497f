"""Logical axis rules -> shardings of parameters and optimizer state."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gemma_jax.config import config_from_dict
from gemma_jax.sharding import rules
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train.step import param_specs, state_shardings

MODEL = {"preset": "tiny-gemma2", "num_layers": 2, "d_model": 64,
         "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 2, "head_dim": 8,
         "vocab_size": 256, "sliding_window": 4}


def shardings(**mesh):
  cfg = config_from_dict({"model": MODEL, "mesh": mesh})
  return state_shardings(cfg, make_mesh(cfg.mesh))


def spec(sharding):
  return tuple(sharding.spec) + (None,) * 5


def test_tensor_axis_shards_heads_mlp_and_vocab():
  params = shardings(ici_data=1, ici_tensor=8).params
  layers = params["layers"]
  assert spec(layers["attn"]["q_einsum"]["w"])[:4] == (None, "tensor", None,
                                                      None)
  assert spec(layers["mlp"]["gating_einsum"]["w"])[:4] == (None, None, None,
                                                          "tensor")
  assert spec(layers["mlp"]["linear"]["w"])[:3] == (None, "tensor", None)
  assert spec(params["embedder"]["embedding"])[:2] == ("tensor", None)


def test_too_few_kv_heads_for_the_tensor_axis_are_replicated_and_reported():
  cfg = config_from_dict({"model": MODEL,
                          "mesh": {"ici_data": 1, "ici_tensor": 8}})
  specs, notes = param_specs(cfg, make_mesh(cfg.mesh))
  assert specs["layers"]["attn"]["kv_einsum"]["w"] == P(None, None, None,
                                                        None, None)
  assert notes == {"layers/attn/kv_einsum/w":
                   ["dim 2 (size 2) not sharded over ('tensor',)"]}


def test_fsdp_shards_the_embed_dimension_of_every_parameter():
  params = shardings(ici_data=1, ici_fsdp=8).params
  shapes_axes = {
      "embedder/embedding": 1, "final_norm/scale": 0,
      "layers/attn/q_einsum/w": 2, "layers/attn/kv_einsum/w": 3,
      "layers/attn/attn_vec_einsum/w": 3, "layers/mlp/linear/w": 2,
      "layers/mlp/gating_einsum/w": 2, "layers/pre_ffw_norm/scale": 1}
  for path, dim in shapes_axes.items():
    node = params
    for k in path.split("/"):
      node = node[k]
    assert spec(node)[dim] == "fsdp", path


def test_data_parallel_replicates_params_but_shards_optimizer_state():
  state = shardings(ici_data=8)
  for s in jax.tree.leaves(state.params):
    assert s.is_fully_replicated
  mu = state.opt_state[1][0].mu
  assert spec(mu["embedder"]["embedding"])[:2] == ("data", None)  # [256, 64]
  assert spec(mu["layers"]["mlp"]["linear"]["w"])[:3] == (None, "data", None)


def test_optimizer_state_can_follow_the_parameters():
  state = shardings(ici_data=8, shard_optimizer_over_data=False)
  for s in jax.tree.leaves(state.opt_state):
    assert s.is_fully_replicated


def test_zero_spec_picks_the_largest_dimension_it_divides():
  mesh = make_mesh(config_from_dict({"model": MODEL,
                                     "mesh": {"ici_data": 4,
                                              "ici_tensor": 2}}).mesh)
  assert rules.zero_spec(P(None, "tensor"), (12, 64), mesh) == \
      P(None, ("tensor", "data"))
  assert rules.zero_spec(P(None, None), (8, 6), mesh) == P("data", None)
  assert rules.zero_spec(P(None,), (6,), mesh) == P(None)  # nothing divides


def test_batch_rows_split_over_data_and_fsdp():
  cfg = config_from_dict({"model": MODEL})
  assert rules.batch_spec(cfg.mesh) == P(("data", "fsdp"))


def test_rules_are_config_data():
  cfg = config_from_dict({"model": MODEL, "mesh": {
      "ici_data": 1, "ici_tensor": 8,
      "rules": [["mlp", []], ["heads", ["tensor"]]]}})
  params = state_shardings(cfg, make_mesh(cfg.mesh)).params
  assert params["layers"]["mlp"]["linear"]["w"].is_fully_replicated
  assert spec(params["layers"]["attn"]["q_einsum"]["w"])[1] == "tensor"
