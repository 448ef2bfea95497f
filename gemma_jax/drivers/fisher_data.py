"""What a Fisher is measured on: rows of data sources, or answered examples.

    rows = SourceRows(cfg.data, "prose", count=2048)     # old-domain text
    rows = MixedRows([SourceRows(cfg.data, s, 1024) for s in ("prose",
                                                              "code")])
    for units in unit_batches(rows, rows_per_unit=1, units_per_step=64): ...

Row sets are any objects with `num_rows`, `row(i)` and `describe()`. A row
is a dict of int32 [T] arrays (inputs, targets, segment_ids, positions,
loss_mask). An answered example (`answer_row`) has loss_mask 1 on the
answer's targets only, so a row's summed target log-probability is
log p(answer | prompt).

Benchmark documents as Fisher rows, log p(gold answer | the harness's
prompt), from lm-evaluation-harness's own tasks:

    gold = benchmarks.gold_requests(benchmarks.Options(tasks=("mmlu",)))
    rows = GoldRows(gold, tokenizer, seq_len)
    fisher.estimate(fprog, params, unit_batches(rows, 1, 64), n)

Each document gives one row, the request the harness scores for the right
answer (evals/benchmarks.py gold_requests): the context is the harness's
prompt (description, few-shot examples, the document), the continuation the
gold choice's (multiple choice) or target_delimiter + the target
(generative: e.g. GSM8K's worked solution ending "#### N"). Tokens are what
the gemma_jax lm-eval model scores (evals/harness.py RequestTokens: bos
first, the context's trailing spaces moved onto the continuation, cut from
the left to max_length + 1 = T + 1 tokens), so a row's summed target
log-probability is the log-likelihood the harness gets for the gold answer
from `--model gemma_jax` with max_length T. This is the published EWC
recipe's importance measure (the gradient of the answer's log-likelihood
given its prompt, on MMLU), with the harness's prompts.
"""

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_jax.data import packing, sources
from gemma_jax.drivers.fisher import UNIT_KEYS
from gemma_jax.errors import ConfigError, DataError
from gemma_jax.tokenizer import Tokenizer


class SourceRows:
  """`count` rows of source `name` from row `first_row` of its packed,
  shuffled stream (data.seed), as training would read them."""

  def __init__(
    self,
    data_cfg,
    name: str,
    count: int,
    split: str = "train",
    first_row: int = 0,
    tokenizer: Tokenizer | None = None,
  ):
    if name not in data_cfg.sources:
      raise ConfigError(
        f"--source {name!r} is not one of the config's "
        f"sources: {', '.join(data_cfg.sources)}"
      )
    if count < 1 or first_row < 0:
      raise ConfigError(
        f"--sequences must be >= 1 and --first-row >= 0, got "
        f"{count} and {first_row}"
      )
    self.tokenizer = tokenizer or Tokenizer.load(data_cfg.tokenizer)
    src = data_cfg.sources[name]
    docs = sources.open_documents(name, src, self.tokenizer, split)
    self._rows = packing.PackedRows(docs, data_cfg.seq_len, 0, data_cfg.seed)
    self.num_rows, self.first_row = count, first_row
    self._describe = {
      "kind": "source",
      "source": name,
      "split": split,
      "location": {"kind": src.kind, **sources.KINDS[src.kind].location(src)},
      "seq_len": data_cfg.seq_len,
      "seed": data_cfg.seed,
      "first_row": first_row,
      "rows": count,
      "rows_per_epoch": self._rows.rows_per_epoch,
      "tokenizer_fingerprint": self.tokenizer.fingerprint,
    }

  def row(self, i: int) -> dict:
    r = self._rows[self.first_row + i]
    return {k: r[k] for k in UNIT_KEYS}

  def describe(self) -> dict:
    return dict(self._describe)


def answer_row(window, num_answer: int, seq_len: int) -> dict:
  """One example as a row: `window` (int [<= T + 1] token ids, bos first
  unless cut off) as inputs window[:-1] and targets window[1:], the loss on
  the last `num_answer` targets only (the answer's tokens)."""
  seq = np.asarray(window, np.int32)
  if len(seq) > seq_len + 1 or not 0 < num_answer < len(seq):
    raise DataError(
      f"an example of {len(seq)} tokens with a {num_answer}-"
      f"token answer does not make a row of {seq_len} tokens"
    )
  n = len(seq) - 1
  row = {k: np.zeros(seq_len, np.int32) for k in UNIT_KEYS}
  row["inputs"][:n], row["targets"][:n] = seq[:-1], seq[1:]
  row["segment_ids"][:n] = 1
  row["positions"][:n] = np.arange(n)
  row["loss_mask"][n - num_answer : n] = 1
  return row


class MixedRows:
  """Row sets of equal size taken in turn: row i is row i // k of part
  i % k, so every stretch of k rows holds one row of each part."""

  def __init__(self, parts):
    sizes = {p.num_rows for p in parts}
    if len(sizes) != 1:
      raise ConfigError(
        f"sources of a Fisher must give equal row counts, got {sorted(sizes)}"
      )
    self._parts = list(parts)
    self.num_rows = len(parts) * sizes.pop()

  def row(self, i: int) -> dict:
    k = len(self._parts)
    return self._parts[i % k].row(i // k)

  def describe(self) -> dict:
    return {
      "kind": "sources",
      "rows": self.num_rows,
      "order": "round robin, one row of each source in turn",
      "parts": [p.describe() for p in self._parts],
    }


def num_steps(rows, rows_per_unit: int, units_per_step: int) -> int:
  return math.ceil(math.ceil(rows.num_rows / rows_per_unit) / units_per_step)


def unit_batches(
  rows,
  rows_per_unit: int,
  units_per_step: int,
  shard_index: int = 0,
  shard_count: int = 1,
):
  """Yields the units of data shard s of S (sharding/data_shards.py: what
  this process's devices hold) of each step: {key: int32 [U/S, R, T]}.

  Unit u holds rows [u R, (u + 1) R); step k holds units [k U, (k + 1) U),
  of which shard s has the s-th contiguous U/S. Rows past the last are
  padding (no targets), so a short last group is the mean of its real rows.
  """
  if units_per_step % shard_count:
    raise ConfigError(
      f"--units-per-step {units_per_step} must be a multiple "
      f"of the number of data shards {shard_count}"
    )
  local = units_per_step // shard_count
  pad = {k: np.zeros_like(v) for k, v in rows.row(0).items()}
  for k in range(num_steps(rows, rows_per_unit, units_per_step)):
    first = (k * units_per_step + shard_index * local) * rows_per_unit
    picked = [
      rows.row(i) if i < rows.num_rows else pad
      for i in range(first, first + local * rows_per_unit)
    ]
    yield {
      key: np.stack([r[key] for r in picked]).reshape(local, rows_per_unit, -1)
      for key in UNIT_KEYS
    }


# Benchmark examples.
class GoldRows:
  """One row per document of the harness's tasks, in order: the gold
  answer's tokens given the harness's prompt. `tasks` is
  benchmarks.gold_requests's list ({task, output_type, num_fewshot,
  requests: [(context, continuation)]})."""

  def __init__(
    self, tasks: Sequence[dict[str, Any]], tokenizer: Tokenizer, seq_len: int
  ):
    from gemma_jax.evals.harness import RequestTokens

    lm = RequestTokens(tokenizer, max_length=seq_len)
    self._rows, used, truncated, requests = [], [], 0, []
    for task in tasks:
      try:
        windows = lm.tokens(task["requests"])
      except ConfigError as e:
        raise ConfigError(
          f"task {task['task']}: {e} (data.seq_len {seq_len})"
        ) from None
      for window, answer, cut in windows:
        self._rows.append(answer_row(window, answer, seq_len))
        truncated += cut > 0
      requests += task["requests"]
      used.append(
        {
          "name": task["task"],
          "output_type": task["output_type"],
          "num_fewshot": task["num_fewshot"],
          "documents": len(task["requests"]),
        }
      )
    if not self._rows:
      raise ConfigError("the tasks hold no documents")
    self.num_rows = len(self._rows)
    digest = hashlib.sha256(json.dumps(requests).encode()).hexdigest()
    self._describe = {
      "kind": "task",
      "tasks": used,
      "examples": self.num_rows,
      "seq_len": seq_len,
      "truncated": int(truncated),
      "target": "the gold answer given the harness's prompt (few-shot "
      "context included), as lm-evaluation-harness requests it",
      "requests_sha256": digest,
      "tokenizer_fingerprint": tokenizer.fingerprint,
    }

  def row(self, i: int) -> dict:
    return self._rows[i]

  def describe(self) -> dict:
    return dict(self._describe)
