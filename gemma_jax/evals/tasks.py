"""Benchmark tasks and their prompts, built as lm-evaluation-harness 0.4.x does.

A `Task` holds the documents to score, the documents few-shot examples are
drawn from, and the harness's settings for that benchmark. `contexts(task)`
gives every document's prompt, exactly as the harness's `fewshot_context`
renders it without a chat template (lm_eval/api/task.py):

    description + (shot.query + " " + shot.answer + "\\n\\n") * k + doc.query

Few-shot examples are drawn as the harness draws them: one
`random.Random(1234)` per task (the default `--seed`'s fewshot value,
lm_eval/defaults.py) sampling k examples per document in document order, or
the first k (MMLU's `first_n` sampler). When the harness's few-shot split
equals its test split (HellaSwag: both unset; a generic task whose shots
file is the scored file) k + 1 are drawn and the document itself dropped.

A task list file (`gemma-jax fisher --task`) is a YAML list; each entry
names a reader and local files (load_tasks):

    - {kind: arc, path: ARC-Easy/ARC-Easy-Test.jsonl}
    - {kind: mmlu, path: mmlu/data, num_fewshot: 5}
    - {kind: gsm8k, path: gsm8k/test.jsonl, shots: gsm8k/train.jsonl}
    - {kind: hellaswag, path: hellaswag/hellaswag_val.jsonl}
    - {kind: multiple_choice, path: mine.jsonl}      # {context, choices, gold}
    - {kind: generative, path: sums.jsonl, shots: sums_train.jsonl,
       num_fewshot: 3, max_gen_toks: 64}

Optional keys: name, shots (the few-shot file), num_fewshot (default: the
harness's for the benchmark), split (mmlu), max_gen_toks (generative).

Defaults per benchmark, from the harness's task YAMLs:

    arc_easy, arc_challenge  0-shot, multiple choice, acc + acc_norm
    mmlu_<subject>           0-shot, choices the letters, shots: dev, first k
    gsm8k                    5-shot from train, generate until "Question:"
    hellaswag                0-shot, multiple choice, acc + acc_norm
"""

import dataclasses
import glob
import os
import random
from collections.abc import Callable
from typing import Any, Literal

from gemma_jax import configlib
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.evals import readers
from gemma_jax.evals.readers import Doc

FEWSHOT_SEED = 1234
GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
MAX_GEN_TOKS = 256  # the harness's HFLM default


@dataclasses.dataclass(frozen=True)
class Task:
  """One benchmark (or one MMLU subject) with the harness's settings.

  kind: 'multiple_choice' (score each choice's log-likelihood) or
    'generate_until' (greedy generation, exact match of the extracted
    answer).
  sampler: 'default' (seeded random shots) or 'first_n'.
  exclude_doc: the harness passes the document to its sampler, which then
    draws k + 1 shots and drops the document (its rule: the few-shot split
    equals the test split, both unset for HellaSwag); `first_n` removes it
    from the pool.
  group: the group the task is averaged into (e.g. 'mmlu'), weighted by
    the number of documents.
  """

  name: str
  kind: Literal["multiple_choice", "generate_until"]
  docs: tuple[Doc, ...]
  fewshot_docs: tuple[Doc, ...] = ()
  num_fewshot: int = 0
  sampler: Literal["default", "first_n"] = "default"
  exclude_doc: bool = False
  description: str = ""
  target_delimiter: str = " "
  fewshot_delimiter: str = "\n\n"
  until: tuple[str, ...] = ()
  max_gen_toks: int = MAX_GEN_TOKS
  group: str = ""

  def with_fewshot(self, num_fewshot: int | None) -> "Task":
    """This task with `num_fewshot` shots (None keeps the default)."""
    if num_fewshot is None:
      return self
    if num_fewshot < 0:
      raise ConfigError(
        f"{self.name}: num_fewshot must be >= 0, got {num_fewshot}"
      )
    return dataclasses.replace(self, num_fewshot=num_fewshot)


def sample_shots(task: Task, doc: Doc, rnd: random.Random) -> list[Doc]:
  """The harness's ContextSampler / FirstNSampler for one document."""
  k = task.num_fewshot
  if k == 0:
    return []
  pool = list(task.fewshot_docs)
  if task.sampler == "first_n":
    if task.exclude_doc:
      pool = [d for d in pool if d != doc]
    return pool[:k]
  if not task.exclude_doc:
    return rnd.sample(pool, k)
  shots = [d for d in rnd.sample(pool, k + 1) if d != doc][:k]
  if len(shots) < k:  # several copies of `doc` were drawn: draw again
    shots = rnd.sample([d for d in pool if d != doc], k)
  return shots


def _turn(query: str, answer: str, task: Task) -> str:
  # build_qa_turn: an empty answer gets neither delimiter.
  if answer == "":
    return query
  return query + task.target_delimiter + answer + task.fewshot_delimiter


def fewshot_context(task: Task, doc: Doc, rnd: random.Random) -> str:
  """description + k answered examples + the document's query."""
  shots = sample_shots(task, doc, rnd)
  return (
    task.description
    + "".join(_turn(s.query, s.answer, task) for s in shots)
    + doc.query
  )


def contexts(task: Task, seed: int = FEWSHOT_SEED) -> list[str]:
  """Every document's prompt, in document order (shots drawn in order)."""
  need = task.num_fewshot + (1 if task.exclude_doc else 0)
  if task.num_fewshot and len(task.fewshot_docs) < need:
    raise ConfigError(
      f"{task.name}: {task.num_fewshot}-shot needs at least {need} "
      f"few-shot documents, found {len(task.fewshot_docs)}; give a shots "
      "file or set num_fewshot 0"
    )
  rnd = random.Random(seed)
  return [fewshot_context(task, doc, rnd) for doc in task.docs]


def _shots(shots, read, eval_path) -> tuple[tuple[Doc, ...], bool]:
  """(few-shot docs, whether `shots` is the scored file itself)."""
  if shots is None:
    return (), False
  same = os.path.abspath(
    os.path.expanduser(os.fspath(shots))
  ) == os.path.abspath(os.path.expanduser(os.fspath(eval_path)))
  return tuple(read(shots)), same


def arc(
  path, shots=None, name: str = "arc_easy", num_fewshot: int | None = None
) -> Task:
  """ARC-Easy / ARC-Challenge (0-shot by default; shots: the train file)."""
  # fewshot_split unset, test_split "test": the harness never excludes.
  fewshot, _ = _shots(shots, readers.read_arc, path)
  return Task(
    name, "multiple_choice", tuple(readers.read_arc(path)), fewshot
  ).with_fewshot(num_fewshot)


def hellaswag(path, shots=None, num_fewshot: int | None = None) -> Task:
  """HellaSwag validation (0-shot by default; shots: the train file)."""
  # fewshot_split and test_split are both unset (it scores validation), so
  # the harness's `fewshot_split == test_split` holds: k + 1 drawn, the
  # document dropped.
  fewshot, _ = _shots(shots, readers.read_hellaswag, path)
  return Task(
    "hellaswag",
    "multiple_choice",
    tuple(readers.read_hellaswag(path)),
    fewshot,
    exclude_doc=True,
  ).with_fewshot(num_fewshot)


def gsm8k(path, shots=None, num_fewshot: int | None = None) -> Task:
  """GSM8K test, 5-shot from the train file by default."""
  fewshot, _ = _shots(shots, readers.read_gsm8k, path)  # train != test
  return Task(
    "gsm8k",
    "generate_until",
    tuple(readers.read_gsm8k(path)),
    fewshot,
    num_fewshot=5,
    until=GSM8K_UNTIL,
  ).with_fewshot(num_fewshot)


def mmlu_description(subject: str) -> str:
  return (
    "The following are multiple choice questions (with answers) about "
    f"{' '.join(subject.split('_'))}.\n\n"
  )


def mmlu(
  data_dir, split: str = "test", num_fewshot: int | None = None
) -> list[Task]:
  """One task per subject from `data_dir/{split}/*_{split}.csv`.

  Shots are the first k questions of `data_dir/dev/<subject>_dev.csv`.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir))
  files = sorted(glob.glob(os.path.join(data_dir, split, f"*_{split}.csv")))
  if not files:
    raise DataError(f"{data_dir}: no MMLU files {split}/*_{split}.csv")
  tasks = []
  for path in files:
    subject = readers.mmlu_subject(path)
    dev = os.path.join(data_dir, "dev", f"{subject}_dev.csv")
    fewshot = tuple(readers.read_mmlu_csv(dev)) if os.path.exists(dev) else ()
    tasks.append(
      Task(
        f"mmlu_{subject}",
        "multiple_choice",
        tuple(readers.read_mmlu_csv(path)),
        fewshot,
        sampler="first_n",
        exclude_doc=split == "dev",
        description=mmlu_description(subject),
        group="mmlu",
      ).with_fewshot(num_fewshot)
    )
  return tasks


def multiple_choice(
  path, shots=None, name: str | None = None, num_fewshot: int | None = None
) -> Task:
  """A generic {context, choices, gold} jsonl file (0-shot by default)."""
  fewshot, same = _shots(shots, readers.read_multiple_choice, path)
  return Task(
    name or _stem(path),
    "multiple_choice",
    tuple(readers.read_multiple_choice(path)),
    fewshot,
    exclude_doc=same,
  ).with_fewshot(num_fewshot)


def generative(
  path,
  shots=None,
  name: str | None = None,
  num_fewshot: int | None = None,
  until: tuple[str, ...] = GSM8K_UNTIL,
  max_gen_toks: int = MAX_GEN_TOKS,
) -> Task:
  """A generic {context, answer} jsonl file, scored like GSM8K."""
  fewshot, same = _shots(shots, readers.read_generative, path)
  return Task(
    name or _stem(path),
    "generate_until",
    tuple(readers.read_generative(path)),
    fewshot,
    exclude_doc=same,
    until=tuple(until),
    max_gen_toks=max_gen_toks,
  ).with_fewshot(num_fewshot)


def _stem(path) -> str:
  return os.path.splitext(os.path.basename(os.fspath(path)))[0]


TASK_KINDS: dict[str, Callable[..., Any]] = {  # -> Task (mmlu: list)
  "arc": arc,
  "hellaswag": hellaswag,
  "gsm8k": gsm8k,
  "mmlu": mmlu,
  "multiple_choice": multiple_choice,
  "generative": generative,
}
_TASK_KEYS = (
  "kind",
  "path",
  "shots",
  "num_fewshot",
  "name",
  "split",
  "max_gen_toks",
)


def load_tasks(path) -> list[Task]:
  """The tasks a YAML task list names (see the module docstring)."""
  entries = configlib.load_yaml_list(path)
  found = []
  for i, entry in enumerate(entries):
    where = f"{path}: entry {i}"
    if not isinstance(entry, dict):
      raise ConfigError(f"{where}: expected a mapping, got {entry!r}")
    unknown = sorted(set(entry) - set(_TASK_KEYS))
    if unknown:
      raise ConfigError(
        f"{where}: unknown key {unknown[0]!r}; valid keys: "
        f"{', '.join(_TASK_KEYS)}"
      )
    kind = entry.get("kind")
    if kind not in TASK_KINDS:
      raise ConfigError(
        f"{where}: kind {kind!r} is not one of {', '.join(TASK_KINDS)}"
      )
    if "path" not in entry:
      raise ConfigError(f"{where}: needs a path")
    kw = {
      k: entry[k]
      for k in ("num_fewshot", "name", "shots", "split", "max_gen_toks")
      if entry.get(k) is not None
    }
    if "max_gen_toks" in kw and kind != "generative":
      raise ConfigError(
        f"{where}: `max_gen_toks` is for generative only "
        f"(gsm8k keeps the harness's {MAX_GEN_TOKS})"
      )
    if kind == "mmlu":
      kw.pop("shots", None)  # MMLU's shots are its dev split
      found += mmlu(entry["path"], **kw)
      continue
    if "split" in kw:
      raise ConfigError(f"{where}: `split` is for mmlu only")
    found.append(TASK_KINDS[kind](entry["path"], **kw))
  return found
