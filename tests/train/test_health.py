"""Whether a state is worth keeping: the goodness rule and checksums."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax.train import state as health


def test_the_divergence_rule_needs_both_bounds():
  recent = [6.0, 5.0, 4.0]
  v = 512  # ln(512) = 6.24
  assert not health.is_diverging(7.9, recent, v)  # below 2 x 4.0
  assert health.is_diverging(8.1, recent, v)  # above both
  # Near the start (loss ~ ln V) a doubling is not divergence yet.
  assert not health.is_diverging(6.2, [3.0], v)
  assert not health.is_diverging(100.0, [], v)  # nothing to compare
  # Only the last RECENT_LOGS logs count.
  old_best = [0.1] + [4.0] * health.RECENT_LOGS
  assert not health.is_diverging(7.9, old_best, v)


def test_judge_records_the_evidence():
  good = health.judge(True, 0, 3.9, [3.8, 4.0], 512)
  assert good["good"] and good["best_recent_loss"] == 3.8
  assert good["rule"] == health.RULE
  for args, why in [
    ((False, 0, 3.9), "params are not finite"),
    ((True, 2, 3.9), "2 steps before it were skipped"),
    ((True, 0, math.nan), "loss of its params is not finite"),
    ((True, 0, 1e9), "diverging"),
  ]:
    record = health.judge(*args, [3.8], 512)
    assert not record["good"] and why in health.why_not(record)


@pytest.mark.slow
def test_checksums_do_not_depend_on_sharding_and_see_one_bit():
  x = jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) / 7
  tree = {"w": x, "b": jnp.ones(64, jnp.bfloat16), "n": jnp.int32(3)}
  mesh8 = Mesh(np.array(jax.devices()), ("d",))
  mesh2 = Mesh(np.array(jax.devices()[:2]), ("d",))
  on8 = {**tree, "w": jax.device_put(x, NamedSharding(mesh8, P("d")))}
  on2 = {**tree, "w": jax.device_put(x, NamedSharding(mesh2, P(None, "d")))}
  assert health.checksums(on8) == health.checksums(on2)
  flipped = np.array(x)
  flipped.view(np.uint32)[17, 5] ^= 1  # the lowest mantissa bit
  changed = health.checksums({**tree, "w": jnp.asarray(flipped)})
  assert health.mismatched(health.checksums(tree), changed) == ["['w']"]


def test_params_finite():
  assert health.params_finite({"a": jnp.ones(3), "i": jnp.int32(1)})
  assert not health.params_finite({"a": jnp.array([1.0, jnp.inf])})
