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
