"""Adapter-only checkpoints: small, and refused by a base they do not fit."""

import dataclasses

import numpy as np
import pytest

from gemma_jax.checkpoint import adapter, layout
from gemma_jax.errors import CheckpointError
from gemma_jax.model import lora
from gemma_jax.model.lora import LoraConfig
from gemma_jax.model.testing import TINY_GEMMA2_MQA

BASE = TINY_GEMMA2_MQA
ADAPTED = dataclasses.replace(
  BASE, lora=LoraConfig(rank=4, targets=("q", "down"))
)


def adapters(cfg):
  rng = np.random.default_rng(0)
  return layout.unflatten(
    {
      p: rng.normal(size=s).astype(np.float32)
      for p, s in lora.adapter_paths(cfg).items()
    }
  )


def test_adapters_round_trip_with_their_config_and_base_facts(tmp_path):
  tree = adapters(ADAPTED)
  base = {"path": "/ckpt/base", "fingerprint": {"x": [1.0, 2.0]}}
  adapter.save(tmp_path / "a", tree, ADAPTED, base)
  loaded, cfg, facts = adapter.load(tmp_path / "a")
  assert cfg == ADAPTED and facts == base
  for (p, x), (q, y) in zip(layout.flatten(tree), layout.flatten(loaded)):
    assert p == q
    np.testing.assert_array_equal(x, y)


def test_loading_onto_a_base_of_another_shape_names_the_first_mismatch(
  tmp_path,
):
  adapter.save(tmp_path / "a", adapters(ADAPTED), ADAPTED)
  wider = dataclasses.replace(BASE, d_model=48)
  with pytest.raises(
    CheckpointError,
    match=r"does not fit the base model: "
    r"layers/attn/q_einsum/lora_q_a has shape \(2, 32, 4\), "
    r"the base needs \(2, 48, 4\)",
  ):
    adapter.load(tmp_path / "a", base_cfg=wider)
  deeper = dataclasses.replace(BASE, num_layers=3)
  with pytest.raises(CheckpointError, match="lora_q_a has shape"):
    adapter.load(tmp_path / "a", base_cfg=deeper)


def test_a_directory_without_an_adapter_is_named(tmp_path):
  with pytest.raises(CheckpointError, match="is not a LoRA adapter"):
    adapter.load(tmp_path)
