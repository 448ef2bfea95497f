"""What a Fisher is measured on: rows of a data source, or task examples.

    rows = SourceRows(cfg.data, "prose", count=2048)     # old-domain text
    rows = TaskRows("mmlu.jsonl", tokenizer, seq_len)    # gold answers
    for units in unit_batches(rows, rows_per_unit=1, units_per_step=64): ...

A row is a dict of int32 [T] arrays (inputs, targets, segment_ids, positions,
loss_mask). A task row holds one example, `bos context " " answer`, with
loss_mask 1 on the answer's targets only, so a row's summed target
log-probability is log p(answer | prompt).

Task files are JSON lines {"context": str, "choices": [str, ...], "gold": i}.
The answer continuation is " " + choices[gold] (lm-evaluation-harness's
default target delimiter), tokenized as the harness does: trailing spaces
of the context move to the continuation, the continuation's tokens are
those of encode(context + continuation) after encode(context), and a
sequence too long for the row keeps its last T + 1 tokens. This small
reader stands in for gemma_jax.evals' task readers (ARC, MMLU, ...).
"""

import hashlib
import json
import math

import numpy as np

from gemma_jax.data import packing, sources
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.tokenizer import BOS_ID, Tokenizer
from gemma_jax.train.fisher import UNIT_KEYS


class SourceRows:
  """`count` rows of source `name` from row `first_row` of its packed,
  shuffled stream (data.seed), as training would read them."""

  def __init__(self, data_cfg, name: str, count: int, split: str = "train",
               first_row: int = 0, tokenizer: Tokenizer | None = None):
    if name not in data_cfg.sources:
      raise ConfigError(f"--source {name!r} is not one of the config's "
                        f"sources: {', '.join(data_cfg.sources)}")
    if count < 1 or first_row < 0:
      raise ConfigError(f"--sequences must be >= 1 and --first-row >= 0, got "
                        f"{count} and {first_row}")
    self.tokenizer = tokenizer or Tokenizer.load(data_cfg.tokenizer)
    src = data_cfg.sources[name]
    docs = sources.open_documents(name, src, self.tokenizer, split)
    self._rows = packing.PackedRows(docs, data_cfg.seq_len, 0, data_cfg.seed)
    self.num_rows, self.first_row = count, first_row
    self._describe = {
        "kind": "source", "source": name, "split": split,
        "location": {"kind": src.kind, **sources.KINDS[src.kind].location(src)},
        "seq_len": data_cfg.seq_len, "seed": data_cfg.seed,
        "first_row": first_row, "rows": count,
        "rows_per_epoch": self._rows.rows_per_epoch,
        "tokenizer_fingerprint": self.tokenizer.fingerprint}

  def row(self, i: int) -> dict:
    r = self._rows[self.first_row + i]
    return {k: r[k] for k in UNIT_KEYS}

  def describe(self) -> dict:
    return dict(self._describe)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str):
  """(context ids, continuation ids) as lm-evaluation-harness splits them."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    continuation = context[-spaces:] + continuation
    context = context[:-spaces]
  whole = tokenizer.encode(context + continuation)
  ctx = tokenizer.encode(context)
  return ctx, whole[len(ctx):]


def task_row(ctx: np.ndarray, cont: np.ndarray, seq_len: int) -> dict:
  """One example as a row: bos + context + continuation, left-truncated to
  T + 1 tokens, targets counted on the continuation only."""
  seq = np.concatenate([[BOS_ID], ctx, cont]).astype(np.int32)[-(seq_len + 1):]
  n = len(seq) - 1
  row = {k: np.zeros(seq_len, np.int32) for k in UNIT_KEYS}
  row["inputs"][:n], row["targets"][:n] = seq[:-1], seq[1:]
  row["segment_ids"][:n] = 1
  row["positions"][:n] = np.arange(n)
  row["loss_mask"][max(n - len(cont), 0):n] = 1
  return row


class TaskRows:
  """The first `count` examples (all when None) of a JSON-lines task file,
  one row each."""

  def __init__(self, path: str, tokenizer: Tokenizer, seq_len: int,
               count: int | None = None):
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except FileNotFoundError:
      raise DataError(f"task file not found: {path}") from None
    self._rows, truncated = [], 0
    for n, line in enumerate(raw.decode().splitlines(), 1):
      if not line.strip():
        continue
      if count is not None and len(self._rows) == count:
        break
      ctx, cont = encode_pair(tokenizer, *_example(line, path, n))
      truncated += len(ctx) + len(cont) + 1 > seq_len + 1
      self._rows.append(task_row(ctx, cont, seq_len))
    if not self._rows:
      raise DataError(f"task file {path} holds no examples")
    self.num_rows = len(self._rows)
    self._describe = {
        "kind": "task", "path": str(path),
        "sha256": hashlib.sha256(raw).hexdigest(), "examples": self.num_rows,
        "seq_len": seq_len, "truncated": int(truncated),
        "target": "' ' + choices[gold] given bos + context",
        "tokenizer_fingerprint": tokenizer.fingerprint}

  def row(self, i: int) -> dict:
    return self._rows[i]

  def describe(self) -> dict:
    return dict(self._describe)


def _example(line: str, path: str, n: int) -> tuple[str, str]:
  try:
    ex = json.loads(line)
    choices, gold = ex["choices"], ex["gold"]
    return ex["context"], " " + choices[gold]
  except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
    raise DataError(f"{path}:{n}: expected a JSON object with 'context', "
                    f"'choices' and an integer 'gold' index into them "
                    f"({type(e).__name__}: {e})") from None


def num_steps(rows, rows_per_unit: int, units_per_step: int) -> int:
  return math.ceil(math.ceil(rows.num_rows / rows_per_unit) / units_per_step)


def unit_batches(rows, rows_per_unit: int, units_per_step: int,
                 process_index: int = 0, process_count: int = 1):
  """Yields this process's units of each step: {key: int32 [U/P, R, T]}.

  Unit u holds rows [u R, (u + 1) R); step k holds units [k U, (k + 1) U),
  of which process p has the p-th contiguous U/P. Rows past the last are
  padding (no targets), so a short last group is the mean of its real rows.
  """
  if units_per_step % process_count:
    raise ConfigError(f"--units-per-step {units_per_step} must be a multiple "
                      f"of the process count {process_count}")
  local = units_per_step // process_count
  pad = {k: np.zeros_like(v) for k, v in rows.row(0).items()}
  for k in range(num_steps(rows, rows_per_unit, units_per_step)):
    first = (k * units_per_step + process_index * local) * rows_per_unit
    picked = [rows.row(i) if i < rows.num_rows else pad
              for i in range(first, first + local * rows_per_unit)]
    yield {key: np.stack([r[key] for r in picked]).reshape(
        local, rows_per_unit, -1) for key in UNIT_KEYS}
