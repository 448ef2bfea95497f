"""Shared by the evals tests: the tiny tokenizer and a small random model."""

import dataclasses

import pytest

from gemma_jax.checkpoint.testing import random_params
from gemma_jax.data import testing
from gemma_jax.model.testing import TINY_GEMMA2_MQA
from gemma_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return testing.tiny_tokenizer(tmp_path_factory.mktemp("tok") / "t.model")


@pytest.fixture(scope="module")
def tok(tok_path):
  return Tokenizer.load(tok_path)


@pytest.fixture(scope="module")
def random_model(tok):
  """(params, cfg): a two-layer Gemma 2 over the tiny tokenizer's vocabulary
  with random weights."""
  cfg = dataclasses.replace(
    TINY_GEMMA2_MQA, sliding_window=8, vocab_size=tok.vocab_size
  )
  params = random_params(cfg, scale=0.2)
  return params, cfg


@pytest.fixture(scope="session")
def harness_tasks(tmp_path_factory):
  """Tiny local copies of the harness's tasks (gemma_jax/evals/testing.py),
  one folder for the session: the harness's task index over it is built
  once (benchmarks.task_manager keeps it)."""
  from gemma_jax.evals.testing import write_tasks

  return write_tasks(tmp_path_factory.mktemp("harness_tasks"))
