"""Multiple choice by log-likelihood, scored as lm-evaluation-harness does."""

import numpy as np
import pytest

from gemma_jax import cli
from gemma_jax.checkpoint import native
from gemma_jax.errors import ConfigError
from gemma_jax.evals import scoring, tasks
from gemma_jax.evals.readers import Doc
from gemma_jax.tokenizer import BOS_ID, Tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory, random_model):
  """The random two-layer Gemma 2, saved as a native checkpoint."""
  params, cfg = random_model
  path = tmp_path_factory.mktemp("ckpt") / "ckpt"
  native.save(path, params, cfg)
  return path, params, cfg


def test_encode_pair_moves_trailing_space_to_the_continuation(tok):
  ctx, cont = scoring.encode_pair(tok, "Question: 2 + 2?\nAnswer: ", "4")
  # As if scoring ("Question: 2 + 2?\nAnswer:", " 4").
  assert ctx == tok.encode("Question: 2 + 2?\nAnswer:", add_bos=True).tolist()
  assert (
    ctx + cont
    == tok.encode("Question: 2 + 2?\nAnswer: 4", add_bos=True).tolist()
  )
  assert ctx[0] == BOS_ID and tok.decode(cont) == " 4"


def test_encode_pair_keeps_the_contexts_own_tokens_across_a_merge(tok):
  # This tokenizer has the piece "):\n": the whole text merges across the
  # boundary. Like the harness, the context keeps its own "):" and the
  # continuation is the whole encoding past len(context) tokens, so the
  # newline is not scored (nor seen) at all.
  whole = tok.encode("def f(x):\n  return x", add_bos=True).tolist()
  ctx, cont = scoring.encode_pair(tok, "def f(x):", "\n  return x")
  assert tok.id_to_piece(ctx[-1]) == "):"
  assert "):\n" in [tok.id_to_piece(i) for i in whole]
  assert cont == whole[len(ctx) :] and ctx + cont != whole
  assert tok.decode(cont) == "  return x"


def test_encode_pair_with_an_empty_context_conditions_on_bos(tok):
  assert scoring.encode_pair(tok, "", " value") == (
    [BOS_ID],
    tok.encode(" value").tolist(),
  )


def test_choice_metrics_by_hand():
  # per char: -2.0, -0.75, -0.8; per byte ("ééé" is 6 bytes): -2, -0.75, -0.4
  m = scoring.choice_metrics(
    [-4.0, -6.0, -2.4], ["ab", "abcdefgh", "ééé"], gold=1
  )
  assert (m["pred"], m["pred_norm"], m["pred_bytes"]) == (2, 1, 2)
  assert (m["acc"], m["acc_norm"], m["acc_bytes"]) == (0.0, 1.0, 0.0)
  # Ties go to the first choice, as np.argmax does.
  assert scoring.choice_metrics([-1.0, -1.0], ["a", "b"], 1)["acc"] == 0.0


def test_evaluate_multiple_choice_with_known_loglikelihoods():
  docs = (
    Doc("Q1:", ("yes", "nope"), 0),
    Doc("Q2:", ("a", "bbbb"), 1),
    Doc("Q3:", ("cc", "d"), 0),
  )
  task = tasks.Task("toy", "multiple_choice", docs)
  known = {
    ("Q1:", " yes"): -3.0,
    ("Q1:", " nope"): -3.2,  # acc 1, norm 0
    ("Q2:", " a"): -1.0,
    ("Q2:", " bbbb"): -2.0,  # acc 0, norm 1
    ("Q3:", " cc"): -1.0,
    ("Q3:", " d"): -0.4,
  }  # acc 0, norm 0
  seen = []

  def fake(requests):
    seen.extend(requests)
    return [known[r] for r in requests]

  metrics, items = scoring.evaluate_multiple_choice(task, fake)
  assert seen == list(known)
  assert metrics["acc"] == pytest.approx(1 / 3)
  assert metrics["acc_norm"] == pytest.approx(1 / 3)
  # Sample std of (1, 0, 0) over sqrt(3), the harness's mean_stderr.
  assert metrics["acc_stderr"] == pytest.approx(
    np.std([1, 0, 0], ddof=1) / np.sqrt(3)
  )
  assert metrics["n"] == 3
  assert [it["acc"] for it in items] == [1.0, 0.0, 0.0]
  assert [it["acc_norm"] for it in items] == [0.0, 1.0, 0.0]
  assert items[1] == {
    "task": "toy",
    "doc": 1,
    "where": "",
    "context": "Q2:",
    "choices": ["a", "bbbb"],
    "loglikelihoods": [-1.0, -2.0],
    "lengths": [1, 4],
    "bytes": [1, 4],
    "gold": 1,
    "pred": 0,
    "pred_norm": 1,
    "pred_bytes": 1,
    "acc": 0.0,
    "acc_norm": 1.0,
    "acc_bytes": 1.0,
  }


def fake_logprob_fn(inputs, targets, mask):
  """A position-dependent stand-in for a model: -(t + 1) - target / 1000."""
  t = np.arange(inputs.shape[1])[None]
  return np.where(mask == 1, -(t + 1.0) - targets / 1000.0, 0.0)


REQUESTS = [
  ([2, 10, 11], [12]),
  ([2, 10], [11, 12, 13]),
  ([2], [5]),
  ([2, 10, 11], [12]),
  ([2, 7, 7, 7, 7, 7], [8, 9]),
]


def by_hand(ctx, cont, seq_len):
  window = (ctx + cont)[-(seq_len + 1) :]
  n = len(window) - 1
  return sum(
    -(t + 1.0) - window[t + 1] / 1000.0 for t in range(n - len(cont), n)
  )


def test_loglikelihoods_sum_the_continuation_tokens():
  got = scoring.loglikelihoods(
    REQUESTS, fake_logprob_fn, batch_size=2, seq_len=16
  )
  np.testing.assert_allclose(got, [by_hand(c, x, 16) for c, x in REQUESTS])


def test_long_requests_lose_tokens_from_the_left():
  # seq_len 4: the harness keeps (ctx + cont)[-5:] and feeds its first 4.
  got = scoring.loglikelihoods(REQUESTS, fake_logprob_fn, 3, seq_len=4)
  assert got[4] == pytest.approx(by_hand([2, 7, 7, 7, 7, 7], [8, 9], 4))
  assert got[4] == pytest.approx((-3 - 0.008) + (-4 - 0.009))
  with pytest.raises(
    ConfigError, match="continuation of 3 tokens does not fit seq_len 2"
  ):
    scoring.loglikelihoods(REQUESTS, fake_logprob_fn, 3, seq_len=2)


def test_batches_have_one_shape_and_duplicates_are_scored_once():
  shapes = []

  def spy(inputs, targets, mask):
    shapes.append(inputs.shape)
    return fake_logprob_fn(inputs, targets, mask)

  scoring.loglikelihoods(
    REQUESTS, spy, batch_size=3, seq_len=64, width_multiple=8
  )
  # 4 distinct requests (one repeated) -> 2 batches of [3, 8].
  assert shapes == [(3, 8), (3, 8)]


@pytest.mark.slow
def test_model_loglikelihood_equals_summed_score_logprobs(
  model, tok_path, tmp_path
):
  path, params, cfg = model
  tok = Tokenizer.load(tok_path)
  pairs = [
    ("def f(x):\n  return x + ", "1"),
    ("the model reads", " text"),
    ("numbers add up to ", "more tokens"),
  ]
  ll = scoring.make_loglikelihood_fn(
    params, cfg, tok, batch_size=2, seq_len=64
  )(pairs)
  texts = [c + x for c, x in pairs]
  argv = [
    "score",
    "--checkpoint",
    str(path),
    "--tokenizer",
    tok_path,
    "--logprobs-only",
    "--out",
    str(tmp_path / "s.npz"),
  ]
  for text in texts:
    argv += ["--text", text]
  assert cli.main(argv) == 0
  logprobs = np.load(tmp_path / "s.npz")["logprobs"]
  for row, (ctx, cont) in enumerate(pairs):
    n = len(tok.encode(ctx + cont, add_bos=True))
    k = len(scoring.encode_pair(tok, ctx, cont)[1])
    assert k >= 1
    want = logprobs[row, n - 1 - k : n - 1].sum()
    assert ll[row] == pytest.approx(float(want), abs=1e-4)


@pytest.mark.slow
def test_padding_and_batching_do_not_change_the_model_scores(model, tok):
  _, params, cfg = model
  fn = scoring.make_token_logprob_fn(params, cfg)
  ids = [
    scoring.encode_pair(tok, c, x)
    for c, x in [
      ("a short one", " here"),
      ("def f(x):\n  return x", " + 1\n"),
      ("the model reads text and code while numbers add", " up"),
    ]
  ]
  one = scoring.loglikelihoods(
    ids, fn, batch_size=1, seq_len=64, width_multiple=1
  )
  wide = scoring.loglikelihoods(
    ids, fn, batch_size=4, seq_len=64, width_multiple=64
  )
  np.testing.assert_allclose(one, wide, atol=1e-5)
  assert (one < 0).all()
