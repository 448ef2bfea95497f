"""Harness tasks during training (gemma_jax/evals/during_training.py): every
N steps on the live params, logged to eval.jsonl beside the held-out
loss, the same numbers as the harness on the exported params."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="needs the `eval` extra (lm-eval)")

import gemma_jax.features  # noqa: F401  (registers them with the core)
from gemma_jax.errors import ConfigError
from gemma_jax.evals import benchmarks, during_training, harness
from gemma_jax.train import trainer as trainer_lib
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.testing import tiny_config_dict

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


def run_config(tok_path, task_dir, **section):
  d = tiny_config_dict(str(tok_path), steps=4)
  d["checkpoint"].update(save_every=0, export_params=True)
  d["harness"] = {
    "tasks": ["local_arc", "local_wikitext"],
    "every": 2,
    "include_path": [str(task_dir)],
    **section,
  }
  return config_from_dict(d)


@pytest.mark.slow
def test_tasks_run_every_n_steps_on_the_live_params(
  tmp_path, tok_path, harness_tasks
):
  task_dir = harness_tasks
  workdir = tmp_path / "run"
  trainer = trainer_lib.Trainer(run_config(tok_path, task_dir), str(workdir))
  # After each evaluation: how many shapes the scoring has compiled.
  (feature,) = [f for f in trainer.program.features if f.name == "harness"]
  compiled = []

  def counted(tr, step):
    feature.evaluate(tr, step)
    compiled.append(harness.token_logprobs._cache_size())

  trainer.hooks = [
    trainer_lib.Hook(counted, h.every) if h.fn == feature.evaluate else h
    for h in trainer.hooks
  ]
  trainer.run()
  records = [
    json.loads(line)
    for line in open(workdir / "eval.jsonl")
    if "harness" in line
  ]
  assert [r["step"] for r in records] == [2, 4]
  # The second evaluation compiled nothing new (the train step is compiled
  # ahead of time and cannot recompile).
  assert len(compiled) == 2 and compiled[0] == compiled[1], compiled
  for r in records:
    assert 0 <= r["harness/local_arc/acc"] <= 1
    assert r["harness/local_arc/acc_stderr"] > 0
    assert r["harness/local_wikitext/word_perplexity"] > 1
  # Training moved the params between the two evaluations.
  assert (
    records[0]["harness/local_wikitext/word_perplexity"]
    != records[1]["harness/local_wikitext/word_perplexity"]
  )
  # The step-4 numbers are the harness's on the exported step-4 params.
  lm = harness.GemmaJaxLM(
    checkpoint=str(workdir / "params"), tokenizer=str(tok_path)
  )
  opts = benchmarks.Options(
    tasks=("local_arc", "local_wikitext"), include_path=(str(task_dir),)
  )
  again = during_training.record(4, benchmarks.evaluate(lm, opts))
  assert set(again) == set(records[1])
  for key, value in again.items():
    np.testing.assert_allclose(records[1][key], value, rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_an_unknown_task_is_one_line_before_anything_trains(
  tmp_path, tok_path, harness_tasks, monkeypatch
):
  from gemma_jax.features import harness_eval

  task_dir = harness_tasks
  cfg = run_config(tok_path, task_dir, tasks=["local_arc", "arc_esay"])
  with pytest.raises(ConfigError, match=r"unknown harness task\(s\) arc_esay"):
    trainer_lib.Trainer(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists() or not list(
    (tmp_path / "run" / "checkpoints").iterdir()
  )
  # Without the scoring plugged in (gemma_jax.evals.during_training not
  # imported), the run refuses to start rather than skip the evaluations.
  monkeypatch.setattr(harness_eval, "_runner", None)
  with pytest.raises(ConfigError, match="import gemma_jax.evals.during_tr"):
    trainer_lib.Trainer(
      run_config(tok_path, task_dir, tasks=["local_arc"]),
      str(tmp_path / "run2"),
    )
  with pytest.raises(ConfigError, match="harness.every must be >= 0"):
    run_config(tok_path, task_dir, every=-1)
  with pytest.raises(ConfigError, match="unknown key"):
    run_config(tok_path, task_dir, limt=3)
