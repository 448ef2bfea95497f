"""Shared by the feature tests: one compiled forward per model config.

A fresh `jax.jit(lambda ...)` per call traces, lowers and looks the program
up again every time; these are jitted once per config for the session, so
the tests that compute reference logits of the same model (a student, its
teacher, a merged export) reuse one executable.
"""

import functools

import jax
import pytest

from gemma_jax.model import Transformer


@functools.cache
def _forward(cfg):
  model = Transformer(cfg)
  return jax.jit(
    lambda params, inputs, positions, segment_ids: model.apply(
      {"params": params}, inputs, positions, segment_ids
    )
  )


@pytest.fixture(scope="session")
def logits_of():
  """logits_of(model_cfg, params, batch): the model's logits on the batch's
  inputs, positions and segment ids, compiled once per config."""

  def logits(cfg, params, batch):
    return _forward(cfg)(
      params, batch["inputs"], batch["positions"], batch["segment_ids"]
    )

  return logits


@pytest.fixture(scope="session")
def host_init():
  """host_init(program, seed): a step-0 state of `program` from random
  params drawn on the host (0.3 N(0, 1) / sqrt(fan-in)) and placed in its
  layout: for properties that hold for any params, without compiling the
  model's random init (threefry over every leaf, as costly to compile as a
  forward)."""
  import numpy as np

  def init(program, seed=0):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
      lambda x: jax.device_put(
        (0.3 * rng.standard_normal(x.shape) / np.sqrt(x.shape[-1])).astype(
          x.dtype
        ),
        x.sharding,
      ),
      program.abstract_state.params,
    )
    return program.init_state(params=params)

  return init
