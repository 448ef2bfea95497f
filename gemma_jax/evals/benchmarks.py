"""Benchmarks through lm-evaluation-harness itself: its task names, groups,
options and results, with a gemma_jax model (evals/harness.py).

    opts = Options(tasks=("arc_easy", "mmlu"), limit=100, num_fewshot=5)
    manager = task_manager(opts)        # the harness's tasks (+ include_path)
    check_tasks(opts.tasks, manager)    # one line for an unknown name
    results = evaluate(lm, opts, manager)   # lm_eval.simple_evaluate's dict

`study` stands for the seven benchmarks of the continual-pretraining study
this project follows (ARC, Belebele, GSM8K, HellaSwag, MMLU, TruthfulQA,
Winogrande), as the harness names them (STUDY_TASKS).
"""

import contextlib
import dataclasses
import functools
import glob
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from gemma_jax import fileio
from gemma_jax.data import formats
from gemma_jax.errors import ConfigError, DataError

# The harness's names for the study's seven benchmarks (lm_eval/tasks:
# arc/, belebele/ (Lithuanian and English), gsm8k/, hellaswag/, mmlu/ (the
# group of 57 subjects), truthfulqa/ (mc2: the multiple-true-answers
# score), winogrande/).
STUDY_TASKS = (
  "arc_challenge",
  "arc_easy",
  "belebele_lit_Latn",
  "belebele_eng_Latn",
  "gsm8k",
  "hellaswag",
  "mmlu",
  "truthfulqa_mc2",
  "winogrande",
)
ALIASES = {"study": STUDY_TASKS}
HARNESS_MISSING = (
  "lm-evaluation-harness is not installed; install the `eval` extra: "
  "pip install 'gemma-jax[eval]'"
)
# The harness's `--seed` default: python random, numpy, torch, few-shot.
DEFAULT_SEED = (0, 1234, 1234, 1234)


@dataclasses.dataclass(frozen=True)
class Options:
  """What `lm_eval run` takes for one evaluation (the same names).

  tasks: harness task, group or tag names (glob patterns too), or `study`.
  include_path: folders of further task YAMLs (e.g. local dataset copies).
  limit: documents per task (< 1: a fraction), None for all.
  num_fewshot: shots for every task (None: each task's default).
  gen_kwargs: "key=value,..." for generative tasks (max_gen_toks, ...).
  seed: one int for all four seeds, or four (random, numpy, torch,
    few-shot).
  log_samples: keep every document's requests and responses.
  """

  tasks: tuple[str, ...]
  include_path: tuple[str, ...] = ()
  limit: float | None = None
  num_fewshot: int | None = None
  gen_kwargs: str | None = None
  seed: tuple[int, ...] = DEFAULT_SEED
  log_samples: bool = False
  bootstrap_iters: int = 100000

  def __post_init__(self):
    if not self.tasks:
      raise ConfigError("no tasks: name harness tasks, e.g. arc_easy,mmlu")
    if len(self.seed) not in (1, 4):
      raise ConfigError(
        f"seed {self.seed}: give one integer or four (random, numpy, "
        f"torch, few-shot), as lm_eval's --seed"
      )
    if self.limit is not None and self.limit <= 0:
      raise ConfigError(f"limit must be positive, got {self.limit}")
    if self.num_fewshot is not None and self.num_fewshot < 0:
      raise ConfigError(f"num_fewshot must be >= 0, got {self.num_fewshot}")

  @property
  def seeds(self) -> tuple[int, int, int, int]:
    s = self.seed * 4 if len(self.seed) == 1 else self.seed
    return (s[0], s[1], s[2], s[3])

  def task_names(self) -> list[str]:
    """The tasks with `study` expanded, each once."""
    out: list[str] = []
    for name in self.tasks:
      out += ALIASES.get(name, (name,))
    return list(dict.fromkeys(out))


def parse_tasks(text: str | Sequence[str]) -> tuple[str, ...]:
  """'arc_easy,mmlu' (or a list) -> ('arc_easy', 'mmlu')."""
  items = text.split(",") if isinstance(text, str) else list(text)
  return tuple(t.strip() for t in items if t and t.strip())


def parse_seed(text: str | int | Sequence[int]) -> tuple[int, ...]:
  """lm_eval's --seed: '1234' or '0,1234,1234,1234'."""
  if isinstance(text, int):
    return (text,)
  parts = text.split(",") if isinstance(text, str) else list(text)
  try:
    return tuple(int(p) for p in parts)
  except ValueError:
    raise ConfigError(
      f"seed {text!r}: expected an integer or four comma-separated ones"
    ) from None


def task_manager(opts: Options, include_defaults: bool | None = None):
  """The harness's TaskManager over opts.include_path and its own tasks
  (an include_path task may reuse a default name: a local copy).

  Indexing the harness's ~15k task files takes most of a minute, so when
  every name asked for is a task of opts.include_path (local copies that
  `include:` the harness's files by path), only those are indexed
  (include_defaults None: decide so; True / False: as given)."""
  try:
    import lm_eval.tasks  # noqa: F401  (the `eval` extra)
  except ImportError:
    raise ConfigError(HARNESS_MISSING) from None
  for path in opts.include_path:
    if not os.path.isdir(path):
      raise ConfigError(f"include_path {path}: not a folder of task YAMLs")
  if include_defaults is None and opts.include_path:
    local = _indexed(opts.include_path, False)
    if all(_is_plain_task(n, local) for n in opts.task_names()):
      return local
  return _indexed(opts.include_path, include_defaults is not False)


@functools.cache
def _indexed(include_path: tuple[str, ...], include_defaults: bool):
  """One TaskManager per folder list in a process: the index is only read
  afterwards (every load builds new Task objects)."""
  from lm_eval.tasks import TaskManager

  return TaskManager(
    include_path=list(include_path) or None,
    include_defaults=include_defaults,
  )


def _is_plain_task(name: str, manager) -> bool:
  """A task (not a group or tag, whose members may be elsewhere) that
  `manager` indexes."""
  from lm_eval.tasks._index import Kind

  entry = manager.task_index.get(name)
  return entry is not None and entry.kind in (Kind.TASK, Kind.PY_TASK)


def check_tasks(names: Sequence[str], manager) -> list[str]:
  """One line naming every task the harness does not know, or the first
  local data file that cannot be read (check_data_files); returns the
  local data files."""
  from lm_eval import utils

  missing = [
    n
    for n in names
    if n not in ALIASES
    and not utils.pattern_match([n], manager.all_tasks)
    and not os.path.isfile(n)
  ]
  if missing:
    raise ConfigError(
      f"unknown harness task(s) {', '.join(missing)}; `lm_eval ls tasks` "
      f"lists them (or give include_path=a folder of task YAMLs)"
    )
  return check_data_files(names, manager)


# datasets' builders that read files (a task's dataset_path), and whether
# they read text: datasets keeps bytes that are not UTF-8 as they are and
# the harness fails at the first such document, far from the file.
FILE_BUILDERS = {
  "json": True,
  "csv": True,
  "text": True,
  "parquet": False,
  "arrow": False,
}


def _task_configs(spec, manager, overrides=None):
  """(task name, config as written: includes resolved, functions not) of
  every task `spec` stands for: a task, a group's members, a tag's tasks,
  a glob pattern, a task YAML file, or a group's {task: name, ...}."""
  from lm_eval import utils
  from lm_eval.tasks._index import Kind
  from lm_eval.tasks._yaml_loader import load_yaml

  overrides = overrides or {}
  if isinstance(spec, dict):  # a group's member: {task: ..., keys}
    members = spec.get("task") or []
    keys = {k: v for k, v in spec.items() if k not in ("task", "group")}
    if isinstance(members, str) and members not in manager.task_index:
      yield members, {**spec, **overrides}  # a whole task written inline
      return
    for member in [members] if isinstance(members, str) else members:
      yield from _task_configs(member, manager, {**keys, **overrides})
    return
  entry = manager.task_index.get(spec)
  if entry is None:
    if os.path.isfile(spec):
      cfg = load_yaml(spec, resolve_func=False)
      if "group" in cfg:
        yield from _task_configs(cfg, manager, overrides)
      else:
        yield str(cfg.get("task", spec)), {**cfg, **overrides}
      return
    for name in utils.pattern_match([spec], manager.all_tasks):
      if name != spec:
        yield from _task_configs(name, manager, overrides)
    return
  if entry.kind == Kind.TAG:
    for name in sorted(entry.tags):
      yield from _task_configs(name, manager, overrides)
    return
  if entry.yaml_path:
    cfg = load_yaml(entry.yaml_path, resolve_func=False)
  else:
    cfg = dict(entry.cfg or {})
  if entry.kind == Kind.GROUP:
    for member in cfg.get("task") or ():
      yield from _task_configs(member, manager, overrides)
  else:
    yield spec, {**cfg, **overrides}


def data_files(names: Sequence[str], manager) -> list[tuple[str, str, bool]]:
  """(task, file, is text) for every file on this machine that the tasks
  `names` stand for read (dataset_path one of FILE_BUILDERS, the files of
  dataset_kwargs.data_files, relative to its data_dir or the working
  directory as datasets resolves them; a glob as its own text), each once,
  in task order."""
  out: dict[tuple[str, bool], str] = {}
  for name in names:
    for task, cfg in _task_configs(ALIASES.get(name, name), manager):
      builder = cfg.get("dataset_path")
      kwargs = cfg.get("dataset_kwargs") or {}
      files = kwargs.get("data_files")
      if builder not in FILE_BUILDERS or not files:
        continue
      if isinstance(files, dict):
        files = list(files.values())
      for path in files if isinstance(files, list) else [files]:
        for one in path if isinstance(path, list) else [path]:
          one = os.path.expanduser(str(one))
          if fileio.is_local(one) and not os.path.isabs(one):
            one = os.path.join(kwargs.get("data_dir") or "", one)
          out.setdefault((one, FILE_BUILDERS[builder]), task)
  return [(task, path, text) for (path, text), task in out.items()]


def check_data_files(names: Sequence[str], manager) -> list[str]:
  """The local files the tasks read (data_files), each checked before the
  harness opens it: it exists (a glob matches one), it can be read, and a
  text one (json, csv, text) is UTF-8; otherwise one line naming the task
  and the file. Returns the files (globs expanded)."""
  found = []
  for task, path, text in data_files(names, manager):
    if not fileio.is_local(path):
      continue
    pattern = glob.has_magic(path)
    matches = sorted(glob.glob(path)) if pattern else [path]
    if not matches or not os.path.exists(matches[0]):
      raise DataError(
        f"task {task}: data file {path} "
        f"{'matches no file' if pattern else 'does not exist'} "
        f"(dataset_kwargs.data_files of its YAML)"
      )
    for file in matches:
      try:
        with open(file, "rb") as f:
          raw = f.read() if text else f.read(1)
      except OSError as e:
        raise DataError(
          f"task {task}: data file {file}: cannot read ({e.strerror})"
        ) from None
      bad = formats.first_bad(raw) if text else -1
      if bad >= 0:
        count = formats.decode(raw)[1]
        raise DataError(
          f"task {task}: data file {file}: {count} of {len(raw)} bytes are "
          f"not UTF-8 (first at byte {bad}); convert the file to UTF-8"
        )
      found.append(file)
  return found


def evaluate(lm, opts: Options, manager=None) -> dict[str, Any]:
  """lm_eval.simple_evaluate of `lm` (an lm_eval LM, e.g. GemmaJaxLM) on
  opts.tasks: the harness's results dict (results, groups, n-shot,
  higher-is-better, configs, and `samples` with log_samples)."""
  import lm_eval

  manager = manager or task_manager(opts)
  names = opts.task_names()
  check_tasks(names, manager)
  random_seed, numpy_seed, torch_seed, fewshot_seed = opts.seeds
  # The harness logs every task it builds at INFO; keep ours quiet.
  logging.getLogger("lm_eval").setLevel(logging.WARNING)
  with _jax_environment_report():
    results = lm_eval.simple_evaluate(
      model=lm,
      tasks=names,
      num_fewshot=opts.num_fewshot,
      limit=opts.limit,
      gen_kwargs=opts.gen_kwargs,
      log_samples=opts.log_samples,
      bootstrap_iters=opts.bootstrap_iters,
      task_manager=manager,
      random_seed=random_seed,
      numpy_random_seed=numpy_seed,
      torch_random_seed=torch_seed,
      fewshot_random_seed=fewshot_seed,
    )
  if results is None:  # another rank: gemma_jax never is one
    raise ConfigError("the harness returned no results (not rank 0)")
  return results


@contextlib.contextmanager
def _jax_environment_report():
  """Within it, simple_evaluate's results carry JAX's environment report
  where the harness writes torch's.

  The harness (lm_eval 0.4.x evaluator.simple_evaluate -> loggers.utils.
  add_env_info) fills `pretty_env_info` with torch.utils.collect_env's
  report whenever torch is installed: it imports torch and transformers
  and runs gcc, cmake, nvidia-smi and others, about 2 s of wall time per
  evaluation (5 s of CPU the first time), which an evaluation during
  training would spend every time. Our model runs on JAX, so its report is
  the one that says what ran; the other keys are the harness's own.
  """
  from lm_eval import evaluator
  from lm_eval.loggers import utils

  original = getattr(evaluator, "add_env_info", None)
  if original is None:  # another harness version: leave it as it is
    yield
    return

  def add_env_info(storage: dict[str, Any]) -> None:
    from importlib.metadata import version

    import jax

    storage.update(
      pretty_env_info=jax.print_environment_info(return_string=True),
      transformers_version="N/A (not used by gemma_jax)",
      lm_eval_version=version("lm_eval"),
      upper_git_hash=utils.get_commit_from_path(
        pathlib.Path(os.getcwd(), "..")
      ),
    )

  evaluator.add_env_info = add_env_info
  try:
    yield
  finally:
    evaluator.add_env_info = original


def _silent_lm():
  """An lm_eval LM that answers every request with nothing: running the
  harness with it builds every task's requests and documents."""
  from lm_eval.api.model import LM

  class Silent(LM):
    def loglikelihood(self, requests, disable_tqdm: bool = False):
      return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      return [0.0] * len(requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
      return [""] * len(requests)

  return Silent()


def _gold_index(task, doc) -> int:
  """The harness's gold choice of a multiple-choice document (its
  process_results: doc_to_text for multiple-input tasks, else
  doc_to_target; an index or a choice's text; the first of several)."""
  gold = (
    task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
  )
  if isinstance(gold, list):
    gold = gold[0]
  if isinstance(gold, str):
    gold = task.doc_to_choice(doc).index(gold)
  return int(gold)


def gold_requests(opts: Options, manager=None) -> list[dict]:
  """Every document's (context, gold continuation), as the harness builds
  them: [{"task", "output_type", "num_fewshot", "requests"}] in the
  harness's task order, documents in order (opts.limit of them).

  The context is the harness's own (description, few-shot examples, the
  document); the continuation is the gold choice's request (multiple
  choice) or target_delimiter + the target (generative: the answer as a
  few-shot example shows it, e.g. GSM8K's worked solution)."""
  manager = manager or task_manager(opts)
  # Every document's requests, no statistics (nothing was scored).
  silent = dataclasses.replace(opts, log_samples=True, bootstrap_iters=0)
  results = evaluate(_silent_lm(), silent, manager)
  names = list(results["samples"])
  loaded = manager.load(names)["tasks"]
  out = []
  for name in names:
    task, config = loaded[name], results["configs"][name]
    kind = config["output_type"]
    requests = []
    # One sample per document and filter: the documents once, in order.
    docs = {s["doc_id"]: s for s in reversed(results["samples"][name])}
    for sample in (docs[i] for i in sorted(docs)):
      args = sample["arguments"]
      if kind == "multiple_choice":
        requests.append(tuple(args[_gold_index(task, sample["doc"])]))
      elif kind == "generate_until":
        target = sample["target"]
        target = target[0] if isinstance(target, list) else target
        delimiter = config.get("target_delimiter", " ")
        requests.append((args[0][0], f"{delimiter}{target}"))
      elif kind == "loglikelihood":
        requests.append(tuple(args[0]))
      else:
        raise ConfigError(
          f"{name}: a {kind} task has no gold answer to score; use "
          f"multiple-choice or generative tasks"
        )
    out.append(
      {
        "task": name,
        "output_type": kind,
        "num_fewshot": results["n-shot"].get(name, 0),
        "requests": requests,
      }
    )
  return out
