"""Processes that hold the same rows of the batch read the same rows: with
the tensor axis spanning two processes (2 x 2 CPU devices, mesh tensor=4),
both read the whole batch, and the run equals one process on 4 devices bit
for bit. (Each reading half the batch, as one row block per process would,
builds a global batch of half the rows.)"""

import pytest
import yaml

from gemma_jax.train.testing import (
  finish,
  losses,
  tiny_config_dict,
  train_processes,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 3


def _run(config, workdir, cache, processes: int, devices: int):
  # XLA's default emitters, as a real run compiles: with the suite's faster
  # loop emitters (subprocess_env) the one- and two-process programs round
  # differently in the last bit (losses 6.7452435 vs 6.7452440).
  procs = train_processes(
    processes, config, workdir, cache, devices=devices, loop_emitters=False
  )
  finish(procs)
  return losses(workdir)


def test_processes_sharing_a_batch_shard_train_like_one_process(
  tiny_tokenizer, compile_cache, tmp_path
):
  """(One row block per process is tests/train/test_multiprocess.py.)"""
  d = tiny_config_dict(tiny_tokenizer, steps=STEPS)
  d["mesh"] = {"ici_data": 1, "ici_tensor": 4}
  d["checkpoint"].update(save_every=STEPS, keep=1)
  config = tmp_path / "run.yaml"
  config.write_text(yaml.safe_dump(d, sort_keys=False))
  one = _run(str(config), tmp_path / "one", compile_cache, 1, 4)
  two = _run(str(config), tmp_path / "two", compile_cache, 2, 2)
  assert sorted(one) == list(range(1, STEPS + 1))
  assert two == one  # bitwise
