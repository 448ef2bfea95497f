"""`gemma-jax fisher --tasks`: the harness's options, and bad ones refused in
one line before any checkpoint is read."""

import pytest
import yaml

from gemma_jax import cli
from gemma_jax.evals import benchmarks
from gemma_jax.train.testing import tiny_config_dict


@pytest.fixture
def argv(tmp_path, tiny_tokenizer, harness_local_only):
  """`gemma-jax fisher` up to its data flags: a config, a checkpoint that
  is never read (--params-format run is only opened to load it), --out."""
  config = tmp_path / "c.yaml"
  config.write_text(yaml.safe_dump(tiny_config_dict(tiny_tokenizer)))
  return [
    "fisher",
    str(config),
    "--params-format",
    "run",
    "--params",
    str(tmp_path / "never_read"),
    "--out",
    str(tmp_path / "fisher"),
  ]


@pytest.fixture
def harness_local_only(monkeypatch):
  """Task managers over --include-path only: a name found nowhere is
  reported without indexing the harness's ~15k task files."""
  made = benchmarks.task_manager
  monkeypatch.setattr(
    benchmarks,
    "task_manager",
    lambda opts, include_defaults=None: made(opts, False),
  )


def one_line_error(capsys, argv) -> tuple[int, str]:
  capsys.readouterr()
  code = cli.main(argv)
  err = [line for line in capsys.readouterr().err.splitlines() if line]
  assert len(err) == 1, err
  return code, err[0]


def test_an_unknown_task_is_named(argv, tmp_path, capsys):
  (tmp_path / "tasks").mkdir()
  code, err = one_line_error(
    capsys, [*argv, "--tasks", "nope_task", "--include-path", f"{tmp_path}"]
  )
  assert code == 2
  assert "unknown harness task(s) nope_task; `lm_eval ls tasks`" in err
  assert not (tmp_path / "fisher").exists()


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--tasks", "x", "--sequences", "4"], "--sequences is for --source"),
    (["--source", "prose", "--limit", "4"], "--limit needs --tasks"),
    (["--source", "prose", "--num-fewshot", "1"], "--num-fewshot needs"),
    (["--tasks", "x", "--seed", "1,2"], "give one integer or four"),
  ],
)
def test_harness_options_go_with_tasks_only(argv, capsys, flags, message):
  code, err = one_line_error(capsys, [*argv, *flags])
  assert code == 2 and message in err, err
