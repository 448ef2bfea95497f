"""The sharded train step: same numbers on any mesh, loss over real targets."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.model.testing import TINY_GEMMA2_SHARDED, model_section
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram

MODEL = model_section(TINY_GEMMA2_SHARDED)
ROWS, T = 8, 16


SOURCES = {name: {"kind": "memory", "texts": ["x"]} for name in ("a", "b")}


def run_config(mesh=None, **train):
  return config_from_dict(
    {
      "model": MODEL,
      "mesh": mesh or {},
      "data": {"seq_len": T, "sources": SOURCES},
      "optimizer": {"learning_rate": 1e-2, "warmup_steps": 1},
      "train": {"batch_size": ROWS, "steps": 3, "z_loss": 1e-4} | train,
    }
  )


def packed_batch(seed=0):
  """Rows of two packed documents with trailing padding (segment 0)."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, 256, (ROWS, T))
  targets = rng.integers(3, 256, (ROWS, T))
  segments = np.ones((ROWS, T), np.int64)
  positions = np.tile(np.arange(T), (ROWS, 1))
  loss_mask = np.ones((ROWS, T), np.int64)
  for r in range(ROWS):
    cut, pad = 3 + r, T - r // 2
    segments[r, cut:] = 2
    positions[r, cut:] -= cut
    segments[r, pad:] = positions[r, pad:] = loss_mask[r, pad:] = 0
    loss_mask[r, cut - 1] = 0  # the last token of a document has no target
  batch = dict(
    inputs=inputs,
    targets=targets,
    segment_ids=segments,
    positions=positions,
    loss_mask=loss_mask,
    source=np.arange(ROWS) % 2,
  )
  return {k: np.asarray(v, np.int32) for k, v in batch.items()}


def train(program, step, steps=3):
  state = program.init_state(seed=0)
  losses = []
  for i in range(steps):
    state, metrics = step(state, program.put(packed_batch(i)))
    losses.append(metrics["loss"])
  return state, np.asarray(losses)


@pytest.fixture(scope="module")
def one_device():
  """(program, compiled train step) on one device, shared to compile once."""
  cfg = run_config()
  program = TrainProgram(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  return program, program.compile_train_step()


@pytest.fixture(scope="module")
def reference(one_device):
  """Params and losses after three steps on one device."""
  state, losses = train(*one_device)
  return jax.device_get(state.params), losses


MESHES = {
  "data8": ({"ici_data": 8}, {}),
  "fsdp8": ({"ici_data": 1, "ici_fsdp": 8}, {}),
  "tensor8": ({"ici_data": 1, "ici_tensor": 8}, {}),
  "2x2x2_microbatches": (
    {"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2},
    {"microbatches": 2},
  ),
  "two_slices": (
    {"ici_data": 1, "ici_fsdp": 2, "ici_tensor": 2, "dcn_data": 2},
    {},
  ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MESHES)
def test_sharded_steps_match_one_device(name, reference):
  mesh_cfg, train_cfg = MESHES[name]
  program = TrainProgram(run_config(mesh_cfg, **train_cfg))
  state, losses = train(program, program.compile_train_step())
  ref_params, ref_losses = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert losses[-1] < losses[0]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
    jax.device_get(state.params),
    ref_params,
  )
  # Parameters and optimizer state live where the rules put them.
  expected = program.state_shardings
  jax.tree.map(lambda x, e: assert_same_layout(x.sharding, e), state, expected)
  if name == "data8":
    assert_optimizer_state_sharded_over_data(state)


def assert_same_layout(actual, expected):
  assert actual.is_equivalent_to(expected, 5), (actual.spec, expected.spec)


def assert_optimizer_state_sharded_over_data(state):
  """ZeRO: every moment with a dimension divisible by 8 is split 8 ways."""
  adam = state.opt_state[1].inner_state[0]
  for x in jax.tree.leaves((adam.mu, adam.nu)):
    if any(d % 8 == 0 for d in x.shape):
      shard = x.sharding.shard_shape(x.shape)
      assert np.prod(shard) * 8 == x.size, (x.shape, x.sharding.spec)


@pytest.mark.slow
def test_loss_counts_only_real_targets(one_device):
  program, step = one_device
  state = program.init_state(seed=0)
  batch = packed_batch()

  @jax.jit  # one compile, not one per eager op
  def token_ce(params):
    logits = program.model.apply(
      {"params": params},
      batch["inputs"],
      batch["positions"],
      batch["segment_ids"],
    )
    return -jnp.take_along_axis(
      jax.nn.log_softmax(logits), batch["targets"][..., None], -1
    )[..., 0]

  ce = np.asarray(token_ce(state.params))
  mask = batch["loss_mask"]
  want = float((ce * mask).sum() / mask.sum())
  out = program.eval_step(state.params, program.put(batch))
  assert float(out["loss_sum"] / out["tokens"]) == pytest.approx(want, 1e-5)
  assert int(out["tokens"]) == mask.sum()
  per_source = [(ce * mask)[batch["source"] == s].sum() for s in (0, 1)]
  np.testing.assert_allclose(out["source_loss_sum"], per_source, rtol=1e-5)
  # Targets where loss_mask is 0 (padding, document ends) change nothing.
  noisy = dict(batch, targets=np.where(mask == 1, batch["targets"], 7))
  first, m1 = step(state, program.put(batch))
  state = program.init_state(seed=0)
  second, m2 = step(state, program.put(noisy))
  assert float(m1["loss"]) == pytest.approx(want, 1e-5)
  assert float(m1["loss"]) == float(m2["loss"])
  jax.tree.map(np.testing.assert_array_equal, first.params, second.params)


@pytest.mark.slow
def test_metrics_and_a_skipped_non_finite_step(one_device):
  program, step = one_device
  state = program.init_state(seed=0)
  batch = program.put(packed_batch())
  state, m = step(state, batch)
  assert isinstance(m["loss"], jax.Array)  # no host sync forced
  assert float(m["learning_rate"]) == 0.0  # warmup starts at 0
  assert int(m["tokens"]) == int(packed_batch()["loss_mask"].sum())
  assert int(m["skipped"]) == 0 and float(m["grad_norm"]) > 0
  assert float(m["source_tokens"].sum()) == int(m["tokens"])
  poisoned = state.replace(
    params=jax.tree.map(
      lambda x: (
        x.at[...].multiply(jnp.nan) if x.ndim == 2 and x.shape[0] == 256 else x
      ),
      state.params,
    )
  )
  before = jax.device_get(poisoned)  # the step donates its input
  after, m = step(poisoned, batch)
  assert int(m["skipped"]) == 1 and int(after.nonfinite_in_row) == 1
  assert int(after.step) == 2
  # Nothing of the update is applied, the optimizer's count included.
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(after.params), before.params
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(after.opt_state),
    before.opt_state,
  )
  assert int(after.opt_state[1].count) == 1  # the injected schedule's
  # The reported rate is the one the schedule gives at the applied count.
  assert float(m["learning_rate"]) == pytest.approx(1e-2)


def test_batch_rows_must_split_over_shards_and_microbatches():
  with pytest.raises(ConfigError, match=r"8 rows .* divisible by 16"):
    TrainProgram(run_config({"ici_data": 8}, microbatches=2))


def logits_sized_buffers(compiled_text: str, rows: int, t: int, v: int):
  """Float buffers of the compiled HLO with a vocabulary axis and at least
  rows * t * v elements: the [B, T, V] logits, however laid out."""
  found = []
  for dtype, dims in re.findall(r"\b(f32|bf16|f16)\[([\d,]+)\]", compiled_text):
    shape = [int(d) for d in dims.split(",")]
    if v in shape and math.prod(shape) >= rows * t * v:
      found.append(f"{dtype}{shape}")
  return found


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, {"rank": 2}], ids=["plain", "lora"])
def test_the_fused_loss_keeps_the_logits_out_of_the_step(lora):
  # model.loss_chunk: the loss is computed in chunks of positions, so the
  # compiled step holds no [B, T, V] buffer; a LoRA step keeps that (its
  # forward is a view of the same Forward, fused loss included). Without
  # loss_chunk the logits are there: the check can see them. (A vocabulary
  # of 509 tokens: no other buffer has that axis.)
  import gemma_jax.features  # noqa: F401  (registers LoRA)

  v = 509

  def compiled_text(loss_chunk):
    model = {"loss_chunk": loss_chunk, "lora": lora, "vocab_size": v}
    cfg = config_from_dict(
      {
        "model": MODEL | model,
        "data": {"seq_len": T, "sources": SOURCES},
        "train": {"batch_size": ROWS, "steps": 1},
      }
    )
    program = TrainProgram(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    return program.lower_train_step().compile().as_text()

  assert not logits_sized_buffers(compiled_text(32), ROWS, T, v)
  assert logits_sized_buffers(compiled_text(0), ROWS, T, v)
