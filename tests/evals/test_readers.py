"""Benchmark files in their original formats -> Docs as the harness sees
them."""

import json

import pytest

from gemma_jax.errors import DataError
from gemma_jax.evals import readers
from gemma_jax.evals.readers import Doc


def jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                          for r in rows))
  return path


ARC_AI2 = [
    {"id": "q1", "answerKey": "B", "question": {"stem": "Which is a gas?",
     "choices": [{"label": "A", "text": "ice"}, {"label": "B", "text": "steam"},
                 {"label": "C", "text": "wood"}]}},
    {"id": "q2", "answerKey": "1", "question": {"stem": "2 + 2 =",
     "choices": [{"label": "1", "text": "4"}, {"label": "2", "text": "5"}]}},
]


def test_arc_ai2_layout(tmp_path):
  docs = readers.read_arc(jsonl(tmp_path / "arc.jsonl", ARC_AI2))
  assert docs == [Doc("Question: Which is a gas?\nAnswer:",
                      ("ice", "steam", "wood"), 1),
                  Doc("Question: 2 + 2 =\nAnswer:", ("4", "5"), 0)]
  assert docs[1].where == f"{tmp_path / 'arc.jsonl'}:2"
  assert docs[0].answer == "steam"


def test_arc_hf_layout_gives_the_same_docs(tmp_path):
  rows = [{"id": r["id"], "question": r["question"]["stem"],
           "answerKey": r["answerKey"],
           "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                       "label": [c["label"] for c in r["question"]["choices"]]}}
          for r in ARC_AI2]
  assert readers.read_arc(jsonl(tmp_path / "hf.jsonl", rows)) == \
      readers.read_arc(jsonl(tmp_path / "ai2.jsonl", ARC_AI2))


def test_mmlu_csv_with_quoted_newlines_and_commas(tmp_path):
  path = tmp_path / "college_physics_test.csv"
  path.write_text('"  What is x,\nreally? ",1,"2, or 3",x y,-,C\n'
                  'Second?,a,b,c,d,A\n')
  docs = readers.read_mmlu_csv(path)
  assert docs[0] == Doc("What is x,\nreally?\nA. 1\nB. 2, or 3\nC. x y\n"
                        "D. -\nAnswer:", ("A", "B", "C", "D"), 2)
  assert docs[1].gold == 0 and docs[1].where == f"{path}:3"
  assert readers.mmlu_subject(path) == "college_physics"


def test_gsm8k(tmp_path):
  path = jsonl(tmp_path / "gsm.jsonl", [
      {"question": "Tom has 3 apples and buys 2. How many?",
       "answer": "3 + 2 = <<3+2=5>>5\n#### 5"}])
  assert readers.read_gsm8k(path) == [Doc(
      "Question: Tom has 3 apples and buys 2. How many?\nAnswer:",
      target="3 + 2 = <<3+2=5>>5\n#### 5")]


def test_hellaswag_preprocessing_matches_the_harness(tmp_path):
  path = jsonl(tmp_path / "hs.jsonl", [{
      "ind": 4, "activity_label": "Making a cake", "label": "2",
      "ctx_a": "A woman mixes flour [header] in a bowl.",
      "ctx_b": "then SHE",
      "endings": [" pours the batter.  ", "eats it [title] Done it.",
                  "bakes", "runs"]}])
  [doc] = readers.read_hellaswag(path)
  # ctx_b.capitalize() lower-cases the rest; [header] goes, then the double
  # space it leaves becomes one; " [title]" becomes ". ".
  assert doc == Doc("Making a cake: A woman mixes flour in a bowl. Then she",
                    ("pours the batter.", "eats it. Done it.", "bakes",
                     "runs"), 2)


def test_generic_formats(tmp_path):
  mc = jsonl(tmp_path / "mc.jsonl", [
      {"context": "The sky is", "choices": ["blue", "green"], "gold": 0}])
  gen = jsonl(tmp_path / "gen.jsonl", [
      {"context": "Question: 1+1?\nAnswer:", "answer": "2\n#### 2"}])
  assert readers.read_multiple_choice(mc) == [Doc("The sky is",
                                                  ("blue", "green"), 0)]
  assert readers.read_generative(gen) == [Doc("Question: 1+1?\nAnswer:",
                                              target="2\n#### 2")]


def test_blank_lines_are_skipped_but_counted(tmp_path):
  path = tmp_path / "mc.jsonl"
  path.write_text('\n{"context": "a", "choices": ["b"], "gold": 0}\n\n'
                  '{"context": "c", "choices": ["d"], "gold": 3}\n')
  with pytest.raises(DataError, match=r"mc.jsonl:4: gold index 3 is outside "
                     r"the 1 choices \(0..0\)"):
    readers.read_multiple_choice(path)


MC_OK = '{"context": "a", "choices": ["b", "c"], "gold": 1}'


@pytest.mark.parametrize("reader, lines, message", [
    (readers.read_multiple_choice, [MC_OK, '{"context": "a", "choices"'],
     "f.jsonl:2: not a JSON line"),
    (readers.read_multiple_choice, [MC_OK, "[1, 2]"],
     "f.jsonl:2: expected a JSON object, got list"),
    (readers.read_multiple_choice, ['{"context": "a", "choices": [], '
                                    '"gold": 0}'],
     "f.jsonl:1: 'choices' must be a non-empty list"),
    (readers.read_multiple_choice, [MC_OK, '{"context": "a", "choices": '
                                    '["b"], "gold": -1}'],
     "f.jsonl:2: gold index -1 is outside"),
    (readers.read_multiple_choice, ['{"context": "a", "choices": ["b"], '
                                    '"gold": "0"}'],
     "f.jsonl:1: field 'gold' must be int, got str"),
    (readers.read_multiple_choice, ['{"choices": ["b"], "gold": 0}'],
     "f.jsonl:1: missing field 'context'"),
    (readers.read_generative, ['{"context": "a"}'],
     "f.jsonl:1: missing field 'answer'"),
    (readers.read_arc, [json.dumps(ARC_AI2[0]), json.dumps(
        {**ARC_AI2[1], "answerKey": "E"})],
     "f.jsonl:2: answerKey 'E' is not one of the labels"),
    (readers.read_arc, [json.dumps({"answerKey": "A", "question": {
        "stem": "q", "choices": []}})],
     "f.jsonl:1: 'question.choices' must be a non-empty list"),
    (readers.read_gsm8k, ['{"question": "q", "answer": 5}'],
     "f.jsonl:1: field 'answer' must be str, got int"),
    (readers.read_hellaswag, ['{"activity_label": "a", "ctx_a": "b", '
                              '"ctx_b": "c", "endings": ["d", "e"]}'],
     "f.jsonl:1: 'label' must be an integer"),
    (readers.read_hellaswag, ['{"activity_label": "a", "ctx_a": "b", '
                              '"ctx_b": "c", "endings": ["d"], "label": 1}'],
     "f.jsonl:1: gold index 1 is outside the 1 choices"),
    (readers.read_generative, [], "f.jsonl: no items"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, reader, lines, message):
  path = tmp_path / "f.jsonl"
  path.write_text("".join(line + "\n" for line in lines))
  with pytest.raises(DataError) as e:
    reader(path)
  assert str(e.value).startswith(str(tmp_path)) and message in str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("q,a,b,c,d,A\nq,a,b,c,E\n", "x_test.csv:2: expected 6 columns"),
    ("q,a,b,c,d,A\nq,a,b,c,d,E\n", "x_test.csv:2: answer 'E' is not one of"),
    ('q,a,b,c,d,A\n"q\nstill q",a,b,c,d,F\n', "x_test.csv:3: answer 'F'"),
])
def test_bad_mmlu_csv_names_file_and_line(tmp_path, text, message):
  path = tmp_path / "x_test.csv"
  path.write_text(text)
  with pytest.raises(DataError, match=message):
    readers.read_mmlu_csv(path)


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl: cannot read"):
    readers.read_arc(tmp_path / "nope.jsonl")
