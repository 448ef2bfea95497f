"""The forgetting report: checkpoints side by side, held-out and benchmarks."""

import json

import jax
import numpy as np
import pytest
import yaml

from gemma_jax import cli
from gemma_jax.checkpoint import native
from gemma_jax.data import pipeline_for
from gemma_jax.errors import ConfigError
from gemma_jax.evals import forgetting, scoring
from gemma_jax.evals import tasks as tasks_lib
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.train import metrics as evaluation
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram
from gemma_jax.train.testing import texts, tiny_config_dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from gemma_jax.tokenizer import train_tokenizer

  root = tmp_path_factory.mktemp("report")
  tok = root / "tok.model"
  train_tokenizer(texts(0, 200, "prose") + texts(1, 200, "code"), 400, str(tok))
  d = tiny_config_dict(str(tok))
  config = root / "run.yaml"
  config.write_text(yaml.safe_dump(d))
  program = TrainProgram(config_from_dict(d))
  for name, seed in (("base", 0), ("later", 1)):
    params = program.init_state(seed=seed).params
    native.save(str(root / name), params, program.cfg.model)
  rows = [
    {
      "context": "the cat sat on the",
      "choices": ["mat", "dog", "x"],
      "gold": 0,
    },
    {
      "context": "def f(x):\n  return",
      "choices": [" x + 1", " cat"],
      "gold": 0,
    },
  ]
  (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "gen.jsonl").write_text(
    json.dumps({"context": "Question: 1 + 1?\nAnswer:", "answer": "#### 2"})
    + "\n"
  )
  (root / "tasks.yaml").write_text(
    yaml.safe_dump(
      [
        {"kind": "multiple_choice", "path": str(root / "mc.jsonl")},
        {"kind": "generative", "path": str(root / "gen.jsonl")},
      ]
    )
  )
  return root, config, program, Tokenizer.load(str(tok))


@pytest.mark.slow
def test_report_command_writes_both_tables_and_every_item(setup, capsys):
  root, config, program, tok = setup
  out = root / "out"
  assert (
    cli.main(
      [
        "report",
        str(config),
        "--checkpoint",
        f"base={root / 'base'}",
        "--checkpoint",
        f"later={root / 'later'}",
        "--tasks",
        str(root / "tasks.yaml"),
        "--out",
        str(out),
      ]
    )
    == 0
  )
  text = (out / "report.md").read_text()
  assert "Held-out loss" in text and "Δ loss (later - base)" in text
  assert "| mc | acc |" in text and "exact_match,strict-match" in text
  assert (
    "| checkpoint | code loss | prose loss | mc acc | gen strict-match |"
    in text
    and "| checkpoint |" in capsys.readouterr().out
  )
  results = json.loads((out / "report.json").read_text())
  assert list(results) == ["base", "later"]
  assert set(results["base"]["heldout"]) == {"prose", "code"}
  items = [json.loads(l) for l in open(out / "items" / "later.jsonl")]
  assert len(items) == 3
  for name in ("heldout.png", "benchmarks.png"):
    assert (out / name).stat().st_size > 0

  # The same numbers as the trainer's evaluation and the unsharded scorer.
  params, _ = native.load(str(root / "base"), shardings=program.param_shardings)
  pipe = pipeline_for(program.cfg)
  direct = evaluation.evaluate(program, params, pipe, 1)
  for src, r in direct.items():
    assert results["base"]["heldout"][src]["loss"] == pytest.approx(
      r["loss"], rel=1e-6
    )
  task = tasks_lib.multiple_choice(root / "mc.jsonl")
  requests = scoring.choice_requests(task, tasks_lib.contexts(task))
  host = jax.device_get(params)
  plain = scoring.make_loglikelihood_fn(host, program.cfg.model, tok)(requests)
  sharded = scoring.make_loglikelihood_fn(
    host,
    program.cfg.model,
    tok,
    batch_size=8,
    logprob_fn=forgetting.sharded_logprob_fn(program, params),
  )(requests)
  np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-5)
  first = json.loads(open(out / "items" / "base.jsonl").readline())
  np.testing.assert_allclose(
    first["loglikelihoods"], plain[:3], rtol=1e-5, atol=1e-5
  )


@pytest.mark.slow
def test_bad_task_files_and_checkpoints_are_one_line_errors(setup, capsys):
  root, config, _, _ = setup
  (root / "bad.yaml").write_text(
    yaml.safe_dump([{"kind": "nope", "path": "x"}])
  )
  with pytest.raises(ConfigError, match="kind 'nope' is not one of"):
    forgetting.load_tasks(root / "bad.yaml")
  assert (
    cli.main(
      [
        "report",
        str(config),
        "--checkpoint",
        f"x={root / 'missing'}",
        "--out",
        str(root / "o"),
      ]
    )
    == 1
  )
  err = capsys.readouterr().err
  assert "neither a native export" in err and err.count("\n") == 1
  assert (
    cli.main(
      [
        "report",
        str(config),
        "--checkpoint",
        "nameonly",
        "--out",
        str(root / "o"),
      ]
    )
    == 2
  )


def test_summary_has_one_row_per_checkpoint_with_changes_from_the_first():
  def result(prose, acc, em):
    return {
      "heldout": {"prose": {"loss": prose, "perplexity": 0.0}},
      "tasks": {
        "mc": {"acc": acc, "acc_norm": 0.0, "n": 4},
        "sums": {
          "exact_match,strict-match": em,
          "exact_match,flexible-extract": 1.0,
        },
      },
    }

  table = forgetting.summary_table(
    {"base": result(5.0, 0.5, 0.0), "cpt": result(5.25, 0.25, 0.125)}
  )
  assert table.splitlines() == [
    "| checkpoint | prose loss | mc acc | sums strict-match |",
    "|---|---|---|---|",
    "| base | 5.000 | 0.500 | 0.000 |",
    "| cpt | 5.250 (+0.250) | 0.250 (-0.250) | 0.125 (+0.125) |",
  ]


@pytest.mark.slow
def test_task_entries_take_max_gen_toks_for_generative_only(setup):
  root = setup[0]
  (root / "gen.yaml").write_text(
    yaml.safe_dump(
      [
        {
          "kind": "generative",
          "path": str(root / "gen.jsonl"),
          "max_gen_toks": 16,
        }
      ]
    )
  )
  assert forgetting.load_tasks(root / "gen.yaml")[0].max_gen_toks == 16
  (root / "mc.yaml").write_text(
    yaml.safe_dump(
      [
        {
          "kind": "multiple_choice",
          "path": str(root / "mc.jsonl"),
          "max_gen_toks": 16,
        }
      ]
    )
  )
  with pytest.raises(ConfigError, match="max_gen_toks. is for generative"):
    forgetting.load_tasks(root / "mc.yaml")
