"""Every training feature on Gemma 3 (TINY_GEMMA3: QK-norm, five local
layers to one global over 7 layers, RoPE 10k local / 1M with linear scaling
8 global): LoRA, QAT, online distillation, EWC and the EMA of the weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.checkpoint import native
from gemma_jax.features import distill as distillation
from gemma_jax.features import ema as ema_lib
from gemma_jax.features import ewc as ewc_lib
from gemma_jax.features import lora
from gemma_jax.model import Transformer, quant
from gemma_jax.model import lora as lora_model
from gemma_jax.model.testing import TINY_GEMMA3, model_section
from gemma_jax.sharding import rules
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train import state as state_lib
from gemma_jax.train import step as step_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram

pytestmark = pytest.mark.slow

MODEL = model_section(TINY_GEMMA3)
ROWS, T, V = 4, 12, TINY_GEMMA3.vocab_size  # T > window 4
SOURCES = {"a": {"kind": "memory", "texts": ["x"]}}


def run_config(model=None, **sections):
  return config_from_dict(
    {
      "model": MODEL | (model or {}),
      "data": {"seq_len": T, "sources": SOURCES},
      "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0},
      "train": {"batch_size": ROWS, "steps": 2},
    }
    | sections
  )


def one_device(cfg) -> TrainProgram:
  return TrainProgram(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))


def packed_batch(seed=0):
  """Two documents per row (the second longer than the window), padding at
  the end of the last row."""
  rng = np.random.default_rng(seed)
  segments = np.ones((ROWS, T), np.int32)
  positions = np.tile(np.arange(T, dtype=np.int32), (ROWS, 1))
  for r in range(ROWS):
    cut = 2 + r
    segments[r, cut:] = 2
    positions[r, cut:] -= cut
  segments[-1, -3:] = positions[-1, -3:] = 0
  return dict(
    inputs=rng.integers(3, V, (ROWS, T), dtype=np.int32),
    targets=rng.integers(3, V, (ROWS, T), dtype=np.int32),
    segment_ids=segments,
    positions=positions,
    loss_mask=(segments > 0).astype(np.int32),
    source=np.zeros(ROWS, np.int32),
  )


def random_params(cfg, seed, scale=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (
      scale * rng.standard_normal(x.shape) / np.sqrt(x.shape[-1])
    ).astype(x.dtype),
    rules.values(state_lib.abstract_params(cfg)),
  )


def paths(tree) -> set[str]:
  return {
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_lora_trains_only_the_adapters_and_the_export_is_the_adapted_model(
  tmp_path, logits_of
):
  base_cfg = run_config()
  base = random_params(base_cfg.model, 7)
  native.save(tmp_path / "base", base, base_cfg.model)
  cfg = run_config(
    {"lora": {"rank": 4, "alpha": 8}},
    checkpoint={"init_from": str(tmp_path / "base")},
  )
  program = one_device(cfg)
  info = lora.install_base(program, cfg.checkpoint.init_from)
  state = program.init_state()
  step = program.compile_train_step()
  for i in range(2):
    state, metrics = step(state, program.put(packed_batch(i)))
    assert int(metrics["skipped"]) == 0
  trained = paths(state.params)
  assert trained and all("lora_" in p for p in trained)
  # QK-norm scales are in the frozen base, as loaded.
  assert "['layers']['attn']['query_norm']['scale']" in paths(
    program.frozen["base"]
  )
  for x, y in zip(
    jax.tree.leaves(program.frozen["base"]), jax.tree.leaves(base)
  ):
    np.testing.assert_array_equal(x, y)
  adapters = jax.device_get(state.params)
  assert np.abs(adapters["layers"]["mlp"]["linear"]["lora_down_b"]).max() > 0

  _, params_dir = lora.export(
    program, state.params, str(tmp_path / "out"), info
  )
  merged, merged_cfg = native.load(params_dir)
  assert merged_cfg == dataclasses.replace(cfg.model, lora=None)
  batch = packed_batch(5)
  adapted = logits_of(cfg.model, lora_model.combine(base, adapters), batch)
  np.testing.assert_allclose(
    logits_of(merged_cfg, merged, batch), adapted, atol=2e-5, rtol=1e-5
  )
  # The adapters changed the model.
  assert np.abs(logits_of(base_cfg.model, base, batch) - adapted).max() > 1e-3


QAT = {"quant": {"bits": 4, "block_size": 8, "targets": ["attn", "mlp"]}}


def test_qat_forward_is_the_integer_model_and_gradients_pass_straight(
  logits_of,
):
  float_cfg = run_config().model
  qat_cfg = run_config(QAT).model
  params = random_params(float_cfg, 3, scale=1.0)
  batch = packed_batch(1)
  int_cfg = dataclasses.replace(
    qat_cfg, quant=dataclasses.replace(qat_cfg.quant, weights="int")
  )
  int_params = jax.jit(quant.quantize_params, static_argnums=1)(params, int_cfg)
  snapped = jax.jit(quant.dequantize_params, static_argnums=(1, 2))(
    int_params, int_cfg, jnp.float32
  )
  qat = logits_of(qat_cfg, params, batch)
  np.testing.assert_allclose(
    logits_of(int_cfg, int_params, batch), qat, atol=1e-5
  )
  np.testing.assert_allclose(
    logits_of(float_cfg, snapped, batch), qat, atol=1e-5
  )
  assert np.abs(logits_of(float_cfg, params, batch) - qat).max() > 1e-2

  def loss(cfg):
    forward = step_lib.model_forward(Transformer(cfg))

    def fn(p):
      logits = forward(p, {}, batch)
      return step_lib.cross_entropy_sums(logits, batch, 1)["ce"]

    return jax.jit(jax.grad(fn))

  # Straight-through: QAT's gradient at the float weights is the float
  # model's gradient at the quantized weights, for every parameter
  # (QK-norm scales and the embedding included).
  got, want = loss(qat_cfg)(params), loss(float_cfg)(snapped)
  for (p, g), w in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
  ):
    assert np.abs(g).max() > 0, jax.tree_util.keystr(p)
    # Entries far below a leaf's largest are sums that cancel (the tied
    # embedding's two gradients): their float32 round-off is relative to
    # the leaf (as in tests/drivers/test_fisher.py), not to the entry.
    np.testing.assert_allclose(
      g,
      w,
      rtol=1e-4,
      atol=max(1e-6, 1e-5 * np.abs(w).max()),
      err_msg=jax.tree_util.keystr(p),
    )


TEACHER = MODEL | {"num_layers": 8, "d_model": 48, "mlp_dim": 96}


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_online_distillation_from_a_larger_gemma3_is_the_formula(
  logits_of, host_init
):
  tau, alpha = 2.0, 0.3
  cfg = run_config(
    distill={
      "teacher_model": TEACHER,
      "teacher_dtype": "float32",
      "alpha": alpha,
      "temperature": tau,
    }
  )
  program = one_device(cfg)
  teacher_cfg = distillation.installed_teacher_config(program)
  teacher = random_params(teacher_cfg, 1)
  program.frozen["teacher"] = jax.device_put(
    teacher, program.frozen_shardings["teacher"]
  )
  state = host_init(program, 0)
  batch = packed_batch(3)
  student = logits_of(cfg.model, jax.device_get(state.params), batch)
  teacher_logits = logits_of(teacher_cfg, teacher, batch)
  mask = batch["loss_mask"]
  ce = -np.take_along_axis(
    log_softmax(student), batch["targets"][..., None], -1
  )[..., 0]
  p_t = np.exp(log_softmax(np.asarray(teacher_logits) / tau))
  d = -tau * tau * (p_t * log_softmax(np.asarray(student) / tau)).sum(-1)
  _, m = program.compile_train_step()(state, program.put(batch))
  tokens = mask.sum()
  assert float(m["loss/distill"]) == pytest.approx(
    (d * mask).sum() / tokens, rel=1e-5
  )
  assert float(m["loss/ce"]) == pytest.approx(
    (ce * mask).sum() / tokens, rel=1e-5
  )


def sum_of_squares(tree) -> float:
  """On the host: one eager op per leaf shape would compile each."""
  return sum(
    float(np.sum(np.square(x, dtype=np.float64)))
    for x in jax.tree.leaves(jax.device_get(tree))
  )


def test_self_distillation_has_zero_gradient():
  cfg = run_config().model
  params = random_params(cfg, 0)
  model = Transformer(cfg)
  loss_fn = distillation.distill_loss(
    step_lib.model_forward(model),
    distillation.online_token_losses(model, temperature=1.0),
    num_sources=1,
    alpha=1.0,
  )
  grad = jax.jit(jax.grad(loss_fn, has_aux=True))
  batch = packed_batch()
  grads, sums = grad(params, batch, {"teacher": params})
  assert float(sums["terms"]["distill"]) > 1.0  # the teacher's entropy
  assert np.sqrt(sum_of_squares(grads)) < 1e-5
  other = jax.tree.map(lambda x: x * 1.1, params)
  grads, _ = grad(params, batch, {"teacher": other})
  assert sum_of_squares(grads) > 1e-4


def ewc_config(lam):
  return run_config(
    continual={"ewc_lambda": lam, "fisher": "/nonexistent/fisher"},
    checkpoint={"init_from": "/nonexistent/base"},
  )


DECAY = 0.5


@pytest.fixture(scope="module")
def plain():
  """The plain step (with an EMA of the weights), compiled once."""
  program = one_device(
    run_config(train={"batch_size": ROWS, "ema_decay": DECAY})
  )
  return program, program.compile_train_step()


def test_ewc_penalty_is_zero_at_the_anchor_then_the_formula(plain):
  lam = 50.0
  program = one_device(ewc_config(lam))
  start = random_params(program.cfg.model, 4)
  rng = np.random.default_rng(5)
  fisher = jax.tree.map(
    lambda x: np.abs(rng.standard_normal(x.shape)).astype(np.float32), start
  )
  ewc = {"anchor": start, "fisher": fisher}
  program.frozen["ewc"] = jax.device_put(
    ewc, dict.fromkeys(ewc, program.param_shardings)
  )

  def two_steps(program, step):
    state = program.init_state(
      params=jax.device_put(start, program.param_shardings)
    )
    out = []
    for i in range(2):
      state, m = step(state, program.put(packed_batch(i)))
      out.append((jax.device_get(state.params), jax.device_get(m)))
    return out

  (ewc_1, m1), (_, m2) = two_steps(program, program.compile_train_step())
  (plain_1, p1), _ = two_steps(*plain)  # its EMA does not change the params
  # At the anchor the penalty and its gradient are zero: the plain step.
  assert float(m1["loss/ewc"]) == 0.0
  assert float(m1["loss"]) == pytest.approx(float(p1["loss"]), rel=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), ewc_1, plain_1
  )
  # One step away it is lambda / 2 * sum F (theta - anchor)^2.
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  want = lam / 2 * np.sum(flat(fisher) * (flat(ewc_1) - flat(start)) ** 2)
  assert want > 0
  assert float(m2["loss/ewc"]) == pytest.approx(want, rel=1e-4)
  penalty = jax.jit(ewc_lib.penalty, static_argnums=2)
  assert float(penalty(ewc_1, ewc, lam)) == pytest.approx(want, rel=1e-5)


def test_the_ema_follows_the_params_step_by_step(plain, host_init):
  decay = DECAY
  program, step = plain
  state = host_init(program, 0)
  seen = [jax.device_get(state.params)]
  for i in range(3):
    state, _ = step(state, program.put(packed_batch(i)))
    seen.append(jax.device_get(state.params))
  ema = jax.device_get(ema_lib.params_of(program, state))
  # Debiased: update n uses decay 1 - (1 - d) / (1 - d^n); the first one
  # takes the params, the rest average.
  want = seen[1]
  for n, params in enumerate(seen[2:], start=2):
    d = 1 - (1 - decay) / (1 - decay**n)
    want = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, want, params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    ema,
    want,
  )
  assert any(
    np.abs(a - b).max() > 0
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(seen[-1]))
  )
