"""EWC: the penalty is the formula, lambda 0 is the plain step, any mesh
gives the same step, and a bad Fisher or a changed one is refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.checkpoint import fisher as fisher_store
from gemma_jax.checkpoint import layout
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.features import ewc as ewc_lib
from gemma_jax.model.config import ModelConfig
from gemma_jax.model.testing import TINY_GEMMA2_GQA, model_section
from gemma_jax.sharding.mesh import make_mesh
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram

MODEL = model_section(TINY_GEMMA2_GQA)
ROWS, T = 8, 12


def run_config(mesh=None, **continual_cfg):
  return config_from_dict(
    {
      "model": MODEL,
      "mesh": mesh or {},
      "data": {
        "seq_len": T,
        "sources": {"a": {"kind": "memory", "texts": ["x"]}},
      },
      "optimizer": {"learning_rate": 1e-2},
      "train": {"batch_size": ROWS},
      "checkpoint": {"init_from": "/nonexistent/base"},
      "continual": continual_cfg,
    }
  )


def random_tree(shapes, rng, positive=False):
  def one(s):
    x = rng.standard_normal(s).astype(np.float32)
    return np.abs(x) if positive else x

  return jax.tree.map(one, shapes, is_leaf=lambda x: isinstance(x, tuple))


def shapes_of(program):
  return jax.tree.map(lambda s: s.shape, program.abstract_state.params)


def batch(seed):
  rng = np.random.default_rng(seed)
  return {
    "inputs": rng.integers(3, 128, (ROWS, T)),
    "targets": rng.integers(3, 128, (ROWS, T)),
    "segment_ids": np.ones((ROWS, T)),
    "positions": np.tile(np.arange(T), (ROWS, 1)),
    "loss_mask": np.ones((ROWS, T)),
    "source": np.zeros(ROWS),
  }


def train(program, start, steps=2):
  """(params, metrics of each step) after `steps` steps from `start`."""
  state = program.init_state(
    params=jax.device_put(start, program.param_shardings)
  )
  step = program.compile_train_step()
  out = []
  for i in range(steps):
    b = {k: np.asarray(v, np.int32) for k, v in batch(i).items()}
    state, m = step(state, program.put(b))
    out.append(jax.device_get(m))
  return jax.device_get(state.params), out


@pytest.mark.slow
def test_penalty_and_its_gradient_are_the_formula():
  rng = np.random.default_rng(0)
  shapes = {"a": (3, 4), "b": {"c": (5,)}}
  theta, anchor = random_tree(shapes, rng), random_tree(shapes, rng)
  fisher = random_tree(shapes, rng, positive=True)
  lam = 3.0
  flat = lambda t: np.concatenate([x.ravel() for x in jax.tree.leaves(t)])
  th, an, f = flat(theta), flat(anchor), flat(fisher)
  ewc = {"fisher": fisher, "anchor": anchor}
  value, grad = jax.value_and_grad(ewc_lib.penalty)(theta, ewc, lam)
  assert float(value) == pytest.approx(
    lam / 2 * np.sum(f * (th - an) ** 2), rel=1e-6
  )
  np.testing.assert_allclose(flat(grad), lam * f * (th - an), rtol=1e-6)
  # Without a Fisher: L2-SP, F = 1.
  value, grad = jax.value_and_grad(ewc_lib.penalty)(
    theta, {"anchor": anchor}, lam
  )
  assert float(value) == pytest.approx(
    lam / 2 * np.sum((th - an) ** 2), rel=1e-6
  )
  np.testing.assert_allclose(flat(grad), lam * (th - an), rtol=1e-6)
  # bfloat16 storage: the difference is taken in float32 after the cast.
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), ewc)
  f16, an16 = (
    flat(jax.tree.map(lambda x: np.asarray(x, np.float32), bf16[k]))
    for k in ("fisher", "anchor")
  )
  assert float(ewc_lib.penalty(theta, bf16, lam)) == pytest.approx(
    lam / 2 * np.sum(f16 * (th - an16) ** 2), rel=1e-6
  )


@pytest.fixture(scope="module")
def start():
  program = TrainProgram(
    run_config(), make_mesh(run_config().mesh, jax.devices()[:1])
  )
  rng = np.random.default_rng(1)
  shapes = shapes_of(program)
  params = random_tree(shapes, rng)
  params = jax.tree.map(lambda x: 0.2 * x, params)
  anchor = jax.tree.map(
    lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params
  )
  fisher = random_tree(shapes, rng, positive=True)
  return params, {"anchor": anchor, "fisher": fisher}


def ewc_program(devices, mesh=None, lam=50.0, ewc=None):
  cfg = run_config(mesh, ewc_lambda=lam, fisher="/nonexistent/fisher")
  program = TrainProgram(cfg, make_mesh(cfg.mesh, jax.devices()[:devices]))
  if ewc is not None and lam > 0:
    program.frozen["ewc"] = jax.device_put(
      ewc, dict.fromkeys(ewc, program.param_shardings)
    )
  return program


@pytest.mark.slow
def test_lambda_zero_is_exactly_the_plain_step():
  off = ewc_program(1, lam=0.0)
  assert off.penalty_fn is None and "ewc" not in off.frozen
  plain = TrainProgram(
    run_config(), make_mesh(run_config().mesh, jax.devices()[:1])
  )
  # The same program, so the same bits; lambda > 0 is another program.
  text = plain.lower_train_step().as_text()
  assert off.lower_train_step().as_text() == text
  assert ewc_program(1).lower_train_step().as_text() != text


@pytest.mark.slow
def test_ewc_step_logs_both_terms_and_matches_on_eight_devices(start):
  params, ewc = start
  want, metrics = train(ewc_program(1, ewc=ewc), params)
  # Step 1 starts from `params`: its penalty is the formula there.
  penalty = jax.jit(ewc_lib.penalty, static_argnums=2)
  assert float(metrics[0]["loss/ewc"]) == pytest.approx(
    float(penalty(params, ewc, 50.0)), rel=1e-5
  )
  assert metrics[0]["loss/ce"] == metrics[0]["loss"]
  got, got_m = train(
    ewc_program(8, {"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2}, ewc=ewc),
    params,
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), got, want
  )
  for a, b in zip(got_m, metrics):
    assert float(a["loss/ewc"]) == pytest.approx(float(b["loss/ewc"]), rel=1e-5)


@pytest.mark.slow
def test_ewc_inputs_are_sharded_like_the_params_and_never_donated(start):
  _, ewc = start
  program = ewc_program(
    8, {"ici_data": 1, "ici_fsdp": 4, "ici_tensor": 2}, ewc=ewc
  )
  for tree in program.frozen["ewc"].values():
    for x, s in zip(
      jax.tree.leaves(tree), jax.tree.leaves(program.param_shardings)
    ):
      assert x.sharding.is_equivalent_to(s, x.ndim)
  lowered = program.lower_train_step()
  args, _ = lowered.args_info
  donated = [a.donated for a in jax.tree.leaves(args[2])]
  assert donated and not any(donated)


def test_lambda_below_zero_and_ewc_without_an_anchor_are_config_errors():
  with pytest.raises(ConfigError, match="ewc_lambda must be >= 0"):
    run_config(ewc_lambda=-1.0)
  with pytest.raises(ConfigError, match="anchor"):
    config_from_dict({"model": MODEL, "continual": {"ewc_lambda": 1.0}})


def save_fisher(path, model_cfg: ModelConfig, values):
  fisher_store.save(path, values, model_cfg, {"estimator": "test"})


def test_a_fisher_of_another_model_names_the_first_parameter(tmp_path):
  program = ewc_program(1)
  other = dataclasses.replace(program.cfg.model, num_heads=2, num_kv_heads=1)
  save_fisher(
    tmp_path / "f",
    other,
    layout.unflatten(
      {p: np.ones(s, np.float32) for p, s in layout.param_shapes(other).items()}
    ),
  )
  with pytest.raises(
    CheckpointError,
    match=r"parameter layers/attn/q_einsum/w is "
    r"\(2, 2, 32, 8\) there and \(2, 4, 32, 8\) in "
    r"this model",
  ):
    fisher_store.load(tmp_path / "f", program.cfg.model)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_nan_inf_or_negative_fisher_entries_are_refused(bad):
  program = ewc_program(8, {"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2})
  values = random_tree(shapes_of(program), np.random.default_rng(0), True)
  values["layers"]["mlp"]["linear"]["w"][1, 3, 2] = bad
  placed = jax.device_put(values, program.param_shardings)
  with pytest.raises(CheckpointError, match="layers/mlp/linear/w has"):
    ewc_lib.prepare_fisher(program, placed, "test")


def test_fisher_is_normalised_by_its_mean_and_stored_as_asked():
  program = TrainProgram(
    run_config(ewc_lambda=1.0, fisher="/x", dtype="bfloat16"),
    make_mesh(run_config().mesh, jax.devices()[:8]),
  )
  values = random_tree(shapes_of(program), np.random.default_rng(0), True)
  values = jax.tree.map(lambda x: 1e-9 * x, values)  # raw F is tiny
  out = ewc_lib.prepare_fisher(
    program, jax.device_put(values, program.param_shardings), "test"
  )
  flat = np.concatenate(
    [np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(out)]
  )
  assert flat.mean() == pytest.approx(1.0, rel=1e-2)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_resume_refuses_a_changed_fisher_or_anchor_and_says_what():
  saved = {
    "anchor": {"path": "a", "fingerprint": "sha256:1"},
    "fisher": {"path": "f", "fingerprint": "sha256:2", "normalization": "mean"},
    "dtype": "float32",
  }
  moved = {**saved, "fisher": {**saved["fisher"], "path": "elsewhere/f"}}
  ewc_lib.check_resume(saved, moved, 10)  # same content elsewhere: fine
  changed = {**saved, "fisher": {**saved["fisher"], "fingerprint": "sha256:3"}}
  with pytest.raises(
    ConfigError,
    match=r"continual.fisher: fingerprint "
    r"changed since the checkpoint at step 10 \(f: sha256:2"
    r" -> f: sha256:3\)",
  ):
    ewc_lib.check_resume(saved, changed, 10)
  with pytest.raises(ConfigError, match="continual.anchor"):
    ewc_lib.check_resume(
      saved, {**saved, "anchor": {"path": "a", "fingerprint": "sha256:9"}}, 10
    )
  with pytest.raises(ConfigError, match="normalization"):
    ewc_lib.check_resume(
      saved,
      {**saved, "fisher": {**saved["fisher"], "normalization": "none"}},
      10,
    )
  with pytest.raises(
    ConfigError, match="with a fisher and is now configured without one"
  ):
    ewc_lib.check_resume(saved, {**saved, "fisher": None}, 10)
