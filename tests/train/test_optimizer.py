"""Learning-rate schedules and AdamW from OptimizerConfig."""

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.train.config import OptimizerConfig
from gemma_jax.train.optimizer import decay_mask, make_optimizer, make_schedule


def lrs(schedule, steps, **kw):
  cfg = OptimizerConfig(schedule=schedule, learning_rate=1.0, **kw)
  fn = make_schedule(cfg, total_steps=100)
  return np.array([float(fn(s)) for s in steps])


@pytest.mark.parametrize(
  "name", ["cosine", "wsd", "linear", "constant", "rsqrt"]
)
def test_every_schedule_warms_up_linearly_from_zero(name):
  np.testing.assert_allclose(
    lrs(name, [0, 5, 10], warmup_steps=10), [0.0, 0.5, 1.0], atol=1e-6
  )


def test_cosine_decays_to_the_min_ratio_at_decay_steps_and_stays():
  got = lrs("cosine", [10, 55, 100, 200], warmup_steps=10, min_lr_ratio=0.1)
  np.testing.assert_allclose(got, [1.0, 0.55, 0.1, 0.1], atol=1e-6)


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
  got = lrs(
    "wsd",
    [10, 80, 90, 95, 100],
    warmup_steps=10,
    min_lr_ratio=0.0,
    wsd_decay_fraction=0.1,
  )
  np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_linear_and_constant():
  np.testing.assert_allclose(
    lrs("linear", [0, 50, 100], min_lr_ratio=0.0), [1.0, 0.5, 0.0], atol=1e-6
  )
  np.testing.assert_allclose(lrs("constant", [0, 99, 1000]), [1, 1, 1])


def test_rsqrt_decays_as_inverse_square_root_after_warmup():
  np.testing.assert_allclose(
    lrs("rsqrt", [16, 64, 400], warmup_steps=16), [1.0, 0.5, 0.2], atol=1e-6
  )


def test_decay_steps_overrides_the_run_length():
  cfg = OptimizerConfig(
    schedule="linear", learning_rate=1.0, min_lr_ratio=0.0, decay_steps=10
  )
  assert float(make_schedule(cfg, total_steps=100)(10)) == 0.0


def test_weight_decay_skips_norm_scales():
  params = {
    "layers": {
      "pre_ffw_norm": {"scale": jnp.zeros(2)},
      "mlp": {"linear": {"w": jnp.zeros((2, 2))}},
    },
    "final_norm": {"scale": jnp.zeros(2)},
  }
  mask = decay_mask(params)
  assert mask == {
    "layers": {
      "pre_ffw_norm": {"scale": False},
      "mlp": {"linear": {"w": True}},
    },
    "final_norm": {"scale": False},
  }


def adamw_update(grads, params, **kw):
  # b1 = b2 = 0: Adam's step is g / (|g| + eps), elementwise.
  cfg = OptimizerConfig(
    schedule="constant", learning_rate=0.1, b1=0.0, b2=0.0, **kw
  )
  tx, _ = make_optimizer(cfg, total_steps=10)
  return tx.update(grads, tx.init(params), params)[0]


def test_adamw_clips_gradients_by_global_norm_first():
  grads = {"w": jnp.array([3.0, -4.0])}  # norm 5 -> clipped to [.6, -.8]
  params = {"w": jnp.zeros(2)}
  got = adamw_update(
    grads, params, eps=1.0, weight_decay=0.0, grad_clip_norm=1.0
  )["w"]
  np.testing.assert_allclose(
    got, [-0.1 * 0.6 / 1.6, 0.1 * 0.8 / 1.8], rtol=1e-6
  )
  unclipped = adamw_update(
    grads, params, eps=1.0, weight_decay=0.0, grad_clip_norm=None
  )["w"]
  np.testing.assert_allclose(unclipped, [-0.1 * 3 / 4, 0.1 * 4 / 5], rtol=1e-6)


def test_adamw_decays_weights_but_not_norm_scales():
  params = {"w": jnp.full((2,), 2.0), "norm": {"scale": jnp.full((2,), 2.0)}}
  grads = {"w": jnp.array([3.0, -4.0]), "norm": {"scale": jnp.zeros(2)}}
  updates = adamw_update(grads, params, eps=1e-12, weight_decay=0.5)
  np.testing.assert_allclose(
    updates["w"], [-0.1 * (1 + 1.0), -0.1 * (-1 + 1.0)], atol=1e-6
  )
  np.testing.assert_allclose(updates["norm"]["scale"], [0.0, 0.0])
