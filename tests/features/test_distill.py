"""Distillation in the train step: the objective against NumPy, its gradient,
one device against a sharded mesh, the EMA of the weights, bad teachers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.features import distill as distillation
from gemma_jax.features import ema
from gemma_jax.model import Transformer
from gemma_jax.model.testing import TINY_GEMMA2_GQA, model_section
from gemma_jax.sharding import rules
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train import state as state_lib
from gemma_jax.train import step as step_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram

pytestmark = pytest.mark.slow

STUDENT = model_section(TINY_GEMMA2_GQA)
TEACHER = STUDENT | {"num_layers": 3, "d_model": 48, "mlp_dim": 96}
ROWS, T = 8, 16
SOURCES = {name: {"kind": "memory", "texts": ["x"]} for name in ("a", "b")}


def run_config(teacher=None, mesh=None, distill=None, **train):
  """A student config; with `teacher` (a model section) online distillation
  from float32 teacher params placed by `with_teacher`."""
  return config_from_dict(
    {
      "model": STUDENT,
      "mesh": mesh or {},
      "data": {"seq_len": T, "sources": SOURCES},
      # eps 1e-3: float noise in near-zero gradients does not become
      # updates of +-lr (Adam), so meshes agree to float precision.
      "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0, "eps": 1e-3},
      "train": {"batch_size": ROWS, "steps": 3} | train,
      "distill": (
        {"teacher_model": teacher, "teacher_dtype": "float32"} | (distill or {})
      )
      if teacher
      else {},
    }
  )


def packed_batch(seed=0):
  """Two documents per row, padding at the end, a few masked targets."""
  rng = np.random.default_rng(seed)
  segments = np.ones((ROWS, T), np.int32)
  positions = np.tile(np.arange(T, dtype=np.int32), (ROWS, 1))
  mask = np.ones((ROWS, T), np.int32)
  for r in range(ROWS):
    cut, pad = 3 + r, T - r // 2
    segments[r, cut:] = 2
    positions[r, cut:] -= cut
    segments[r, pad:] = positions[r, pad:] = mask[r, pad:] = 0
    mask[r, cut - 1] = 0
  return dict(
    inputs=rng.integers(3, 128, (ROWS, T), dtype=np.int32),
    targets=rng.integers(3, 128, (ROWS, T), dtype=np.int32),
    segment_ids=segments,
    positions=positions,
    loss_mask=mask,
    source=np.arange(ROWS, dtype=np.int32) % 2,
  )


def random_params(model, seed):
  """Random params of a model section (quicker than initialising it)."""
  cfg = config_from_dict({"model": model}).model
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (
      0.3 * rng.standard_normal(x.shape) / np.sqrt(x.shape[-1])
    ).astype(x.dtype),
    rules.values(state_lib.abstract_params(cfg)),
  )


def with_teacher(cfg, params, devices=None):
  """A TrainProgram with `params` as its teacher, placed like a loaded
  checkpoint (loading itself: tests/features/test_distill_run.py)."""
  program = TrainProgram(
    cfg, None if devices is None else make_mesh(cfg.mesh, devices)
  )
  program.frozen["teacher"] = jax.device_put(
    params, program.frozen_shardings["teacher"]
  )
  return program


@pytest.fixture(scope="module")
def teacher():
  return random_params(TEACHER, 1)


ALPHA, TAU, Z, EMA = 0.3, 2.0, 1e-3, 0.5


def online_config(mesh=None):
  return run_config(
    TEACHER,
    mesh,
    distill={"alpha": ALPHA, "temperature": TAU},
    z_loss=Z,
    microbatches=2,
    ema_decay=EMA,
  )


@pytest.fixture(scope="module")
def one_device(teacher):
  """Online distillation with an EMA on one device, 2 microbatches."""
  program = with_teacher(online_config(), teacher, jax.devices()[:1])
  return program, program.compile_train_step()


def log_softmax(x):
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_objective_matches_numpy(one_device, host_init):
  program, step = one_device
  state = host_init(program, 0)
  batch = packed_batch()

  @jax.jit
  def forward_and_objective(params, frozen):
    apply = lambda model, p: model.apply(
      {"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    return (
      apply(program.model, params),
      apply(
        Transformer(distillation.installed_teacher_config(program)),
        frozen["teacher"],
      ),
      program.loss_fn(params, batch, frozen)[0],
    )

  student, teacher, total = jax.device_get(
    forward_and_objective(state.params, program.frozen)
  )
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  mask = batch["loss_mask"]
  ce = -np.take_along_axis(
    log_softmax(student), batch["targets"][..., None], -1
  )[..., 0]
  lse = np.log(np.exp(student).sum(-1))
  p_t = np.exp(log_softmax(teacher / TAU))
  d = -TAU * TAU * (p_t * log_softmax(student / TAU)).sum(-1)
  tokens = mask.sum()  # of the whole batch: both microbatches
  want = {
    "loss/distill": (d * mask).sum() / tokens,
    "loss/ce": (ce * mask).sum() / tokens,
    "z_loss": Z * (lse**2 * mask).sum() / tokens,
  }
  objective = (
    ALPHA * want["loss/distill"]
    + (1 - ALPHA) * want["loss/ce"]
    + want["z_loss"]
  )
  assert float(total) / tokens == pytest.approx(objective, rel=1e-5)
  _, m = step(state, program.put(batch))  # (donates the state)
  for key, value in want.items():
    assert float(m[key]) == pytest.approx(value, rel=1e-5), key
  assert float(m["loss"]) == float(m["loss/ce"])


def sum_of_squares(tree) -> float:
  """On the host: one eager op per leaf shape would compile each."""
  return sum(
    float(np.sum(np.square(x, dtype=np.float64)))
    for x in jax.tree.leaves(jax.device_get(tree))
  )


def test_gradient_is_zero_when_the_student_is_its_own_teacher():
  params = random_params(STUDENT, 0)
  model = Transformer(config_from_dict({"model": STUDENT}).model)
  loss_fn = distillation.distill_loss(
    step_lib.model_forward(model),
    distillation.online_token_losses(model, temperature=1.0),
    num_sources=2,
    alpha=1.0,
  )
  grad = jax.jit(jax.grad(loss_fn, has_aux=True))
  batch = packed_batch()
  grads, sums = grad(params, batch, {"teacher": params})
  assert float(sums["terms"]["distill"]) > 1.0  # the teacher's entropy
  assert np.sqrt(sum_of_squares(grads)) < 1e-5
  # ...and not zero against another teacher.
  other = jax.tree.map(lambda x: x * 1.1, params)
  grads, _ = grad(params, batch, {"teacher": other})
  assert sum_of_squares(grads) > 1e-4


def train(program, step, host_init, steps=2):
  state = host_init(program, 0)
  metrics = []
  for i in range(steps):
    state, m = step(state, program.put(packed_batch(i)))
    metrics.append({k: float(m[k]) for k in ("loss/distill", "loss/ce")})
    assert metrics[-1]["loss/distill"] > 0 and metrics[-1]["loss/ce"] > 0
  return jax.device_get(state), metrics


def test_sharded_online_distillation_matches_one_device(
  one_device, teacher, host_init
):
  one, ref = train(*one_device, host_init)
  mesh = {"ici_data": 1, "ici_fsdp": 2, "ici_tensor": 2}
  program = with_teacher(online_config(mesh), teacher, jax.devices()[:4])
  # The teacher is sharded by the same rules as a student of its shape.
  teacher = program.frozen["teacher"]["layers"]["mlp"]["linear"]["w"]
  assert (
    teacher.sharding.spec
    == program.param_shardings["layers"]["mlp"]["linear"]["w"].spec
  )
  assert teacher.dtype == jnp.float32
  sharded, got = train(program, program.compile_train_step(), host_init)
  for a, b in zip(got, ref):
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=2e-5), k
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
    (sharded.params, sharded.extras["ema"]),
    (one.params, one.extras["ema"]),
  )


def test_teacher_with_another_vocabulary_is_refused():
  with pytest.raises(
    ConfigError,
    match=r"96 tokens.*\(model.vocab_size\) "
    r"128",
  ):
    TrainProgram(
      run_config(TEACHER | {"vocab_size": 96}),
      make_mesh(run_config().mesh, jax.devices()[:1]),
    )


def test_ema_follows_the_applied_updates_and_skips_bad_steps(
  one_device, host_init
):
  program, step = one_device
  state = host_init(program, 0)
  assert all(
    x.dtype == jnp.float32 for x in jax.tree.leaves(state.extras["ema"])
  )
  seen = [jax.device_get(state.params)]
  for i in range(2):
    state, _ = step(state, program.put(packed_batch(i)))
    seen.append(jax.device_get(state.params))
  # Debiased: update n uses 1 - (1 - d) / (1 - d^n); update 1 copies.
  want = seen[0]
  for n, p in enumerate(seen[1:], 1):
    rate = (1 - EMA) / (1 - EMA**n)
    want = jax.tree.map(lambda e, x, r=rate: e + r * (x - e), want, p)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
    jax.device_get(state.extras["ema"]),
    want,
  )
  # A non-finite step leaves the EMA as it was.
  before = jax.device_get(state.extras["ema"])
  poison = jax.jit(lambda p: jax.tree.map(lambda x: x * jnp.nan, p))
  poisoned = state.replace(params=poison(state.params))
  after, m = step(poisoned, program.put(packed_batch()))
  assert int(m["skipped"]) == 1
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(after.extras["ema"]), before
  )
  ema_params = ema.params_of(program, after)
  assert jax.tree.map(
    lambda x: (x.dtype, x.sharding), ema_params
  ) == jax.tree.map(lambda x: (x.dtype, x.sharding), after.params)


def test_a_state_without_ema_keeps_its_layout():
  cfg = run_config()
  program = TrainProgram(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  state = program.abstract_state
  assert state.extras is None
  plain = (
    state.step,
    state.params,
    state.opt_state,
    state.rng,
    state.nonfinite_in_row,
  )
  assert (
    jax.tree.structure(state).num_leaves == jax.tree.structure(plain).num_leaves
  )
  assert [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(state)
  ][-1] == ".nonfinite_in_row"


def test_a_hugging_face_teacher_is_loaded_into_its_shards(hf_dir):
  path, _, state = hf_dir("gemma2_gqa_window")  # 3 layers, vocabulary 128
  cfg = config_from_dict(
    {
      "model": STUDENT,
      "mesh": {"ici_data": 1, "ici_fsdp": 2, "ici_tensor": 2},
      "data": {"seq_len": T, "sources": SOURCES},
      "train": {"batch_size": ROWS},
      "distill": {"teacher": str(path), "teacher_dtype": "bfloat16"},
    }
  )
  program = TrainProgram(cfg, make_mesh(cfg.mesh, jax.devices()[:4]))
  teacher = distillation.installed_teacher_config(program)
  assert teacher.num_layers == 3
  assert teacher.remat_policy == "none"
  distillation.attach(program, None, cfg.train.steps)
  teacher = program.frozen["teacher"]
  table = teacher["embedder"]["embedding"]
  assert table.dtype == jnp.bfloat16
  assert (
    table.sharding
    == program.frozen_shardings["teacher"]["embedder"]["embedding"]
  )
  np.testing.assert_array_equal(
    np.asarray(table, np.float32),
    state["model.embed_tokens.weight"].astype(jnp.bfloat16).astype(np.float32),
  )
