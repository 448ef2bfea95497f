"""native.save / native.load: params + model config, atomic, shape-checked."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from gemma_jax.checkpoint import layout, native
from gemma_jax.checkpoint.testing import random_params
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.model import Transformer, preset


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2"])
def test_layout_matches_the_model(name):
  cfg = preset(name, num_layers=2)
  variables = jax.eval_shape(
    Transformer(cfg).init, jax.random.key(0), np.zeros((1, 4), np.int32)
  )
  params = jax.tree.map(lambda x: x, variables["params"])
  from flax.linen import meta

  found = {p: tuple(x.shape) for p, x in layout.flatten(meta.unbox(params))}
  assert found == layout.param_shapes(cfg)


def test_round_trip_needs_only_the_directory(tmp_path):
  cfg = preset("tiny-gemma2", num_layers=2)
  params = random_params(cfg)
  native.save(tmp_path / "ck", params, cfg)
  loaded, loaded_cfg = native.load(tmp_path / "ck")
  assert loaded_cfg == cfg
  loaded = dict(layout.flatten(loaded))
  for path, value in layout.flatten(params):
    assert isinstance(loaded[path], np.ndarray)
    np.testing.assert_array_equal(loaded.pop(path), value)
  assert not loaded
  # Only the checkpoint is left behind: no temporary siblings.
  assert [x.name for x in tmp_path.iterdir()] == ["ck"]


def test_relative_paths_work(tmp_path, monkeypatch):
  cfg = preset("tiny-gemma", num_layers=1)
  params = random_params(cfg)
  monkeypatch.chdir(tmp_path)
  native.save("rel", params, cfg)
  loaded, _ = native.load("rel")
  np.testing.assert_array_equal(
    loaded["final_norm"]["scale"], params["final_norm"]["scale"]
  )


def test_load_onto_a_mesh_with_a_dtype(tmp_path):
  cfg = preset("tiny-gemma", num_layers=2)
  native.save(tmp_path / "ck", random_params(cfg), cfg)
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))

  def sharding(x):
    spec = (
      PartitionSpec("fsdp")
      if x.shape[0] % jax.device_count() == 0
      else PartitionSpec()
    )
    return NamedSharding(mesh, spec)

  shardings = jax.tree.map(sharding, random_params(cfg))
  loaded, _ = native.load(tmp_path / "ck", shardings, dtype=jax.numpy.bfloat16)
  emb = loaded["embedder"]["embedding"]
  assert emb.dtype == jax.numpy.bfloat16
  assert emb.sharding == shardings["embedder"]["embedding"]


def test_refuses_to_overwrite_without_force(tmp_path):
  cfg = preset("tiny-gemma", num_layers=2)
  native.save(tmp_path / "ck", random_params(cfg, 0), cfg)
  with pytest.raises(ConfigError, match="already exists"):
    native.save(tmp_path / "ck", random_params(cfg, 1), cfg)
  native.save(tmp_path / "ck", random_params(cfg, 1), cfg, force=True)
  loaded, _ = native.load(tmp_path / "ck")
  np.testing.assert_array_equal(
    loaded["final_norm"]["scale"], random_params(cfg, 1)["final_norm"]["scale"]
  )
  assert sorted(x.name for x in tmp_path.iterdir()) == ["ck"]


def test_wrong_shapes_name_the_tensor(tmp_path):
  cfg = preset("tiny-gemma", num_layers=2)
  params = random_params(cfg)
  params["layers"]["mlp"]["linear"]["w"] = np.zeros((2, 3, 64), np.float32)
  with pytest.raises(
    CheckpointError,
    match=r"layers/mlp/linear/w: expected shape \(2, 256, 64\)"
    r", found \(2, 3, 64\)",
  ):
    native.save(tmp_path / "ck", params, cfg)
  assert not (tmp_path / "ck").exists()


def test_config_that_does_not_match_the_weights(tmp_path):
  cfg = preset("tiny-gemma", num_layers=2)
  native.save(tmp_path / "ck", random_params(cfg), cfg)
  cfg_file = tmp_path / "ck" / native.CONFIG_FILE
  data = json.loads(cfg_file.read_text())
  data["model"]["num_layers"] = 3
  cfg_file.write_text(json.dumps(data))
  with pytest.raises(
    CheckpointError,
    match=r"layers/attn/q_einsum/w: expected"
    r" shape \(3, 4, 64, 16\), found \(2, 4, 64, 16\)",
  ):
    native.load(tmp_path / "ck")


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="not a native gemma_jax"):
    native.load(tmp_path)
