"""The forgetting report: checkpoints side by side, held-out loss and the
harness's benchmarks (tiny local copies of its own tasks, no downloads)."""

import json
import os

import numpy as np
import pytest
import yaml

pytest.importorskip("lm_eval", reason="needs the `eval` extra (lm-eval)")

from gemma_jax import cli
from gemma_jax.checkpoint import native
from gemma_jax.data import pipeline_for
from gemma_jax.errors import ConfigError
from gemma_jax.evals import benchmarks, forgetting, harness
from gemma_jax.train import metrics as evaluation
from gemma_jax.train.config import config_from_dict
from gemma_jax.train.program import TrainProgram
from gemma_jax.train.testing import tiny_config_dict

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
TASKS = "local_arc,local_gsm8k,local_wikitext"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, harness_tasks, tiny_tokenizer):
  root = tmp_path_factory.mktemp("report")
  d = tiny_config_dict(tiny_tokenizer)
  config = root / "run.yaml"
  config.write_text(yaml.safe_dump(d))
  program = TrainProgram(config_from_dict(d))
  for name, seed in (("base", 0), ("later", 1)):
    params = program.init_state(seed=seed).params
    native.save(str(root / name), params, program.cfg.model)
  return root, config, program, harness_tasks


def setup_tokenizer(program) -> str:
  return program.cfg.data.tokenizer


def report_args(root, config, tasks_dir, *extra):
  return [
    "report",
    str(config),
    "--checkpoint",
    f"base={root / 'base'}",
    "--checkpoint",
    f"later={root / 'later'}",
    "--tasks",
    TASKS,
    "--include-path",
    str(tasks_dir),
    "--gen-kwargs",
    "max_gen_toks=8",
    *extra,
  ]


@pytest.mark.slow
def test_report_command_writes_tables_harness_files_and_every_sample(
  setup, capsys
):
  root, config, program, tasks_dir = setup
  out = root / "out"
  args = report_args(
    root, config, tasks_dir, "--log-samples", "--out", str(out)
  )
  assert cli.main(args) == 0
  text = (out / "report.md").read_text()
  assert "Held-out loss" in text and "Δ loss (later - base)" in text
  # The harness's table: every metric with stderr, n-shot and filter.
  assert "| local_arc | none | 0 | acc | ↑ |" in text
  assert "| local_arc | none | 0 | acc_norm | ↑ |" in text
  assert "| local_gsm8k | strict-match | 5 | exact_match | ↑ |" in text
  assert "| local_gsm8k | flexible-extract | 5 | exact_match | ↑ |" in text
  assert "| local_wikitext | none | 0 | word_perplexity | ↓ |" in text
  assert "stderr of the difference" in text
  assert (
    "| checkpoint | code loss | prose loss | local_arc acc | "
    "local_gsm8k exact_match | local_wikitext word_perplexity |" in text
  )
  assert "| checkpoint |" in capsys.readouterr().out
  results = json.loads((out / "report.json").read_text())
  assert list(results) == ["base", "later"]
  assert set(results["base"]["heldout"]) == {"prose", "code"}
  assert results["base"]["harness"]["n-shot"]["local_gsm8k"] == 5
  for name in ("heldout.png", "benchmarks.png"):
    assert (out / name).stat().st_size > 0
  # The harness's own files, as `lm_eval --output_path --log_samples`.
  for name in ("base", "later"):
    (saved,) = (out / "harness" / name).glob("results_*.json")
    harness_json = json.loads(saved.read_text())
    assert harness_json["results"] == results[name]["harness"]["results"]
    # What ran: JAX's environment where the harness records torch's.
    assert "jax:" in harness_json["pretty_env_info"]
    assert "PyTorch" not in harness_json["pretty_env_info"]
    assert harness_json["lm_eval_version"].startswith("0.4")
    (arc,) = (out / "harness" / name).glob("samples_local_arc_*.jsonl")
    samples = [json.loads(line) for line in arc.read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["resps"]) == 4 for s in samples)
    (gsm,) = (out / "harness" / name).glob("samples_local_gsm8k_*.jsonl")
    first = json.loads(gsm.read_text().splitlines()[0])
    assert first["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == 8

  # The same numbers as the trainer's evaluation, and as the harness with
  # the checkpoint loaded by model_args on one device.
  params, _ = native.load(str(root / "base"), shardings=program.param_shardings)
  pipe = pipeline_for(program.cfg)
  direct = evaluation.evaluate(program, params, pipe, 1)
  for src, r in direct.items():
    assert results["base"]["heldout"][src]["loss"] == pytest.approx(
      r["loss"], rel=1e-6
    )
  lm = harness.GemmaJaxLM(
    checkpoint=str(root / "base"),
    tokenizer=setup_tokenizer(program),
    mesh="1x1x1",
  )
  opts = benchmarks.Options(
    tasks=("local_arc", "local_wikitext"), include_path=(str(tasks_dir),)
  )
  alone = benchmarks.evaluate(lm, opts)
  for task in ("local_arc", "local_wikitext"):
    for key, value in alone["results"][task].items():
      if isinstance(value, float):
        np.testing.assert_allclose(
          results["base"]["harness"]["results"][task][key],
          value,
          rtol=1e-5,
          err_msg=f"{task} {key}",
        )


@pytest.mark.slow
def test_held_out_only_without_tasks(setup, capsys):
  root, config, _, _ = setup
  out = root / "heldout_only"
  args = ["report", str(config), "--checkpoint", f"base={root / 'base'}"]
  assert cli.main([*args, "--out", str(out)]) == 0
  results = json.loads((out / "report.json").read_text())
  assert results["base"]["harness"] is None
  assert "Benchmarks" not in (out / "report.md").read_text()
  assert not (out / "harness").exists()


@pytest.mark.slow
def test_the_harness_index_has_the_study_tasks_and_names_an_unknown_one(
  setup, capsys
):
  """One test, so that the harness's whole index (~15k task files, most of
  a minute) is built once in the suite."""
  root, config, _, tasks_dir = setup
  bad = report_args(root, config, tasks_dir, "--out", str(root / "o"))
  bad[bad.index("--tasks") + 1] = "local_arc,no_such_task"
  assert cli.main(bad) == 2
  err = capsys.readouterr().err
  assert "unknown harness task(s) no_such_task" in err
  assert err.count("\n") == 1
  # The same index (built once per process).
  opts = benchmarks.Options(
    tasks=benchmarks.STUDY_TASKS, include_path=(str(tasks_dir),)
  )
  manager = benchmarks.task_manager(opts)
  benchmarks.check_tasks(benchmarks.STUDY_TASKS, manager)
  assert "arc_easy" in manager.all_tasks  # the harness's own were indexed


@pytest.mark.slow
def test_bad_checkpoints_and_options_are_one_line_errors(setup, capsys):
  root, config, _, _ = setup
  out = ["--out", str(root / "o")]
  with pytest.raises(ConfigError, match="seed"):
    benchmarks.Options(tasks=("x",), seed=(1, 2))
  missing = [
    "report",
    str(config),
    "--checkpoint",
    f"x={root / 'missing'}",
    *out,
  ]
  assert cli.main(missing) == 1
  err = capsys.readouterr().err
  assert "neither a native export" in err and err.count("\n") == 1
  assert (
    cli.main(["report", str(config), "--checkpoint", "nameonly", *out]) == 2
  )
  assert (
    cli.main(
      ["report", str(config), "--checkpoint", "a=b", "--limit", "3", *out]
    )
    == 2
  )
  assert "--limit needs --tasks" in capsys.readouterr().err


def test_study_names_the_seven_benchmarks_as_the_harness_does():
  opts = benchmarks.Options(tasks=("study", "arc_easy"))
  names = opts.task_names()
  assert names == list(benchmarks.STUDY_TASKS)  # arc_easy once
  for family in (
    "arc",
    "belebele",
    "gsm8k",
    "hellaswag",
    "mmlu",
    "truthfulqa",
    "winogrande",
  ):
    assert any(n.startswith(family) for n in names), family
  assert {"belebele_lit_Latn", "belebele_eng_Latn"} <= set(names)


def test_summary_has_one_row_per_checkpoint_with_changes_from_the_first():
  def result(prose, acc, em):
    return {
      "heldout": {"prose": {"loss": prose, "perplexity": 0.0}},
      "harness": {
        "results": {
          "mc": {"alias": "mc", "acc,none": acc, "acc_norm,none": 0.0},
          "sums": {
            "alias": "sums",
            "exact_match,strict-match": em,
            "exact_match,flexible-extract": 1.0,
          },
        },
      },
    }

  table = forgetting.summary_table(
    {"base": result(5.0, 0.5, 0.0), "cpt": result(5.25, 0.25, 0.125)}
  )
  assert table.splitlines() == [
    "| checkpoint | prose loss | mc acc | sums exact_match |",
    "|---|---|---|---|",
    "| base | 5.000 | 0.500 | 0.000 |",
    "| cpt | 5.250 (+0.250) | 0.250 (-0.250) | 0.125 (+0.125) |",
  ]
