"""Benchmark documents as Fisher rows: the gold answer's log-likelihood given
the prompt, exactly the request the harness scores for the gold choice, from
the harness's own tasks (local copies: gemma_jax/evals/testing.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax.drivers import fisher, fisher_data
from gemma_jax.errors import ConfigError
from gemma_jax.evals import benchmarks
from gemma_jax.model import Transformer
from gemma_jax.tokenizer import BOS_ID
from gemma_jax.train import step as step_lib


@pytest.fixture(scope="module")
def gold(harness_tasks):
  """The gold requests of local ARC (3 documents), GSM8K (2) and MMLU's
  anatomy (3), 2-shot."""
  opts = benchmarks.Options(
    tasks=("local_arc", "local_gsm8k", "local_mmlu"),
    include_path=(str(harness_tasks),),
    num_fewshot=2,
  )
  return {t["task"]: t for t in benchmarks.gold_requests(opts)}


def test_gold_requests_are_the_harness_requests_of_the_gold_choices(gold):
  arc = gold["local_arc"]
  assert arc["output_type"] == "multiple_choice" and arc["num_fewshot"] == 2
  # answerKey A, B, C: the gold choice's text after the harness's " ".
  assert [c for _, c in arc["requests"]] == [" apple", " heat", " water"]
  context = arc["requests"][0][0]
  assert context.endswith("Question: Which is a fruit?\nAnswer:")
  # The few-shot examples are part of the prompt.
  assert context.count("\nAnswer: ") == 2
  # So is the task's description; MMLU's answers are the letters (the
  # published recipe's answer-letter loss).
  mmlu = gold["local_mmlu"]["requests"]
  assert [c for _, c in mmlu] == [" A", " B", " C"]
  assert mmlu[0][0].startswith(
    "The following are multiple choice questions (with answers) about "
    "anatomy.\n\n"
  )


def test_generative_tasks_score_the_target(gold):
  gsm8k = gold["local_gsm8k"]
  assert gsm8k["output_type"] == "generate_until"
  context, target = gsm8k["requests"][0]
  assert context.endswith(
    "Question: Ann has 3 pens and gets 2. How many pens?\nAnswer:"
  )
  assert target == " 3 + 2 = 5\n#### 5" and context.count("\n#### ") == 2


def test_rows_follow_the_tasks_in_order(gold, tok):
  rows = fisher_data.GoldRows(list(gold.values()), tok, 256)
  d = rows.describe()
  assert rows.num_rows == 8 and d["examples"] == 8 and d["truncated"] == 0
  assert [
    (t["name"], t["documents"], t["num_fewshot"]) for t in d["tasks"]
  ] == [
    ("local_arc", 3, 2),
    ("local_gsm8k", 2, 2),
    ("local_mmlu", 3, 2),
  ]
  empty = [{**gold["local_arc"], "requests": []}]
  with pytest.raises(ConfigError, match="the tasks hold no documents"):
    fisher_data.GoldRows(empty, tok, 256)


def test_limit_takes_the_first_documents_of_each_task(harness_tasks, gold):
  opts = benchmarks.Options(
    tasks=("local_arc", "local_gsm8k", "local_mmlu"),
    include_path=(str(harness_tasks),),
    num_fewshot=2,
    limit=1,
  )
  found = benchmarks.gold_requests(opts)
  assert [t["requests"] for t in found] == [
    t["requests"][:1] for t in gold.values()
  ]


def test_row_layout_bos_prompt_then_answer_targets_only(gold, tok):
  rows = fisher_data.GoldRows([gold["local_arc"]], tok, 256)
  context, answer = gold["local_arc"]["requests"][1]
  whole = tok.encode(context + answer, add_bos=True)
  n = len(whole) - 1
  row = rows.row(1)
  assert row["inputs"][0] == BOS_ID and row["segment_ids"][:n].all()
  assert not row["segment_ids"][n:].any()
  np.testing.assert_array_equal(row["inputs"][:n], whole[:-1])
  answer_ids = row["targets"][row["loss_mask"] == 1]
  assert tok.decode(answer_ids) == " heat"
  assert len(answer_ids) == n + 1 - len(tok.encode(context, add_bos=True))


def test_an_answer_longer_than_a_row_is_named(gold, tok):
  with pytest.raises(ConfigError, match="task local_gsm8k: .*data.seq_len 4"):
    fisher_data.GoldRows([gold["local_gsm8k"]], tok, 4)


@pytest.mark.slow
def test_a_rows_loglikelihood_is_the_harness_models_for_the_gold_answer(
  gold, tok, random_model
):
  """Each row's summed log-probability is what `--model gemma_jax` with
  max_length = seq_len answers for the gold request."""
  from lm_eval.api.instance import Instance

  from gemma_jax.evals.harness import GemmaJaxLM

  params, cfg = random_model
  tasks = [gold["local_arc"], gold["local_gsm8k"]]
  requests = [r for t in tasks for r in t["requests"]]
  forward = step_lib.model_forward(Transformer(cfg))
  # Each row alone (a unit of one row), all rows in one compiled call.
  per_unit = jax.jit(jax.vmap(fisher.unit_loglik(forward), in_axes=(None, 0)))
  for seq_len in (256, 24):  # whole prompts; cut from the left
    rows = fisher_data.GoldRows(tasks, tok, seq_len)
    units = {
      k: jnp.asarray(np.stack([rows.row(i)[k][None] for i in range(5)]))
      for k in fisher.UNIT_KEYS
    }
    per_row = per_unit(params, units)
    lm = GemmaJaxLM(
      params=params, model_config=cfg, tokenizer=tok, max_length=seq_len
    )
    expected = lm.loglikelihood(
      [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
    )
    np.testing.assert_allclose(
      per_row, [ll for ll, _ in expected], rtol=1e-5, atol=1e-4
    )
  assert rows.describe()["truncated"] == 5
