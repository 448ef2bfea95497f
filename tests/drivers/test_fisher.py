"""The Fisher estimate: equal to the definition computed row by row, on any
mesh, with exact summary statistics."""

import jax
import numpy as np
import pytest

from gemma_jax.drivers import fisher, fisher_data
from gemma_jax.errors import ConfigError
from gemma_jax.model.testing import TINY_GEMMA2_GQA, model_section
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train import step as step_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram

pytestmark = pytest.mark.slow

MODEL = model_section(TINY_GEMMA2_GQA)
T = 12


class ArrayRows:
  """Rows of random tokens; row 3 has no targets (it must not count)."""

  def __init__(self, n, seed=0):
    rng = np.random.default_rng(seed)
    self.num_rows = n
    self.rows = []
    for i in range(n):
      length = T - i % 4
      row = {k: np.zeros(T, np.int32) for k in fisher.UNIT_KEYS}
      row["inputs"][:length] = rng.integers(3, 128, length)
      row["targets"][:length] = rng.integers(3, 128, length)
      row["segment_ids"][:length] = 1
      row["positions"][:length] = np.arange(length)
      row["loss_mask"][i % 3 : length] = 0 if i == 3 else 1
      self.rows.append(row)

  def row(self, i):
    return self.rows[i]


def program(mesh=None, devices=1):
  cfg = config_from_dict(
    {
      "model": MODEL,
      "mesh": mesh or {},
      "data": {
        "seq_len": T,
        "sources": {"a": {"kind": "memory", "texts": ["x"]}},
      },
      "train": {"batch_size": 8},
    }
  )
  return TrainProgram(cfg, make_mesh(cfg.mesh, jax.devices()[:devices]))


def random_params(prog, seed=1):
  """Params of the program's shapes (any values will do), on its devices."""
  rng = np.random.default_rng(seed)
  shapes = jax.tree.map(lambda s: s.shape, prog.abstract_state.params)
  values = jax.tree.map(
    lambda s: (0.3 * rng.standard_normal(s)).astype(np.float32),
    shapes,
    is_leaf=lambda x: isinstance(x, tuple),
  )
  return jax.device_put(values, prog.param_shardings)


@pytest.fixture(scope="module")
def one_device():
  prog = program()
  return prog, random_params(prog)


@pytest.fixture(scope="module")
def row_grads(one_device):
  """The gradient of each row's log-likelihood of ArrayRows(7), one row at
  a time (numpy trees; None for the row without targets)."""
  prog, params = one_device
  forward = step_lib.model_forward(prog.model)

  @jax.jit
  def grad(p, unit):
    def loglik(p):
      ce, _ = step_lib.token_losses(forward(p, {}, unit), unit, 0.0)
      return -ce.sum()

    return jax.grad(loglik)(p)

  rows = ArrayRows(7)
  return [
    jax.device_get(grad(params, {k: v[None] for k, v in r.items()}))
    if r["loss_mask"].any()
    else None
    for r in rows.rows
  ]


def mean_square(grads):
  return jax.tree.map(lambda *g: np.mean(np.square(g), axis=0), *grads)


@pytest.fixture(scope="module")
def per_example(one_device):
  return run(
    *one_device, ArrayRows(7), fisher.Estimator("per_example"), units_per_step=4
  )


def run(prog, params, rows, estimator, units_per_step=None, rows_per_vmap=1):
  fprog = fisher.FisherProgram(prog, estimator, units_per_step, rows_per_vmap)
  steps = fisher_data.num_steps(
    rows, estimator.rows_per_unit, fprog.units_per_step
  )
  batches = fisher_data.unit_batches(
    rows, estimator.rows_per_unit, fprog.units_per_step
  )
  values, info = fisher.estimate(fprog, params, batches, steps)
  return jax.device_get(values), info


def assert_trees_close(a, b, rtol=1e-5):
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  ):
    # Entries far below a leaf's largest are sums that cancel (the tied
    # embedding's two gradients): float32 round-off there is relative to the
    # leaf, not to the entry.
    np.testing.assert_allclose(
      x,
      y,
      rtol=rtol,
      atol=1e-7 * np.abs(y).max(),
      err_msg=jax.tree_util.keystr(path),
    )


def test_per_example_is_the_mean_squared_row_gradient(per_example, row_grads):
  got, info = per_example
  real = [g for g in row_grads if g is not None]
  assert info["units"] == len(real) == 6  # the row without targets: no
  assert_trees_close(got, mean_square(real))


def test_batch_mean_squares_the_mean_gradient_of_each_group(
  one_device, row_grads
):
  got, info = run(
    *one_device,
    ArrayRows(7),
    fisher.Estimator("batch_mean", 3),
    units_per_step=2,
  )
  # Groups: rows 0-2; 4-5 (row 3 has no targets); 6 alone.
  groups = [[row_grads[i] for i in g] for g in ((0, 1, 2), (4, 5), (6,))]
  means = [jax.tree.map(lambda *g: np.mean(g, axis=0), *g) for g in groups]
  assert info["units"] == 3
  assert_trees_close(got, mean_square(means))
  # Squaring means of up to 3 gradients: well below the per-row Fisher.
  per_row = mean_square([g for g in row_grads if g is not None])
  ratio = sum(x.sum() for x in jax.tree.leaves(per_row)) / sum(
    x.sum() for x in jax.tree.leaves(got)
  )
  assert 1.5 < ratio < 3.5


def test_eight_devices_and_vmapped_rows_match_one_device(
  one_device, per_example
):
  _, params = one_device
  sharded = program({"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2}, 8)
  placed = jax.device_put(jax.device_get(params), sharded.param_shardings)
  got, info = run(
    sharded,
    placed,
    ArrayRows(7),
    fisher.Estimator("per_example"),
    rows_per_vmap=2,
  )
  assert info["units"] == 6
  assert_trees_close(got, per_example[0])
  for x in jax.tree.leaves(got):
    assert x.dtype == np.float32


def test_units_per_step_must_fill_every_batch_shard(one_device):
  sharded = program({"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2}, 8)
  with pytest.raises(ConfigError, match="multiple of 8"):
    fisher.FisherProgram(
      sharded, fisher.Estimator(), units_per_step=6, rows_per_vmap=2
    )
  with pytest.raises(ConfigError, match="batch_mean"):
    fisher.Estimator("per_example", 4)


def test_top_share_and_summary_are_exact(one_device):
  prog, _ = one_device
  rng = np.random.default_rng(0)
  shapes = jax.tree.map(lambda s: s.shape, prog.abstract_state.params)
  values = jax.tree.map(
    lambda s: rng.exponential(size=s).astype(np.float32) ** 3,
    shapes,
    is_leaf=lambda x: isinstance(x, tuple),
  )
  values["final_norm"]["scale"][:5] = 7.0  # ties at the top
  tree = jax.device_put(values, prog.param_shardings)
  flat = np.concatenate([x.ravel() for x in jax.tree.leaves(values)])
  k = int(np.ceil(0.01 * flat.size))
  want = np.sort(flat)[::-1][:k].sum() / flat.sum()
  assert fisher.top_share(tree, 0.01) == pytest.approx(want, rel=1e-5)
  stats = fisher.summary(tree)
  assert stats["entries"] == flat.size
  assert stats["mean"] == pytest.approx(flat.mean(), rel=1e-5)
  q = values["layers"]["attn"]["q_einsum"]["w"]
  assert stats["per_kind"]["layers/attn/q_einsum/w"][
    "per_layer"
  ] == pytest.approx(q.reshape(q.shape[0], -1).mean(axis=1), rel=1e-5)


def test_units_split_over_processes_make_the_same_steps():
  rows = ArrayRows(10)
  whole = list(fisher_data.unit_batches(rows, 2, 4))
  parts = [list(fisher_data.unit_batches(rows, 2, 4, p, 2)) for p in (0, 1)]
  assert len(whole) == 2 == fisher_data.num_steps(rows, 2, 4)
  for k, batch in enumerate(whole):
    assert batch["inputs"].shape == (4, 2, T)
    for key in fisher.UNIT_KEYS:
      np.testing.assert_array_equal(
        batch[key], np.concatenate([parts[0][k][key], parts[1][k][key]])
      )
  # Rows past the end are padding without targets.
  assert whole[1]["loss_mask"][1:].sum() == 0
