"""Small benchmark files generated from the embedded corpus, for offline runs.

Three tasks as JSON lines ({context, choices, gold} for multiple choice,
{context, answer} for arithmetic), deterministic for a seed:

    prose_next   multiple choice: the sentence that follows a passage of
                 standard-library docstrings, among sentences of other
                 docstrings
    code_next    multiple choice: the line that follows a few lines of
                 standard-library code, among lines of other files
    arithmetic   generative, GSM8K style: "Question: Compute (12 + 30) * 4.
                 \\nAnswer:" -> "... The answer is 168.\\n#### 168"

The multiple-choice items come from the corpus's held-out (eval) files, so a
model trained on the corpus has not seen them. Contexts are cut so that the
harness's " " delimiter reads naturally: a passage ends with its sentence's
full stop; a code context ends with the newline and all but one space of the
next line's indentation, which `_encode_pair` moves onto the continuation,
so the scored text is exactly the file's.

    paths = write_synthetic("evals/")   # {name: path}; shots files too
    write_harness_tasks("evals/", paths)  # evals/<name>.yaml for the harness

As lm-evaluation-harness tasks (`gemma-jax report --include-path evals/
--tasks prose_next,code_next,arithmetic`): the multiple-choice ones in the
harness's own format (doc_to_text the context, doc_to_choice the choices,
doc_to_target the gold index; acc and acc_norm), arithmetic as the
harness's gsm8k task (include:) over the local files, 5-shot from the
shots file, strict-match and flexible-extract.
"""

import json
import os
import random
import re
from collections.abc import Sequence

from gemma_jax import fileio

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _paragraph_sentences(doc: str) -> list[list[str]]:
  """Sentences of each prose paragraph (lines joined, spaces collapsed)."""
  out = []
  for para in re.split(r"\n\s*\n", doc):
    lines = para.splitlines()
    if any(line.startswith((" ", "\t", ">>>")) for line in lines):
      continue  # code examples and indented blocks are not prose
    text = " ".join(para.split())
    if text:
      out.append(SENTENCE_END.split(text))
  return out


def _good_sentence(s: str) -> bool:
  return 20 <= len(s) <= 200 and s[0].isupper() and s[-1] in ".!?"


def _mc_item(
  context: str,
  answer: str,
  pool: Sequence[str],
  rng: random.Random,
  num_choices: int,
) -> dict:
  distractors: list[str] = []
  while len(distractors) < num_choices - 1:
    c = rng.choice(pool)
    if c != answer and c not in distractors:
      distractors.append(c)
  gold = rng.randrange(num_choices)
  choices = distractors[:gold] + [answer] + distractors[gold:]
  return {"context": context, "choices": choices, "gold": gold}


def prose_next(
  docs: Sequence[str],
  num_items: int,
  seed: int = 0,
  num_choices: int = 4,
  context_chars: int = 300,
) -> list[dict]:
  """Next-sentence multiple choice over prose documents."""
  rng = random.Random(seed)
  candidates, pool = [], []
  for d, doc in enumerate(docs):
    for sentences in _paragraph_sentences(doc):
      pool += [(d, s) for s in sentences if _good_sentence(s)]
      for i in range(1, len(sentences)):
        if _good_sentence(sentences[i]) and sentences[i - 1][-1:] in ".!?":
          candidates.append((d, sentences[:i], sentences[i]))
  items = []
  for d, before, answer in rng.sample(
    candidates, min(num_items, len(candidates))
  ):
    context = before[-1]
    for s in reversed(before[:-1]):
      if len(s) + 1 + len(context) > context_chars:
        break
      context = s + " " + context
    others = [s for e, s in pool if e != d]
    items.append(_mc_item(context, answer, others, rng, num_choices))
  return items


def _good_line(line: str) -> bool:
  text = line.strip()
  return 10 <= len(text) <= 120 and not text.startswith("#")


def code_next(
  docs: Sequence[str],
  num_items: int,
  seed: int = 0,
  num_choices: int = 4,
  context_lines: int = 6,
) -> list[dict]:
  """Next-line multiple choice over code files (indented target lines)."""
  rng = random.Random(seed)
  candidates, pool = [], []
  for d, doc in enumerate(docs):
    lines = doc.splitlines()
    pool += [(d, line.strip()) for line in lines if _good_line(line)]
    for i in range(context_lines, len(lines)):
      line = lines[i]
      indent = len(line) - len(line.lstrip(" "))
      if indent and _good_line(line) and "\t" not in line[:indent]:
        candidates.append((d, lines[i - context_lines : i], line, indent))
  items = []
  for d, before, line, indent in rng.sample(
    candidates, min(num_items, len(candidates))
  ):
    context = "\n".join(before) + "\n" + " " * (indent - 1)
    others = [s for e, s in pool if e != d]
    items.append(_mc_item(context, line.strip(), others, rng, num_choices))
  return items


def _question(rng: random.Random) -> tuple[str, str]:
  """One problem with the embedded corpus's ranges: (expression, worked
  answer ending "#### N")."""
  a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
  kind = rng.randrange(4)
  if kind == 0:
    return f"{a} + {b}", f"{a} + {b} = {a + b}. The answer is {a + b}."
  if kind == 1:
    return f"{a} - {b}", f"{a} - {b} = {a - b}. The answer is {a - b}."
  if kind == 2:
    return f"{a} * {c}", f"{a} * {c} = {a * c}. The answer is {a * c}."
  s = a + b
  return (
    f"({a} + {b}) * {c}",
    f"First {a} + {b} = {s}. Then {s} * {c} = {s * c}. The answer is {s * c}.",
  )


def arithmetic(num_items: int, seed: int = 0) -> list[dict]:
  """GSM8K-style {context, answer} arithmetic questions."""
  rng = random.Random(seed)
  items = []
  for _ in range(num_items):
    expr, worked = _question(rng)
    result = worked.rsplit(" ", 1)[1].rstrip(".")
    items.append(
      {
        "context": f"Question: Compute {expr}.\nAnswer:",
        "answer": f"{worked}\n#### {result}",
      }
    )
  return items


def write_jsonl(path, rows: Sequence[dict]) -> None:
  fileio.atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_synthetic(
  out_dir,
  texts: dict | None = None,
  num_items: int = 200,
  num_shots: int = 50,
  seed: int = 0,
) -> dict[str, str]:
  """Writes the three tasks (and a shots file for each) into `out_dir`.

  texts: {'prose': [...], 'code': [...]} held-out documents; default the
    embedded corpus's eval splits (gemma_jax.data.corpus).
  Returns {name: path} with names prose_next, code_next, arithmetic and
  <name>_shots, drawn with another seed (for prose and code by default from
  the corpus's training documents, so shots never repeat a scored item;
  from `texts` when given).
  """
  if texts is None:
    from gemma_jax.data import corpus

    splits = corpus.corpus_texts()
    texts = {s: splits[s]["eval"] for s in ("prose", "code")}
    shots_texts = {s: splits[s]["train"][:20] for s in ("prose", "code")}
  else:
    shots_texts = texts
  os.makedirs(os.path.expanduser(os.fspath(out_dir)), exist_ok=True)
  rows = {
    "prose_next": prose_next(texts["prose"], num_items, seed),
    "code_next": code_next(texts["code"], num_items, seed),
    "arithmetic": arithmetic(num_items, seed),
    "prose_next_shots": prose_next(shots_texts["prose"], num_shots, seed + 1),
    "code_next_shots": code_next(shots_texts["code"], num_shots, seed + 1),
    "arithmetic_shots": arithmetic(num_shots, seed + 1),
  }
  paths = {}
  for name, items in rows.items():
    paths[name] = os.path.join(
      os.path.expanduser(os.fspath(out_dir)), f"{name}.jsonl"
    )
    write_jsonl(paths[name], items)
  return paths


def _mc_task(name: str, path: str) -> dict:
  return {
    "task": name,
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": path}},
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{context}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{gold}}",
    "metric_list": [
      {"metric": m, "aggregation": "mean", "higher_is_better": True}
      for m in ("acc", "acc_norm")
    ],
    "metadata": {"version": 1.0},
  }


def write_harness_tasks(out_dir, paths: dict[str, str]) -> dict[str, str]:
  """A harness task YAML per task of `paths` (write_synthetic's) into
  `out_dir`; returns {name: yaml path}."""
  import lm_eval

  gsm8k = os.path.join(os.path.dirname(lm_eval.__file__), "tasks/gsm8k")
  configs = {
    name: _mc_task(name, os.path.abspath(paths[name]))
    for name in ("prose_next", "code_next")
  }
  configs["arithmetic"] = {
    "include": os.path.join(gsm8k, "gsm8k.yaml"),
    "task": "arithmetic",
    "tag": [],
    "dataset_path": "json",
    "dataset_name": None,
    "dataset_kwargs": {
      "data_files": {
        "train": os.path.abspath(paths["arithmetic_shots"]),
        "test": os.path.abspath(paths["arithmetic"]),
      }
    },
    "doc_to_text": "{{context}}",
    "doc_to_target": "{{answer}}",
  }
  out = {}
  for name, config in configs.items():
    out[name] = os.path.join(
      os.path.expanduser(os.fspath(out_dir)), f"{name}.yaml"
    )
    # The harness's YAML loader reads JSON (a YAML subset).
    fileio.atomic_write(out[name], json.dumps(config, indent=1) + "\n")
  return out
