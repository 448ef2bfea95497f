"""The one publish protocol (checkpoint/publish.py) and its finite check."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gemma_jax.checkpoint import adapter, fisher, native, publish
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.errors import ConfigError
from gemma_jax.model.config import PRESETS

CFG = PRESETS["tiny-gemma2"]


def tree():
  return {"a": np.zeros((2, 3), np.float32), "b": {"c": np.ones(4)}}


def test_publish_writes_trees_then_the_json_that_marks_it_complete(tmp_path):
  out = tmp_path / "out"
  publish.publish(out, {"t": tree()}, {"meta.json": "{}\n"})
  assert sorted(os.listdir(out)) == ["meta.json", "t"]
  assert not any(n.startswith(".") for n in os.listdir(tmp_path))


def test_publish_refuses_an_existing_directory_unless_forced(tmp_path):
  out = tmp_path / "out"
  publish.publish(out, {"t": tree()}, {"meta.json": "{}\n"})
  with pytest.raises(ConfigError, match="already exists; pass --force"):
    publish.publish(out, {"t": tree()}, {"meta.json": "{}\n"})
  publish.publish(out, {"t": tree()}, {"meta.json": '{"v": 2}\n'}, force=True)
  assert json.loads((out / "meta.json").read_text()) == {"v": 2}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("on_device", [False, True])
def test_publish_refuses_a_non_finite_tensor_and_writes_nothing(
  tmp_path, bad, on_device
):
  t = tree()
  t["b"]["c"][2] = bad
  if on_device:
    t = {"a": jnp.asarray(t["a"]), "b": {"c": jnp.asarray(t["b"]["c"])}}
  out = tmp_path / "out"
  with pytest.raises(publish.NonFinite) as e:
    publish.publish(out, {"t": t}, {"meta.json": "{}\n"})
  assert str(e.value) == (
    f"not writing {out}: tensor b/c holds NaN or inf; nothing was written "
    f"(check the inputs it was computed from)"
  )
  assert os.listdir(tmp_path) == []


def test_the_first_non_finite_tensor_is_named_in_tree_order():
  t = {"x": np.ones(3, np.float32), "y": np.ones(3), "z": np.ones(3)}
  t["z"][0] = t["y"][1] = np.nan
  assert publish.first_nonfinite(t) == "y"
  assert publish.first_nonfinite({"i": np.arange(3)}) is None  # integers


def test_bfloat16_and_large_tensors_are_checked_in_slices(monkeypatch):
  monkeypatch.setattr(publish, "_CHUNK", 7)
  x = np.zeros(100, ml_dtypes.bfloat16)
  assert publish.first_nonfinite({"w": x}) is None
  x[99] = np.inf
  assert publish.first_nonfinite({"w": x}) == "w"


def test_log_probabilities_may_be_minus_inf_never_nan():
  lp = np.array([-0.1, -np.inf], np.float32)
  assert publish.first_nonfinite({"lp": lp}, log_probs=True) is None
  assert publish.first_nonfinite({"lp": lp}) == "lp"
  lp[0] = np.nan
  assert publish.first_nonfinite({"lp": lp}, log_probs=True) == "lp"


def test_a_non_finite_leaf_of_a_source_names_that_source(tmp_path):
  with pytest.raises(publish.NonFinite, match=r"tensor w of src/ holds NaN"):
    publish.check_finite_leaf(np.array([np.nan]), "w", tmp_path, "src/")


def test_every_format_publishes_through_it(tmp_path):
  params = random_params(CFG, seed=0)
  params["final_norm"]["scale"] = params["final_norm"]["scale"].copy()
  params["final_norm"]["scale"][0] = np.nan
  with pytest.raises(publish.NonFinite, match="final_norm/scale"):
    native.save(tmp_path / "n", params, CFG)
  with pytest.raises(publish.NonFinite, match="final_norm/scale"):
    fisher.save(tmp_path / "f", params, CFG, {})
  assert os.listdir(tmp_path) == []


def test_an_adapter_with_a_nan_is_not_written(tmp_path):
  import dataclasses

  from gemma_jax.model import lora

  cfg = dataclasses.replace(CFG, lora=lora.LoraConfig(rank=2))
  adapters = {
    p: np.zeros(s, np.float32) for p, s in lora.adapter_paths(cfg).items()
  }
  first = next(iter(adapters))
  adapters[first][(0,) * adapters[first].ndim] = np.inf
  from gemma_jax.checkpoint import layout

  with pytest.raises(publish.NonFinite, match=first):
    adapter.save(tmp_path / "a", layout.unflatten(adapters), cfg)
  assert os.listdir(tmp_path) == []
