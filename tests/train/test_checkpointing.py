"""Training checkpoints: round trip, keep-N, atomicity, restore on a new mesh."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma_jax.errors import CheckpointError
from gemma_jax.train.checkpointing import Checkpointer
from gemma_jax.train.config import CheckpointConfig


@struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def _state(mesh, step=0):
  sharding = NamedSharding(mesh, P(mesh.axis_names[0], None))
  w = jax.device_put(jnp.arange(64.0).reshape(16, 4) + step, sharding)
  params = {"w": w}
  return State(step=jnp.array(step), params=params,
               opt_state=optax.adam(1e-3).init(params),
               rng=jax.random.key(step))


def _abstract(tree):
  """ShapeDtypeStructs of `tree`'s arrays with their shardings."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


def test_save_restore_round_trip_with_meta(tmp_path):
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig(save_every=2, keep=3))
  state = _state(_mesh(8), step=4)
  ckpt.save(4, state, {"data": {"sources": ["a"]}})
  ckpt.wait()
  assert ckpt.latest_step() == 4
  abstract = _abstract(state)
  restored = ckpt.restore(abstract)
  np.testing.assert_array_equal(restored.state.params["w"], state.params["w"])
  assert jax.random.key_data(restored.state.rng).tolist() == \
      jax.random.key_data(state.rng).tolist()
  assert restored.meta["data"] == {"sources": ["a"]}
  assert restored.meta["step"] == 4
  assert ckpt.restore_meta()["step"] == 4
  ckpt.close()


def test_keep_and_an_existing_step_is_never_overwritten(tmp_path):
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig(keep=2))
  mesh = _mesh(8)
  for step in (2, 4, 6, 7):
    ckpt.save(step, _state(mesh, step), {})
  with pytest.raises(CheckpointError, match="7 already exists"):
    ckpt.save(7, _state(mesh, 8), {})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
  assert ckpt.all_steps() == [6, 7]
  ckpt.close()


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig(save_every=1))
  state = _state(_mesh(8), 1)
  ckpt.save(1, state, {})
  ckpt.close()
  # What a process killed while writing step 2 leaves behind.
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234" / "state"
  partial.mkdir(parents=True)
  (partial / "garbage").write_bytes(b"\0" * 10)
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig(save_every=1))
  assert ckpt.latest_step() == 1
  abstract = _abstract(state)
  restored = ckpt.restore(abstract)
  np.testing.assert_array_equal(restored.state.params["w"], state.params["w"])
  ckpt.close()


def test_restore_onto_a_smaller_mesh(tmp_path):
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig(save_every=1))
  state = _state(_mesh(8), 3)
  ckpt.save(3, state, {})
  ckpt.close()
  mesh4 = _mesh(4)
  target = _state(mesh4, 0)
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
  restored = ckpt.restore(_abstract(target))
  ckpt.close()
  w = restored.state.params["w"]
  assert w.sharding.mesh.devices.size == 4
  np.testing.assert_array_equal(w, state.params["w"])


def test_restore_into_a_different_shape_names_the_fix(tmp_path):
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig(save_every=1))
  state = _state(_mesh(8), 1)
  ckpt.save(1, state, {})
  ckpt.close()
  wrong = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((32, 4), x.dtype, sharding=x.sharding)
      if x.shape == (16, 4) else
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
  with pytest.raises(CheckpointError, match="does not match"):
    ckpt.restore(wrong)
  ckpt.close()


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  ckpt = Checkpointer(str(tmp_path), CheckpointConfig())
  with pytest.raises(CheckpointError, match="no checkpoint"):
    ckpt.restore_meta()
  ckpt.close()
