"""Small offline tasks generated from corpus-like text."""

import json

from gemma_jax.evals import synthetic

PROSE = [
  "Return the sum of two numbers. The result is an int when both are. "
  "Floats give a float.\n\nThis paragraph has one sentence only.",
  "Open a file for reading. Raise OSError when it is missing. The mode "
  "defaults to text.\nLines wrap here. Nothing else happens.",
  "Parse the header line. Unknown fields are ignored silently. Empty input "
  "gives an empty dict.\n\n    >>> parse('')\n    {}",
]
CODE = [
  "def add(a, b):\n    total = a + b\n    if total > 10:\n"
  "        total = total - 10\n    return total\n\n\n"
  "def sub(a, b):\n    return a - b\n",
  "class Box:\n    def __init__(self, value):\n        self.value = value\n"
  "        self.items = []\n\n    def put(self, item):\n"
  "        self.items.append(item)\n        return len(self.items)\n",
]


def check_mc(items, num_choices=4):
  for it in items:
    assert len(it["choices"]) == num_choices
    assert len(set(it["choices"])) == num_choices
    assert 0 <= it["gold"] < num_choices


def test_prose_next_picks_the_true_following_sentence():
  items = synthetic.prose_next(PROSE, 50, seed=0, num_choices=3)
  assert 4 <= len(items) <= 50
  check_mc(items, 3)
  flat = [" ".join(d.split()) for d in PROSE]
  for it in items:
    answer = it["choices"][it["gold"]]
    # Context, " ", the answer: a contiguous passage of one document.
    assert any(it["context"] + " " + answer in text for text in flat)
    assert it["context"][-1] in ".!?"
    # Distractors come from the other documents.
    source = next(d for d in flat if it["context"] + " " + answer in d)
    for c in it["choices"]:
      assert c == answer or c not in source
  assert not any(">>>" in it["context"] for it in items)


def test_code_next_scores_the_original_text(tmp_path):
  items = synthetic.code_next(CODE, 20, seed=0, num_choices=3, context_lines=2)
  check_mc(items, 3)
  assert items
  for it in items:
    # _encode_pair moves the context's trailing newline and indentation onto
    # " " + answer, which then reads exactly as the file does.
    ctx = it["context"]
    answer = it["choices"][it["gold"]]
    moved = ctx[len(ctx.rstrip()) :] + " " + answer
    assert moved.startswith("\n") and moved.endswith("    " + answer)
    assert any(ctx.rstrip() + moved + "\n" in doc for doc in CODE)


def test_arithmetic_answers_are_right_and_gsm8k_shaped():
  items = synthetic.arithmetic(40, seed=3)
  for it in items:
    expr = (
      it["context"]
      .removeprefix("Question: Compute ")
      .removesuffix(".\nAnswer:")
    )
    value = eval(expr)  # digits and + - * only
    assert it["answer"].endswith(f"The answer is {value}.\n#### {value}")
  assert {it["context"].count("(") for it in items} == {0, 1}


def test_generation_is_deterministic_per_seed():
  assert synthetic.code_next(CODE, 5, seed=1) == synthetic.code_next(
    CODE, 5, seed=1
  )
  assert synthetic.arithmetic(5, 1) == synthetic.arithmetic(5, 1)
  assert synthetic.arithmetic(5, 1) != synthetic.arithmetic(5, 2)


def test_written_files_are_the_tasks_in_the_generic_formats(tmp_path):
  paths = synthetic.write_synthetic(
    tmp_path, {"prose": PROSE, "code": CODE}, num_items=6, num_shots=3
  )
  assert sorted(paths) == [
    "arithmetic",
    "arithmetic_shots",
    "code_next",
    "code_next_shots",
    "prose_next",
    "prose_next_shots",
  ]
  rows = {n: [json.loads(line) for line in open(p)] for n, p in paths.items()}
  assert len(rows["arithmetic"]) == 6 and len(rows["arithmetic_shots"]) == 3
  assert len(rows["code_next"]) >= 2
  for name in ("prose_next", "code_next"):
    check_mc(rows[name])
    assert set(rows[name][0]) == {"context", "choices", "gold"}
  assert set(rows["arithmetic"][0]) == {"context", "answer"}


def test_as_harness_tasks_the_requests_are_the_files(tmp_path):
  """The harness's own tasks over the files score each item's context and
  its gold choice after the harness's " " (multiple choice), and the
  worked answer after a 5-shot prompt (arithmetic, as gsm8k)."""
  import pytest

  pytest.importorskip("lm_eval", reason="needs the `eval` extra (lm-eval)")
  from gemma_jax.evals import benchmarks

  paths = synthetic.write_synthetic(
    tmp_path, {"prose": PROSE, "code": CODE}, num_items=6, num_shots=6
  )
  yamls = synthetic.write_harness_tasks(tmp_path, paths)
  assert sorted(yamls) == ["arithmetic", "code_next", "prose_next"]
  opts = benchmarks.Options(tasks=tuple(yamls), include_path=(str(tmp_path),))
  found = {t["task"]: t for t in benchmarks.gold_requests(opts)}
  assert found["arithmetic"]["num_fewshot"] == 5
  for name in ("prose_next", "code_next"):
    items = [json.loads(line) for line in open(paths[name])]
    assert found[name]["num_fewshot"] == 0
    assert found[name]["requests"] == [
      (it["context"], " " + it["choices"][it["gold"]]) for it in items
    ]
  math = [json.loads(line) for line in open(paths["arithmetic"])]
  for (context, target), row in zip(found["arithmetic"]["requests"], math):
    assert context.endswith(row["context"]) and context.count("#### ") == 5
    assert target == " " + row["answer"]
