"""Benchmark examples as Fisher rows: log p(gold answer | the harness prompt).

    rows = GoldRows(forgetting.load_tasks("mmlu.yaml"), tokenizer, seq_len)
    fisher.estimate(fprog, params, fisher_data.unit_batches(rows, 1, 64), n)

Each document gives one row (gemma_jax.train.fisher_data.answer_row), the
request lm-evaluation-harness scores for the right answer:

    context       tasks.contexts(task): description, the task's few-shot
                  examples (its default count, or num_fewshot), the query
    continuation  target_delimiter + choices[gold]   (multiple choice)
                  target_delimiter + target          (generative: the
                  answer as a few-shot example shows it, e.g. GSM8K's
                  worked solution ending "#### N")

tokenized by scoring.encode_pair (the context with bos, its trailing spaces
moved onto the continuation) and cut from the left to T + 1 tokens as the
harness cuts to its max_length (scoring.request_window). loss_mask is 1 on
the continuation's tokens, so the row's summed target log-probability is
the log-likelihood the harness computes for the gold choice. This is the
published EWC recipe's importance measure (the gradient of the answer's
log-likelihood given its prompt, on MMLU), with the harness's prompts.
"""

import hashlib
import json
from collections.abc import Sequence

from gemma_jax.errors import ConfigError
from gemma_jax.evals import scoring
from gemma_jax.evals import tasks as tasks_lib
from gemma_jax.tokenizer import Tokenizer
from gemma_jax.train import fisher_data


def gold_requests(
  task: tasks_lib.Task, seed: int = tasks_lib.FEWSHOT_SEED
) -> list[tuple[str, str]]:
  """(context, gold continuation) of every document, in document order."""
  contexts = tasks_lib.contexts(task, seed)
  if task.kind == "multiple_choice":
    answers = [doc.choices[doc.gold] for doc in task.docs]
  else:
    answers = [doc.target for doc in task.docs]
  return [(ctx, task.target_delimiter + a) for ctx, a in zip(contexts, answers)]


class GoldRows:
  """One row per document of `tasks` (in order; the first `count` when
  given): the gold answer's tokens given the harness's prompt."""

  def __init__(
    self,
    tasks: Sequence[tasks_lib.Task],
    tokenizer: Tokenizer,
    seq_len: int,
    count: int | None = None,
  ):
    if count is not None and count < 1:
      raise ConfigError(f"--sequences must be >= 1, got {count}")
    requests: list[tuple[str, str]] = []
    used: list[dict] = []
    for task in tasks:
      if count is not None and len(requests) >= count:
        break
      mine = gold_requests(task)[
        : None if count is None else count - len(requests)
      ]
      requests += mine
      used.append(
        {
          "name": task.name,
          "kind": task.kind,
          "num_fewshot": task.num_fewshot,
          "documents": len(mine),
        }
      )
    if not requests:
      raise ConfigError("the tasks hold no documents")
    self._rows, truncated = [], 0
    for context, continuation in requests:
      ctx, cont = scoring.encode_pair(tokenizer, context, continuation)
      window = scoring.request_window(ctx, cont, seq_len)
      truncated += len(window) < len(ctx) + len(cont)
      self._rows.append(fisher_data.answer_row(window, len(cont), seq_len))
    self.num_rows = len(self._rows)
    digest = hashlib.sha256(json.dumps(requests).encode()).hexdigest()
    self._describe = {
      "kind": "task",
      "tasks": used,
      "examples": self.num_rows,
      "seq_len": seq_len,
      "truncated": int(truncated),
      "target": "target_delimiter + gold answer given the harness's "
      "prompt (few-shot context included)",
      "requests_sha256": digest,
      "tokenizer_fingerprint": tokenizer.fingerprint,
    }

  def row(self, i: int) -> dict:
    return self._rows[i]

  def describe(self) -> dict:
    return dict(self._describe)
