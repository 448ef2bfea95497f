"""Benchmark files in their original formats -> `Doc`s, as the harness sees
them.

Each reader turns one file into the documents that lm-evaluation-harness
(0.4.x) would build from the same data: `query` is the task's `doc_to_text`,
`choices` its `doc_to_choice`, `gold` / `target` its `doc_to_target`. Nothing
is downloaded: the user points at local files.

    read_arc("ARC-Easy-Test.jsonl")             # AI2 jsonl (or HF rows)
    read_mmlu_csv("data/test/anatomy_test.csv") # no header: q, A, B, C, D, ans
    read_gsm8k("gsm8k/test.jsonl")              # question, answer "... #### N"
    read_hellaswag("hellaswag_val.jsonl")       # ctx_a, ctx_b, endings, label
    read_multiple_choice("mine.jsonl")          # {context, choices, gold}
    read_generative("mine.jsonl")               # {context, answer}

A malformed line, an empty choice list or a gold index out of range raises
DataError naming the file and the line.
"""

import csv
import dataclasses
import io
import json
import os
import re

from gemma_jax.errors import DataError

MMLU_LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class Doc:
  """One benchmark item.

  query: the prompt text of this item alone (doc_to_text).
  choices: the answer strings (multiple choice); the scored continuation of
    choice i is target_delimiter + choices[i].
  gold: index of the right choice (multiple choice), else -1.
  target: the reference answer (generative; also the text shown after the
    query when the item is a few-shot example).
  where: 'file:line', for messages and per-item output. Not compared: the
    harness tells documents apart by their content only.
  """

  query: str
  choices: tuple[str, ...] = ()
  gold: int = -1
  target: str = ""
  where: str = dataclasses.field(default="", compare=False)

  @property
  def answer(self) -> str:
    """The text that follows the query in a few-shot example."""
    return self.choices[self.gold] if self.choices else self.target


def read_utf8(path) -> str:
  """The text of a task file. A byte that is not UTF-8 is refused in the
  words a data file's are (gemma_jax/data/sources.py): a benchmark's
  questions are not to be guessed at."""
  try:
    with open(os.path.expanduser(os.fspath(path)), "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    escaped = raw.decode("utf-8", "surrogateescape")
    bad = len(re.findall("[\udc80-\udcff]", escaped))
    raise DataError(
      f"{path}: {bad} of {len(raw)} bytes are not UTF-8 (first at byte "
      f"{e.start}); convert the file to UTF-8"
    ) from None


def _jsonl(path):
  """Yields (line number, dict) for every non-blank line of a jsonl file."""
  for number, line in enumerate(read_utf8(path).split("\n"), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{number}: not a JSON line ({e.msg})") from None
    if not isinstance(row, dict):
      raise DataError(
        f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
      )
    yield number, row


def _field(row, key, kind, where):
  if key not in row:
    raise DataError(f"{where}: missing field {key!r}")
  value = row[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise DataError(
      f"{where}: field {key!r} must be {kind.__name__}, got "
      f"{type(value).__name__}"
    )
  return value


def _choices(values, where, key="choices"):
  if not isinstance(values, list) or not values:
    raise DataError(f"{where}: {key!r} must be a non-empty list of strings")
  if not all(isinstance(v, str) for v in values):
    raise DataError(f"{where}: every entry of {key!r} must be a string")
  return tuple(values)


def _mc_doc(query, choices, gold, where) -> Doc:
  if not 0 <= gold < len(choices):
    raise DataError(
      f"{where}: gold index {gold} is outside the "
      f"{len(choices)} choices (0..{len(choices) - 1})"
    )
  return Doc(query, choices, gold, where=where)


def _nonempty(docs, path):
  if not docs:
    raise DataError(f"{path}: no items")
  return docs


def read_arc(path) -> list[Doc]:
  """ARC (AI2 jsonl: question.stem, question.choices[{label, text}],
  answerKey; or the HF dataset's rows: question, choices{text, label}).

  Harness arc_easy / arc_challenge: "Question: {{question}}\\nAnswer:",
  choices the texts, gold = labels.index(answerKey).
  """
  docs = []
  for number, row in _jsonl(path):
    where = f"{path}:{number}"
    question = row.get("question")
    if isinstance(question, dict):  # AI2 layout
      stem = _field(question, "stem", str, where)
      items = question.get("choices")
      if not isinstance(items, list) or not items:
        raise DataError(
          f"{where}: 'question.choices' must be a non-empty "
          "list of {label, text}"
        )
      if not all(isinstance(c, dict) for c in items):
        raise DataError(
          f"{where}: every choice must be a {{label, text}} object"
        )
      labels = [_field(c, "label", str, where) for c in items]
      texts = [_field(c, "text", str, where) for c in items]
    else:  # HF layout
      stem = _field(row, "question", str, where)
      choices = _field(row, "choices", dict, where)
      texts = list(_choices(choices.get("text"), where, "choices.text"))
      labels = list(_choices(choices.get("label"), where, "choices.label"))
      if len(labels) != len(texts):
        raise DataError(
          f"{where}: {len(labels)} labels for {len(texts)} choice texts"
        )
    key = _field(row, "answerKey", str, where)
    if key not in labels:
      raise DataError(
        f"{where}: answerKey {key!r} is not one of the labels {labels}"
      )
    docs.append(
      _mc_doc(
        f"Question: {stem}\nAnswer:", tuple(texts), labels.index(key), where
      )
    )
  return _nonempty(docs, path)


def mmlu_query(question: str, options) -> str:
  """Harness mmlu (default): the question, lettered options, "Answer:"."""
  lines = [question.strip()]
  lines += [f"{letter}. {text}" for letter, text in zip(MMLU_LETTERS, options)]
  return "\n".join(lines) + "\nAnswer:"


def read_mmlu_csv(path) -> list[Doc]:
  """One MMLU csv (no header: question, A, B, C, D, answer letter).

  Choices are the letters " A" .. " D" (with the target delimiter), as in
  the harness's default MMLU task.
  """
  docs = []
  with io.StringIO(read_utf8(path), newline="") as f:
    reader = csv.reader(f)
    try:
      for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row:
          continue
        if len(row) != 6:
          raise DataError(
            f"{where}: expected 6 columns (question, A, B, C, "
            f"D, answer), got {len(row)}"
          )
        answer = row[5].strip()
        if answer not in MMLU_LETTERS:
          raise DataError(
            f"{where}: answer {row[5]!r} is not one of "
            f"{', '.join(MMLU_LETTERS)}"
          )
        docs.append(
          _mc_doc(
            mmlu_query(row[0], row[1:5]),
            MMLU_LETTERS,
            MMLU_LETTERS.index(answer),
            where,
          )
        )
    except csv.Error as e:
      raise DataError(f"{path}:{reader.line_num}: bad CSV ({e})") from None
  return _nonempty(docs, path)


def mmlu_subject(path) -> str:
  """'data/test/high_school_biology_test.csv' -> 'high_school_biology'."""
  name = os.path.basename(os.fspath(path))
  return re.sub(r"_(dev|val|test)\.csv$", "", name)


def gsm8k_query(question: str) -> str:
  return f"Question: {question}\nAnswer:"


def read_gsm8k(path) -> list[Doc]:
  """GSM8K jsonl: question, answer (worked solution ending "#### N").

  Harness gsm8k: "Question: {{question}}\\nAnswer:", target the whole
  answer (shown after the query in few-shot examples).
  """
  docs = []
  for number, row in _jsonl(path):
    where = f"{path}:{number}"
    question = _field(row, "question", str, where)
    answer = _field(row, "answer", str, where)
    docs.append(Doc(gsm8k_query(question), target=answer, where=where))
  return _nonempty(docs, path)


def hellaswag_preprocess(text: str) -> str:
  """The harness's hellaswag/utils.py `preprocess`, character for character."""
  text = text.strip()
  # Brackets are artifacts of the WikiHow part of HellaSwag.
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  text = text.replace("  ", " ")
  return text


def read_hellaswag(path) -> list[Doc]:
  """HellaSwag jsonl: activity_label, ctx_a, ctx_b, endings, label.

  Harness hellaswag: query = preprocess(activity_label + ": " + ctx_a + " "
  + ctx_b.capitalize()), choices = preprocess(ending) each.
  """
  docs = []
  for number, row in _jsonl(path):
    where = f"{path}:{number}"
    activity = _field(row, "activity_label", str, where)
    ctx_a = _field(row, "ctx_a", str, where)
    ctx_b = _field(row, "ctx_b", str, where)
    endings = _choices(row.get("endings"), where, "endings")
    label = row.get("label")
    try:
      gold = int(label)
    except (TypeError, ValueError):
      raise DataError(
        f"{where}: 'label' must be an integer, got "
        f"{label!r} (the public test file has no labels)"
      ) from None
    ctx = ctx_a + " " + ctx_b.capitalize()
    docs.append(
      _mc_doc(
        hellaswag_preprocess(activity + ": " + ctx),
        tuple(hellaswag_preprocess(e) for e in endings),
        gold,
        where,
      )
    )
  return _nonempty(docs, path)


def read_multiple_choice(path) -> list[Doc]:
  """Generic jsonl {context, choices, gold}: query = context as is."""
  docs = []
  for number, row in _jsonl(path):
    where = f"{path}:{number}"
    context = _field(row, "context", str, where)
    choices = _choices(row.get("choices"), where)
    gold = _field(row, "gold", int, where)
    docs.append(_mc_doc(context, choices, gold, where))
  return _nonempty(docs, path)


def read_generative(path) -> list[Doc]:
  """Generic jsonl {context, answer}: query = context, target = answer."""
  docs = []
  for number, row in _jsonl(path):
    where = f"{path}:{number}"
    docs.append(
      Doc(
        _field(row, "context", str, where),
        target=_field(row, "answer", str, where),
        where=where,
      )
    )
  return _nonempty(docs, path)
