"""EMA of the weights: the update rule, its initialisation and debiasing;
a checkpoint of the layout before TrainState.extras resumes."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.features import ema

update = jax.jit(ema.ema_update)
decay_at = jax.jit(ema.ema_decay, static_argnames="debias")


def test_update_is_the_exponential_moving_average():
  e = {"w": jnp.array([1.0, 2.0]), "b": {"x": jnp.array(3.0)}}
  p = {"w": jnp.array([3.0, 0.0]), "b": {"x": jnp.array(-1.0)}}
  out = update(e, p, 0.9)
  np.testing.assert_allclose(out["w"], [1.2, 1.8], rtol=1e-6)
  np.testing.assert_allclose(out["b"]["x"], 2.6, rtol=1e-6)


def test_ema_is_float32_and_moves_where_bfloat16_would_not():
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  e = ema.init_ema(params)
  assert e["w"].dtype == jnp.float32
  moved = update(e, {"w": jnp.full((4,), 1.5, jnp.bfloat16)}, 0.999)
  assert moved["w"].dtype == jnp.float32
  np.testing.assert_allclose(moved["w"], 1.0005, rtol=1e-6)
  # The same update in bfloat16 is lost to rounding.
  assert jnp.bfloat16(1.0) + jnp.bfloat16(0.0005) == jnp.bfloat16(1.0)


def test_constant_params_keep_the_ema_bitwise():
  x = jax.random.normal(jax.random.key(0), (1000,))
  e = {"w": x}
  for n in range(1, 20):
    e = update(e, {"w": x}, decay_at(0.99, n))
  np.testing.assert_array_equal(e["w"], x)


def test_debiased_ema_is_the_normalised_weighted_average():
  d, steps = 0.9, 12
  thetas = np.random.default_rng(0).standard_normal((steps, 5))
  e = ema.init_ema({"w": jnp.full((5,), 100.0)})  # the start drops out
  for n in range(1, steps + 1):
    e = update(e, {"w": thetas[n - 1]}, decay_at(d, n))
    if n == 1:
      np.testing.assert_array_equal(e["w"], thetas[0].astype(np.float32))
  weights = (1 - d) * d ** np.arange(steps - 1, -1, -1) / (1 - d**steps)
  np.testing.assert_allclose(e["w"], weights @ thetas, rtol=1e-5, atol=1e-6)


def test_plain_ema_keeps_the_start_with_weight_decay_to_the_n():
  d, steps = 0.5, 3
  e = {"w": jnp.array([8.0])}
  for _ in range(steps):
    e = update(e, {"w": jnp.array([0.0])}, ema.ema_decay(d, 1, debias=False))
  assert float(e["w"][0]) == pytest.approx(8.0 * d**steps)


# A run checkpointed before TrainState.extras existed: the EMA was the
# state's top-level field `ema` (tests/fixtures/ema_before_extras/make.py
# wrote it with gemma_jax at commit 7003598, on one CPU device).
BEFORE_EXTRAS = (
  pathlib.Path(__file__).parents[1] / "fixtures" / "ema_before_extras"
)


def _in_extras(checksums: dict) -> dict:
  """Checksums keyed by the old layout's paths, under today's."""
  return {
    (k.replace(".ema", ".extras['ema']", 1) if k.startswith(".ema[") else k): v
    for k, v in checksums.items()
  }


@pytest.mark.slow
def test_a_checkpoint_from_before_extras_resumes_with_its_ema(tmp_path):
  import gemma_jax.features  # noqa: F401  (registers them with the core)
  from gemma_jax.sharding.mesh import make_mesh
  from gemma_jax.train import state as state_lib
  from gemma_jax.train import trainer as trainer_lib
  from gemma_jax.train.config import config_from_dict

  workdir = tmp_path / "run"
  shutil.copytree(BEFORE_EXTRAS / "run", workdir)
  d = json.loads((workdir / "config.json").read_text())
  d["data"]["tokenizer"] = str(BEFORE_EXTRAS / "tokenizer.model")
  cfg = config_from_dict(d)
  trainer = trainer_lib.Trainer(
    cfg, str(workdir), mesh=make_mesh(cfg.mesh, jax.devices()[:1])
  )
  # Restored bit for bit, the EMA into extras["ema"].
  assert trainer.start_step == 2
  assert set(trainer.state.extras) == {"ema"}
  saved = json.loads(
    (workdir / "checkpoints" / "2" / "meta" / "metadata").read_text()
  )["checksums"]
  assert any(k.startswith(".ema[") for k in saved)
  assert state_lib.checksums(trainer.state) == _in_extras(saved)
  trainer.run()

  # Steps 3 and 4 continue the old run: its losses and its EMA's held-out
  # losses (to rounding: the suite's XLA flags are not the fixture's).
  def records(path, prefix):
    with open(path) as f:
      return [
        {k: v for k, v in r.items() if k.startswith(prefix) or k == "step"}
        for r in map(json.loads, f)
      ]

  expected = BEFORE_EXTRAS / "expected"
  for name, prefix in (("metrics.jsonl", "loss"), ("eval.jsonl", "eval")):
    new, old = records(workdir / name, prefix), records(expected / name, prefix)
    assert [r["step"] for r in new] == [r["step"] for r in old]
    for a, b in zip(new, old):
      assert a == pytest.approx(b, rel=1e-5), name
  assert "eval_ema/prose/loss" in records(expected / "eval.jsonl", "eval")[-1]
  old_meta = json.loads((expected / "meta_step4.json").read_text())
  new_meta = json.loads(
    (workdir / "checkpoints" / "4" / "meta" / "metadata").read_text()
  )
  assert set(new_meta["checksums"]) == set(_in_extras(old_meta["checksums"]))
