"""Generative scoring as the harness does it to our generations: GSM8K's
strict-match and flexible-extract filters, exact match after its
normalisation, stop strings cut in turn, group stderrs pooled (the
assertions of the hand-written scorer this replaced, on the harness)."""

import json
import math
import os

import pytest

pytest.importorskip("lm_eval", reason="needs the `eval` extra (lm-eval)")

from lm_eval.api.model import LM
from lm_eval.models.utils import postprocess_generated_text

from gemma_jax.evals import benchmarks
from gemma_jax.evals.testing import harness_tasks_dir

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
# (generation, strict-match, flexible-extract)
EXTRACTION = [
  ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
  ("#### -1,234.5 and then #### 9", "-1,234.5", "9"),
  ("The answer is $1,234.", "[invalid]", "$1,234."),
  ("16 - 3 - 4 = 9 eggs, so 9 * 2 = 18", "[invalid]", "18"),
  ("no digits at all", "[invalid]", "[invalid]"),
  ("####  5", "[invalid]", "5"),  # two spaces: no strict match
  ("x = 5", "[invalid]", "5"),  # one digit: the second group
  ("#### 72.\n\n", "72.", "72."),
]
# (a prediction alone, whether it matches GOLD's "#### 72")
MATCH = [
  ("72", 1.0),
  ("72.", 1.0),
  ("$72", 1.0),
  ("7,2", 1.0),
  ("72.0", 0.0),
  ("no number", 0.0),
  ("-72", 0.0),
]


class Scripted(LM):
  """Generates the text scripted for each question (no model)."""

  def __init__(self, texts):
    super().__init__()
    self.texts = texts

  def generate_until(self, requests, disable_tqdm=False):
    return [self.texts[r.args[0].rsplit("Question: ", 1)[1]] for r in requests]

  def loglikelihood(self, requests, disable_tqdm=False):
    raise AssertionError("not asked")

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    raise AssertionError("not asked")


@pytest.fixture(scope="module")
def gsm8k_results(tmp_path_factory):
  """The harness's gsm8k (0-shot) over one document per case."""
  root = tmp_path_factory.mktemp("gsm8k")
  cases = [(f"case {i}?", text) for i, (text, _, _) in enumerate(EXTRACTION)]
  cases += [(f"match {i}?", text) for i, (text, _) in enumerate(MATCH)]
  rows = [{"question": q, "answer": GOLD} for q, _ in cases]
  data = root / "test.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "g.yaml").write_text(
    json.dumps(
      {
        "include": str(harness_tasks_dir() / "gsm8k/gsm8k.yaml"),
        "task": "g",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
          "data_files": {"test": str(data), "train": str(data)}
        },
      }
    )
  )
  texts = {f"{q}\nAnswer:": text for q, text in cases}
  opts = benchmarks.Options(
    tasks=("g",), include_path=(str(root),), num_fewshot=0, log_samples=True
  )
  return benchmarks.evaluate(Scripted(texts), opts)


def _filtered(results, doc_id, name):
  (sample,) = [
    s
    for s in results["samples"]["g"]
    if s["doc_id"] == doc_id and s["filter"] == name
  ]
  return sample["filtered_resps"][0], sample["exact_match"]


@pytest.mark.parametrize("i", range(len(EXTRACTION)))
def test_strict_and_flexible_extraction(gsm8k_results, i):
  _, strict, flexible = EXTRACTION[i]
  assert _filtered(gsm8k_results, i, "strict-match")[0] == strict
  assert _filtered(gsm8k_results, i, "flexible-extract")[0] == flexible


@pytest.mark.parametrize("i", range(len(MATCH)))
def test_exact_match_normalises_both_sides(gsm8k_results, i):
  got = _filtered(gsm8k_results, len(EXTRACTION) + i, "flexible-extract")
  assert got[1] == MATCH[i][1], (MATCH[i], got)


def test_metrics_are_the_means_over_documents(gsm8k_results):
  metrics = gsm8k_results["results"]["g"]
  n = len(EXTRACTION) + len(MATCH)
  # Strict: only "#### 72." matches (normalised to 72); flexible: it and
  # the four MATCH cases that normalise to 72.
  assert metrics["exact_match,strict-match"] == pytest.approx(1 / n)
  assert metrics["exact_match,flexible-extract"] == pytest.approx(5 / n)


def test_stops_are_cut_in_turn():
  until = ["Question:", "</s>", "<|im_end|>", "<eos>"]
  cut = lambda text, stops: postprocess_generated_text(text, stops, None)
  assert cut(" 5\n#### 5\n\nQuestion: next", until) == " 5\n#### 5\n\n"
  assert cut("a</s>b Question: c", until) == "a"
  # In turn: after cutting at "Qu", the "aQ" that straddled the cut is gone.
  assert cut("xaQu", ["Qu", "aQ"]) == "xa"


def test_a_group_stderr_pools_its_members():
  from lm_eval.api.metrics import pooled_sample_stderr

  # sum((n-1) s^2 n) / (N - k), over N, square root.
  var = (9 * 0.01 * 10 + 29 * 0.04 * 30) / (40 - 2)
  assert pooled_sample_stderr([0.1, 0.2], [10, 30]) == pytest.approx(
    math.sqrt(var / 40)
  )
