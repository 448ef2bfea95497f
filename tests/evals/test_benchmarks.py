"""The local data files of harness tasks, checked before the harness opens
them (gemma_jax/evals/benchmarks.py)."""

import json

import pytest

pytest.importorskip("lm_eval", reason="needs the `eval` extra (lm-eval)")

from gemma_jax.errors import DataError
from gemma_jax.evals import benchmarks


def manager(*folders):
  opts = benchmarks.Options(tasks=("x",), include_path=tuple(map(str, folders)))
  return benchmarks.task_manager(opts, include_defaults=False)


def write_task(folder, name, data_files, dataset_path="json", **more):
  folder.mkdir(exist_ok=True)
  config = {
    "task": name,
    "dataset_path": dataset_path,
    "dataset_kwargs": {"data_files": data_files},
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{context}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{gold}}",
    **more,
  }
  (folder / f"{name}.yaml").write_text(json.dumps(config))


def test_files_of_tasks_groups_and_patterns(harness_tasks, tmp_path):
  mine = tmp_path / "mine"
  write_task(mine, "globbed", {"test": str(tmp_path / "parts" / "*.jsonl")})
  (mine / "group.yaml").write_text(
    json.dumps(
      {"group": "both", "task": ["local_arc", {"task": "local_gsm8k"}]}
    )
  )
  m = manager(harness_tasks, mine)
  found = benchmarks.data_files(["both"], m)
  assert [(t, p.rsplit("/", 1)[1], text) for t, p, text in found] == [
    ("local_arc", "arc_train.jsonl", True),
    ("local_arc", "arc_validation.jsonl", True),
    ("local_arc", "arc_test.jsonl", True),
    ("local_gsm8k", "gsm8k_train.jsonl", True),
    ("local_gsm8k", "gsm8k_test.jsonl", True),
  ]
  assert benchmarks.check_tasks(["local_a*"], m) == [p for _, p, _ in found[:3]]
  # A glob is checked by what it matches.
  with pytest.raises(
    DataError, match=r"task globbed: data file .*\*.jsonl matches no file"
  ):
    benchmarks.check_data_files(["globbed"], m)
  (tmp_path / "parts").mkdir()
  for i in range(2):
    (tmp_path / "parts" / f"{i}.jsonl").write_text("{}\n")
  assert len(benchmarks.check_data_files(["globbed"], m)) == 2


def test_relative_files_are_read_from_data_dir_or_the_working_directory(
  tmp_path, monkeypatch
):
  mine = tmp_path / "mine"
  write_task(mine, "here", {"test": "d.jsonl"})
  write_task(
    mine,
    "there",
    {"test": "d.jsonl"},
    dataset_kwargs={"data_files": {"test": "d.jsonl"}, "data_dir": "sub"},
  )
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "d.jsonl").write_text("{}\n")
  monkeypatch.chdir(tmp_path)
  m = manager(mine)
  assert benchmarks.check_data_files(["there"], m) == ["sub/d.jsonl"]
  with pytest.raises(DataError, match="task here: data file d.jsonl does not"):
    benchmarks.check_data_files(["here"], m)


def test_only_text_files_must_be_utf8_and_hub_datasets_are_not_files(
  tmp_path,
):
  mine = tmp_path / "mine"
  binary = tmp_path / "t.parquet"
  binary.write_bytes(b"PAR1\xff\xfe")
  write_task(mine, "columns", {"test": str(binary)}, dataset_path="parquet")
  write_task(mine, "hub", {"test": "data/test-*.parquet"}, "allenai/ai2_arc")
  write_task(mine, "text", {"test": str(binary)}, dataset_path="csv")
  m = manager(mine)
  assert benchmarks.check_data_files(["columns", "hub"], m) == [str(binary)]
  with pytest.raises(DataError, match=r"2 of 6 bytes are not UTF-8 \(first"):
    benchmarks.check_data_files(["text"], m)
