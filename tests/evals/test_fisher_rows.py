"""Benchmark documents as Fisher rows: the gold answer's log-likelihood given
the prompt, exactly the request the harness scores for the gold choice."""

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.drivers import fisher, fisher_data
from gemma_jax.errors import ConfigError
from gemma_jax.evals import scoring, tasks
from gemma_jax.evals.readers import Doc
from gemma_jax.model import Transformer
from gemma_jax.tokenizer import BOS_ID
from gemma_jax.train import step as step_lib

MC_DOCS = (
  Doc("Question: what is two plus two?\nAnswer:", ("four", "five", "six"), 0),
  Doc("Question: which word is a colour?\nAnswer:", ("table", "green"), 1),
  Doc("Question: pick the number\nAnswer:", ("x", "12", "y"), 1),
)


def two_shot():
  shots = (
    Doc("Question: one plus one?\nAnswer:", ("two", "three"), 0),
    Doc("Question: the sky is?\nAnswer:", ("blue", "loud"), 0),
    Doc("Question: ice is?\nAnswer:", ("cold", "hot"), 0),
  )
  return tasks.Task("mc", "multiple_choice", MC_DOCS, shots, num_fewshot=2)


def test_gold_requests_are_the_harness_requests_of_the_gold_choices():
  task = two_shot()
  contexts = tasks.contexts(task)
  requests = scoring.choice_requests(task, contexts)
  gold = fisher_data.gold_requests(task)
  starts = np.cumsum([0] + [len(d.choices) for d in MC_DOCS])
  assert gold == [requests[s + d.gold] for s, d in zip(starts, MC_DOCS)]
  # The few-shot examples are part of the prompt.
  assert (
    gold[0][0].startswith(task.description)
    and gold[0][0].count("\nAnswer: ") == 2
  )


@pytest.mark.slow
def test_a_rows_loglikelihood_is_what_scoring_gives_the_gold_choice(
  tok, random_model
):
  params, cfg = random_model
  task = two_shot()
  for seq_len in (256, 24):  # whole prompts; cut from the left
    rows = fisher_data.GoldRows([task], tok, seq_len)
    units = {
      k: jnp.asarray(np.stack([rows.row(i)[k] for i in range(3)]))
      for k in fisher.UNIT_KEYS
    }
    forward = step_lib.model_forward(Transformer(cfg))
    per_row = [
      float(
        fisher.unit_loglik(forward)(
          params, {k: v[i : i + 1] for k, v in units.items()}
        )
      )
      for i in range(3)
    ]
    ll = scoring.make_loglikelihood_fn(
      params, cfg, tok, batch_size=4, seq_len=seq_len
    )
    expected = ll(fisher_data.gold_requests(task))
    np.testing.assert_allclose(per_row, expected, rtol=1e-5, atol=1e-4)
  assert rows.describe()["truncated"] == 3


def test_row_layout_bos_prompt_then_answer_targets_only(tok):
  rows = fisher_data.GoldRows([two_shot()], tok, 256)
  ctx, cont = scoring.encode_pair(
    tok, *fisher_data.gold_requests(two_shot())[1]
  )
  row = rows.row(1)
  n = len(ctx) + len(cont) - 1
  assert row["inputs"][0] == BOS_ID and row["segment_ids"][:n].all()
  assert not row["segment_ids"][n:].any()
  np.testing.assert_array_equal(row["targets"][row["loss_mask"] == 1], cont)
  assert tok.decode(cont) == " green"


def test_generative_tasks_score_the_target_and_count_spans_tasks(tok):
  gen = tasks.Task(
    "sums",
    "generate_until",
    (
      Doc("Question: 2 + 3?\nAnswer:", target="5\n#### 5"),
      Doc("Question: 4 + 4?\nAnswer:", target="8\n#### 8"),
    ),
  )
  assert fisher_data.gold_requests(gen)[0] == (
    "Question: 2 + 3?\nAnswer:",
    " 5\n#### 5",
  )
  rows = fisher_data.GoldRows([two_shot(), gen], tok, 256, count=4)
  d = rows.describe()
  assert rows.num_rows == 4 and d["examples"] == 4
  assert [(t["name"], t["documents"]) for t in d["tasks"]] == [
    ("mc", 3),
    ("sums", 1),
  ]
  assert d["tasks"][0]["num_fewshot"] == 2
  with pytest.raises(ConfigError, match="--sequences"):
    fisher_data.GoldRows([gen], tok, 256, count=0)
