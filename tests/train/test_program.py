"""The TrainProgram: one place that decides every sharding of a run."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from gemma_jax.errors import ConfigError
from gemma_jax.model.testing import TINY_GEMMA2_SHARDED, model_section
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram

MODEL = model_section(TINY_GEMMA2_SHARDED)


def program(**mesh) -> TrainProgram:
  return TrainProgram(config_from_dict({"model": MODEL, "mesh": mesh}))


def spec(sharding):
  return tuple(sharding.spec) + (None,) * 5


def test_data_parallel_replicates_params_but_shards_optimizer_state():
  state = program(ici_data=8).state_shardings
  for s in jax.tree.leaves(state.params):
    assert s.is_fully_replicated
  mu = state.opt_state[1].inner_state[0].mu
  assert spec(mu["embedder"]["embedding"])[:2] == ("data", None)  # [256, 64]
  assert spec(mu["layers"]["mlp"]["linear"]["w"])[:3] == (None, "data", None)


def test_optimizer_state_can_follow_the_parameters():
  state = program(ici_data=8, shard_optimizer_over_data=False).state_shardings
  for s in jax.tree.leaves(state.opt_state):
    assert s.is_fully_replicated


def test_abstract_state_and_batch_carry_the_shardings():
  p = program(ici_data=2, ici_fsdp=2, ici_tensor=2)
  leaves = jax.tree.leaves(p.abstract_state)
  assert leaves and all(x.sharding is not None for x in leaves)
  assert p.abstract_batch["inputs"].shape == (8, 128)
  assert p.abstract_batch["inputs"].sharding.spec == P(("data", "fsdp"))
  assert p.unsharded == {}


def test_a_batch_that_does_not_split_over_the_batch_shards_is_a_config_error():
  cfg = config_from_dict({"model": MODEL, "train": {"batch_size": 6}})
  with pytest.raises(
    ConfigError,
    match=r"train.batch_size: 6 rows .* "
    r"divisible by 8",
  ):
    TrainProgram(cfg)
