"""Any checkpoint format, detected, loaded straight into device shards."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.checkpoint import formats, hf, kaggle, native
from gemma_jax.checkpoint.fingerprint import fingerprint
from gemma_jax.checkpoint.testing import official_checkpoint
from gemma_jax.errors import CheckpointError
from gemma_jax.model.testing import TINY_GEMMA2_PADDED
from gemma_jax.sharding import rules
from gemma_jax.sharding.config import MeshConfig
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train.state import abstract_params

KAGGLE = TINY_GEMMA2_PADDED


def shardings(cfg):
  """fsdp x tensor = 4 x 2: every kind of leaf is split somewhere."""
  mesh_cfg = MeshConfig(ici_data=1, ici_fsdp=4, ici_tensor=2)
  mesh = make_mesh(mesh_cfg, jax.devices()[:8])
  specs, _ = rules.mesh_specs(abstract_params(cfg), mesh, mesh_cfg)
  return rules.named(mesh, specs)


def assert_placed(params, want, where, dtype):
  for (path, x), y, s in zip(
    jax.tree_util.tree_leaves_with_path(params),
    jax.tree.leaves(want),
    jax.tree.leaves(where),
  ):
    assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
    assert x.dtype == dtype
    np.testing.assert_array_equal(
      np.asarray(x), np.asarray(y, dtype), err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.slow
def test_hf_loads_into_shards_with_padded_rows_as_the_host_load(hf_dir):
  src, _, _ = hf_dir()
  # A 160-row table for the 128-token vocabulary: the padding stays 0.
  cfg = dataclasses.replace(hf.load_config(src), embed_rows=160)
  host, _ = hf.load(src, cfg)
  where = shardings(cfg)
  params = formats.load(src, cfg, shardings=where, dtype=jnp.bfloat16)
  assert formats.detect(src) == "hf"
  assert_placed(params, host, where, jnp.bfloat16)
  assert not np.asarray(params["embedder"]["embedding"][128:]).any()


@pytest.mark.slow
def test_kaggle_loads_into_shards_as_the_host_load(tmp_path):
  official_checkpoint(tmp_path / "k", KAGGLE, transposed_gating=False)
  host = kaggle.load(tmp_path / "k", KAGGLE)
  where = shardings(KAGGLE)
  assert formats.detect(tmp_path / "k") == "kaggle"
  assert_placed(
    formats.load(tmp_path / "k", KAGGLE, shardings=where),
    host,
    where,
    jnp.float32,
  )


def test_native_is_detected_and_another_model_is_refused(tmp_path):
  official_checkpoint(tmp_path / "k", KAGGLE, transposed_gating=False)
  host = kaggle.load(tmp_path / "k", KAGGLE)
  native.save(tmp_path / "n", host, KAGGLE)
  assert formats.detect(tmp_path / "n") == "native"
  where = shardings(KAGGLE)
  assert_placed(
    formats.load(tmp_path / "n", KAGGLE, shardings=where),
    host,
    where,
    jnp.float32,
  )
  wider = dataclasses.replace(KAGGLE, mlp_dim=64)
  with pytest.raises(
    CheckpointError,
    match=r"layers/mlp/gating_einsum/w "
    r"has shape \(2, 2, 32, 48\) there and \(2, 2, 32, 64\)",
  ):
    formats.load(tmp_path / "n", wider)
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="cannot tell its format"):
    formats.detect(tmp_path / "empty")


def test_fingerprint_follows_content_not_location(tmp_path, hf_dir):
  import shutil

  src, _, state = hf_dir()
  first = fingerprint(src)
  shutil.copytree(src, tmp_path / "copy")
  assert fingerprint(tmp_path / "copy") == first
  # The same shapes with other values: another fingerprint.
  from safetensors.numpy import save_file

  state = {k: v + 1 for k, v in state.items()}
  save_file(state, str(tmp_path / "copy" / "model.safetensors"))
  assert fingerprint(tmp_path / "copy") != first


def test_a_half_written_directory_is_incomplete_not_unknown(tmp_path):
  from gemma_jax.checkpoint import formats
  from gemma_jax.errors import CheckpointError

  native_dir = tmp_path / "native"
  (native_dir / "params").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="model_config.json is missing"):
    formats.detect(native_dir)
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "model.safetensors").write_bytes(b"")
  with pytest.raises(CheckpointError, match="incomplete: config.json is"):
    formats.detect(hf_dir)
  (tmp_path / ".gone.tmp").mkdir()
  with pytest.raises(CheckpointError, match=r"interrupted \(.gone.tmp"):
    formats.detect(tmp_path / "gone")
