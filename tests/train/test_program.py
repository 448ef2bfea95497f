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


def test_a_feature_the_config_turns_on_must_be_registered(monkeypatch):
  from gemma_jax.train import program as program_lib

  monkeypatch.setattr(program_lib, "_REGISTERED", [])
  cfg = config_from_dict({"model": MODEL | {"lora": {"rank": 2}}})
  with pytest.raises(ConfigError, match="turns on lora.*import gemma_jax"):
    TrainProgram(cfg)


def test_features_are_built_in_their_registered_order():
  from gemma_jax.train import program as program_lib

  cfg = config_from_dict(
    {
      "model": MODEL | {"lora": {"rank": 2}},
      "train": {"ema_decay": 0.9},
      "distill": {"teacher_model": MODEL},
    }
  )
  assert cfg.features() == ("lora", "distill", "ema")
  names = [f.name for f in program_lib.enabled_features(cfg)]
  assert names == ["lora", "distill", "ema"]
  assert [f.name for f in program_lib._REGISTERED] == [
    "lora",
    "distill",
    "ewc",
    "ema",
    "harness",
  ]
