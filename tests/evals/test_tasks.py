"""Prompts and few-shot examples exactly as lm-evaluation-harness 0.4.x builds
them: description + (query + " " + answer + "\\n\\n") per shot + query."""

import csv
import json
import random

import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.evals import tasks
from gemma_jax.evals.readers import Doc


def jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def arc_rows(prefix, n):
  return [
    {
      "id": f"{prefix}{i}",
      "answerKey": "A",
      "question": {
        "stem": f"{prefix} question {i}?",
        "choices": [
          {"label": "A", "text": f"{prefix} yes {i}"},
          {"label": "B", "text": "no"},
        ],
      },
    }
    for i in range(n)
  ]


def test_arc_zero_shot_is_the_bare_question(tmp_path):
  task = tasks.arc(jsonl(tmp_path / "t.jsonl", arc_rows("test", 2)))
  assert task.num_fewshot == 0 and task.kind == "multiple_choice"
  assert tasks.contexts(task) == [
    "Question: test question 0?\nAnswer:",
    "Question: test question 1?\nAnswer:",
  ]


def test_random_shots_come_from_one_generator_seeded_1234(tmp_path):
  task = tasks.arc(
    jsonl(tmp_path / "t.jsonl", arc_rows("test", 2)),
    shots=jsonl(tmp_path / "s.jsonl", arc_rows("train", 6)),
    num_fewshot=2,
  )
  # The harness's ContextSampler: one Random(1234) for the whole task,
  # rnd.sample(pool, k) for each document in turn.
  rnd = random.Random(1234)
  first, second = rnd.sample(range(6), 2), rnd.sample(range(6), 2)
  i, j = first

  def shot(k):
    return f"Question: train question {k}?\nAnswer: train yes {k}\n\n"

  ctx = tasks.contexts(task)
  assert ctx[0] == shot(i) + shot(j) + "Question: test question 0?\nAnswer:"
  assert (
    ctx[1]
    == "".join(shot(k) for k in second) + "Question: test question 1?\nAnswer:"
  )
  # Another seed, other shots.
  assert tasks.contexts(task, seed=1) != ctx


def test_shots_from_the_scored_file_skip_the_document(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(
    "".join(
      json.dumps({"context": f"q{i}", "choices": ["a"], "gold": 0}) + "\n"
      for i in range(3)
    )
  )
  task = tasks.multiple_choice(path, shots=path, num_fewshot=2)
  assert task.exclude_doc
  for doc, ctx in zip(task.docs, tasks.contexts(task)):
    shots = ctx.split("\n\n")[:-1]
    assert len(shots) == 2 and doc.query not in shots[0] + shots[1]
  # Duplicates of the document in the pool are all excluded.
  dup = Doc("q", ("a",), 0)
  pool = tasks.Task(
    "t",
    "multiple_choice",
    (dup,),
    (dup, dup, dup, Doc("x", ("y",), 0)),
    num_fewshot=1,
    exclude_doc=True,
  )
  for seed in range(20):
    assert tasks.contexts(pool, seed) == ["x y\n\nq"]


def write_mmlu(root):
  rows = {
    "dev": [
      ["Dev one?", "1", "2", "3", "4", "B"],
      ["Dev two?", "a", "b", "c", "d", "D"],
      ["Dev three?", "w", "x", "y", "z", "A"],
    ],
    "test": [[" What is 6 * 7? ", "42", "13", "67", "0", "A"]],
  }
  for split, lines in rows.items():
    (root / split).mkdir(parents=True)
    with open(root / split / f"college_math_{split}.csv", "w", newline="") as f:
      csv.writer(f).writerows(lines)


def test_mmlu_prompts(tmp_path):
  write_mmlu(tmp_path)
  [zero] = tasks.mmlu(tmp_path)
  assert zero.name == "mmlu_college_math" and zero.group == "mmlu"
  head = (
    "The following are multiple choice questions (with answers) about "
    "college math.\n\n"
  )
  question = "What is 6 * 7?\nA. 42\nB. 13\nC. 67\nD. 0\nAnswer:"
  assert tasks.contexts(zero) == [head + question]
  assert zero.docs[0].choices == ("A", "B", "C", "D")
  [two] = tasks.mmlu(tmp_path, num_fewshot=2)
  # first_n: the first two dev questions, in order, answered by letter.
  assert tasks.contexts(two) == [
    head + "Dev one?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
    "Dev two?\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n" + question
  ]


def test_gsm8k_is_five_shot_by_default(tmp_path):
  train = jsonl(
    tmp_path / "train.jsonl",
    [{"question": f"Q{i}?", "answer": f"work {i}\n#### {i}"} for i in range(5)],
  )
  test = jsonl(
    tmp_path / "test.jsonl", [{"question": "Last?", "answer": "#### 9"}]
  )
  task = tasks.gsm8k(test, train)
  assert task.num_fewshot == 5 and task.until == (
    "Question:",
    "</s>",
    "<|im_end|>",
  )
  order = random.Random(1234).sample(range(5), 5)
  assert tasks.contexts(task) == [
    "".join(f"Question: Q{i}?\nAnswer: work {i}\n#### {i}\n\n" for i in order)
    + "Question: Last?\nAnswer:"
  ]
  with pytest.raises(
    ConfigError,
    match="gsm8k: 5-shot needs at least 5 few-shot documents, found 0",
  ):
    tasks.contexts(tasks.gsm8k(test))
  assert tasks.contexts(tasks.gsm8k(test, num_fewshot=0)) == [
    "Question: Last?\nAnswer:"
  ]


def test_hellaswag_prompts(tmp_path):
  def rows(name, n):
    return [
      {
        "activity_label": name,
        "ctx_a": f"Step {i}.",
        "ctx_b": "she",
        "endings": [f"ends {i}.", "sings."],
        "label": 0,
      }
      for i in range(n)
    ]

  val = jsonl(tmp_path / "v.jsonl", rows("Baking", 2))
  assert tasks.contexts(tasks.hellaswag(val)) == [
    "Baking: Step 0. She",
    "Baking: Step 1. She",
  ]
  task = tasks.hellaswag(
    val, jsonl(tmp_path / "t.jsonl", rows("Train", 6)), num_fewshot=2
  )
  # The harness's test and few-shot splits are both unset, so it draws
  # k + 1 shots per document (dropping any equal to it), keeping k.
  rnd = random.Random(1234)
  draws = [rnd.sample(range(6), 3)[:2] for _ in range(2)]
  assert tasks.contexts(task) == [
    "".join(f"Train: Step {k}. She ends {k}.\n\n" for k in ks)
    + f"Baking: Step {i}. She"
    for i, ks in enumerate(draws)
  ]


def test_an_empty_answer_gets_no_delimiters():
  shot = Doc("Q: x", target="")
  task = tasks.Task(
    "t", "generate_until", (Doc("Q: y"),), (shot,), num_fewshot=1
  )
  assert tasks.contexts(task) == ["Q: xQ: y"]


def test_negative_shots_are_refused(tmp_path):
  with pytest.raises(ConfigError, match="num_fewshot must be >= 0"):
    tasks.arc(jsonl(tmp_path / "t.jsonl", arc_rows("q", 1)), num_fewshot=-1)


def test_task_lists_name_kinds_and_take_max_gen_toks_for_generative_only(
  tmp_path,
):
  import yaml

  mc = jsonl(
    tmp_path / "mc.jsonl",
    [{"context": "the cat sat on the", "choices": ["mat", "x"], "gold": 0}],
  )
  gen = jsonl(tmp_path / "gen.jsonl", [{"context": "1 + 1?", "answer": "2"}])
  (tmp_path / "bad.yaml").write_text(
    yaml.safe_dump([{"kind": "nope", "path": "x"}])
  )
  with pytest.raises(ConfigError, match="kind 'nope' is not one of"):
    tasks.load_tasks(tmp_path / "bad.yaml")
  (tmp_path / "gen.yaml").write_text(
    yaml.safe_dump(
      [{"kind": "generative", "path": str(gen), "max_gen_toks": 16}]
    )
  )
  assert tasks.load_tasks(tmp_path / "gen.yaml")[0].max_gen_toks == 16
  (tmp_path / "mc.yaml").write_text(
    yaml.safe_dump(
      [{"kind": "multiple_choice", "path": str(mc), "max_gen_toks": 16}]
    )
  )
  with pytest.raises(ConfigError, match="max_gen_toks. is for generative"):
    tasks.load_tasks(tmp_path / "mc.yaml")
