"""Generative exact match with the harness's GSM8K filters and normalisation."""

import dataclasses
import types

import numpy as np
import pytest

from gemma_jax.checkpoint.testing import random_params
from gemma_jax.data import testing
from gemma_jax.evals import generation, tasks
from gemma_jax.evals.readers import Doc
from gemma_jax.model import sampler
from gemma_jax.model.testing import TINY_GEMMA1_MQA
from gemma_jax.tokenizer import Tokenizer

GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"


@pytest.mark.parametrize(
  "text, strict, flexible",
  [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
    ("#### -1,234.5 and then #### 9", "-1,234.5", "9"),
    ("The answer is $1,234.", "[invalid]", "$1,234."),
    ("16 - 3 - 4 = 9 eggs, so 9 * 2 = 18", "[invalid]", "18"),
    ("no digits at all", "[invalid]", "[invalid]"),
    ("####  5", "[invalid]", "5"),  # two spaces: no strict match
    ("x = 5", "[invalid]", "5"),  # one digit: the second group
    ("#### 72.\n\n", "72.", "72."),
  ],
)
def test_strict_and_flexible_extraction(text, strict, flexible):
  assert generation.strict_match(text) == strict
  assert generation.flexible_extract(text) == flexible


@pytest.mark.parametrize(
  "prediction, match",
  [
    ("72", 1.0),
    ("72.", 1.0),
    ("$72", 1.0),
    ("7,2", 1.0),
    ("72.0", 0.0),
    ("[invalid]", 0.0),
    ("-72", 0.0),
  ],
)
def test_exact_match_normalises_both_sides(prediction, match):
  assert generation.exact_match(prediction, GOLD) == match


def test_normalisation_drops_everything_up_to_the_last_hashes():
  assert generation.normalize("A\n#### b\n#### 1,000.") == "1000"
  assert generation.normalize("$5 ABC") == "5 abc"


def test_cut_at_stop_splits_at_each_stop_in_turn():
  until = ["Question:", "</s>", "<|im_end|>", "<eos>"]
  assert (
    generation.cut_at_stop(" 5\n#### 5\n\nQuestion: next", until)
    == " 5\n#### 5\n\n"
  )
  assert generation.cut_at_stop("a</s>b Question: c", until) == "a"
  # In turn, as the harness does: after cutting at "Qu", the "aQ" that
  # straddled the cut is gone.
  assert generation.cut_at_stop("xaQu", ["Qu", "aQ"]) == "xa"


def test_evaluate_generative_with_a_fake_generator():
  docs = (
    Doc("Question: 2+2?\nAnswer:", target="2+2=4\n#### 4"),
    Doc("Question: 3*3?\nAnswer:", target="#### 9"),
  )
  task = tasks.Task("toy", "generate_until", docs, until=tasks.GSM8K_UNTIL)
  outputs = {
    docs[0].query: " 2+2=4\n#### 4\n\nQuestion: 5+5?\n#### 10",
    docs[1].query: " 3*3 is 9, not 6<eos>#### 6",
  }
  calls = []

  def fake(prompts, max_new_tokens):
    calls.append(max_new_tokens)
    return [outputs[p] for p in prompts]

  metrics, items = generation.evaluate_generative(task, fake)
  assert calls == [256]
  assert items[0]["generation"] == " 2+2=4\n#### 4\n\n"
  assert items[1]["generation"] == " 3*3 is 9, not 6"
  assert [it["strict-match"] for it in items] == ["4", "[invalid]"]
  assert [it["flexible-extract"] for it in items] == ["4", "6"]
  assert metrics["exact_match,strict-match"] == 0.5
  assert metrics["exact_match,flexible-extract"] == 0.5
  assert metrics["n"] == 2


@pytest.mark.slow
def test_model_generation_keeps_prompt_order_and_truncates_left(tmp_path):
  tok = Tokenizer.load(testing.tiny_tokenizer(tmp_path / "t.model"))
  cfg = dataclasses.replace(
    TINY_GEMMA1_MQA,
    d_model=32,
    mlp_dim=64,
    head_dim=16,
    vocab_size=tok.vocab_size,
  )
  params = random_params(cfg, scale=0.3)
  # The short prompt first: rows are generated longest first, then put back.
  prompts = ["def f(x):", "the model reads text and code while numbers add"]
  ids = [tok.encode(p, add_bos=True)[-8:].tolist() for p in prompts]
  assert len(ids[0]) < 8 < len(tok.encode(prompts[1], add_bos=True))
  generate = generation.make_generate_fn(
    params, cfg, tok, batch_size=2, max_length=12
  )  # keeps 12 - 4
  got = generate(prompts, 4)
  new = sampler.generate(params, cfg, ids, 4)
  assert got == [tok.decode([t for t in row if t != 1]) for row in new]
  assert got[0] != got[1]


def test_every_sampler_call_has_one_shape(monkeypatch):
  shapes = []

  def fake_generate(params, cfg, prompts, max_new_tokens, **kw):
    shapes.append((len(prompts), max(len(p) for p in prompts)))
    return [[7] * max_new_tokens for _ in prompts]

  monkeypatch.setattr(sampler, "generate", fake_generate)

  class Tok:
    def check_vocab(self, n):
      pass

    def encode(self, text, add_bos):
      return np.array([2] + [5] * len(text))

    def decode(self, ids):
      return "x" * len(ids)

  cfg = types.SimpleNamespace(vocab_size=10)
  generate = generation.make_generate_fn({}, cfg, Tok(), batch_size=2)
  assert generate(["a", "abcde", "ab"], 3) == ["xxx"] * 3
  # Rows sorted longest first: [abcde, ab] then [a] + a filler row, each
  # with a filler row as long as the longest prompt (6 tokens).
  assert shapes == [(3, 6), (3, 6)]
