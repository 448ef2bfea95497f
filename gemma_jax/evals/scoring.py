"""Multiple choice by log-likelihood, as lm-evaluation-harness 0.4.x scores it.

Each choice is the request (context, target_delimiter + choice); its score
is the summed log-probability of the continuation's tokens given the
context. Per document (lm_eval/api/task.py, `process_results`):

    acc        argmax of the sums                      (np.argmax: first max)
    acc_norm   argmax of sum / len(choice)             characters of the
    acc_bytes  argmax of sum / len(choice.encode())    choice, delimiter NOT
                                                       counted
Tokenization follows the harness's `_encode_pair` for a causal model:
trailing whitespace of the context moves to the front of the continuation;
the context is encoded alone (with bos), the continuation is the whole
text's encoding past as many tokens as the context has. A request longer than `seq_len + 1` tokens
loses tokens from the left, bos first, as the harness truncates to the
model's max_length.

Three layers, each replaceable:

    TokenLogprobFn   (inputs, targets, mask) [B, T] -> log p(targets) [B, T]
                     make_token_logprob_fn(params, cfg) runs our Transformer;
                     a sharded model can supply its own.
    loglikelihoods   token requests -> summed log-probs, in fixed [B, T]
                     batches (one compile per call), duplicates scored once
    make_loglikelihood_fn(params, cfg, tokenizer, batch_size, seq_len)
                     (context, continuation) strings -> summed log-probs
"""

import math
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.errors import ConfigError
from gemma_jax.evals import tasks as tasks_lib
from gemma_jax.model import ModelConfig, Transformer
from gemma_jax.tokenizer import BOS_ID, PAD_ID, Tokenizer

# The harness's max_length for our HF exports: their config.json's
# max_position_embeddings (gemma_jax.checkpoint.hf_config.to_hf).
HF_MAX_LENGTH = 8192

# (inputs [B, T] int32, targets [B, T] int32, mask [B, T] int32 of 1 = real
# input, right-padded) -> float32 [B, T]:
# log p(targets[b, t] | inputs[b, :t+1]).
TokenLogprobFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# [(context, continuation)] -> summed log-probability of each continuation.
LoglikelihoodFn = Callable[[Sequence[tuple[str, str]]], list[float]]
# (requests done, requests in all) after each batch.
ProgressFn = Callable[[int, int], None]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
  """The harness's TemplateLM._encode_pair (causal) with a bos-adding
  tokenizer; an empty context becomes [bos] (TemplateLM.loglikelihood)."""
  if not context:
    cont = tokenizer.encode(continuation).tolist()
    if cont and cont[0] == BOS_ID:
      return cont[:1], cont[1:]
    return [BOS_ID], cont
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  whole = tokenizer.encode(context + continuation, add_bos=True).tolist()
  ctx = tokenizer.encode(context, add_bos=True).tolist()
  # The context keeps its own encoding even where the whole text merges a
  # piece across the boundary ("):" + "\n" -> "):\n"): the model then sees
  # ctx + whole[len(ctx):], not the whole text's tokens, as in the harness.
  return ctx, whole[len(ctx):]


def model_logits(cfg: ModelConfig, params, tokens, segment_ids):
  """float32 logits [B, T, V] of our Transformer (the one call site)."""
  return Transformer(cfg).apply({"params": params}, tokens, None,
                                segment_ids)


def make_token_logprob_fn(params, cfg: ModelConfig) -> TokenLogprobFn:
  """A jitted TokenLogprobFn over our model; params are put on the devices
  once. Padding (mask 0) is segment 0, which no real token attends to."""
  params = jax.device_put(params)

  @jax.jit
  def logprobs(params, inputs, targets, mask):
    logits = model_logits(cfg, params, inputs, mask).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    out = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(mask == 1, out, 0.0)

  def fn(inputs, targets, mask):
    return np.asarray(logprobs(params, jnp.asarray(inputs),
                               jnp.asarray(targets), jnp.asarray(mask)))
  return fn


def _window(context: Sequence[int], continuation: Sequence[int],
            seq_len: int) -> tuple[int, ...]:
  if not continuation:
    raise ConfigError("a continuation encodes to no tokens; every choice "
                      "needs at least one token")
  if len(continuation) > seq_len:
    raise ConfigError(f"a continuation of {len(continuation)} tokens does "
                      f"not fit seq_len {seq_len}")
  # HFLM._loglikelihood_tokens: (ctx + cont)[-(max_length + 1):][:-1].
  return tuple(list(context) + list(continuation))[-(seq_len + 1):]


def batch_width(lengths: Sequence[int], seq_len: int, multiple: int) -> int:
  """Row width T for inputs of these lengths: the longest rounded up to a
  multiple of `multiple`, at most seq_len. Right padding never changes a
  causal model's outputs at real positions."""
  longest = max(lengths)
  return min(seq_len, -(-longest // multiple) * multiple)


def loglikelihoods(requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   logprob_fn: TokenLogprobFn, batch_size: int, seq_len: int,
                   width_multiple: int = 128,
                   progress: ProgressFn | None = None) -> np.ndarray:
  """Summed log p(continuation | context) per (context, continuation) ids.

  Rows are right-padded into [batch_size, T] batches of one shape (T from
  `batch_width`), so `logprob_fn` compiles once per call; identical
  requests are scored once.
  """
  if batch_size <= 0 or seq_len <= 0:
    raise ConfigError(f"batch_size ({batch_size}) and seq_len ({seq_len}) "
                      "must be positive")
  windows = [_window(c, x, seq_len) for c, x in requests]
  conts = [len(x) for _, x in requests]
  unique = {}
  for w, n in zip(windows, conts):
    unique.setdefault((w, n), len(unique))
  rows = list(unique)
  if not rows:
    return np.zeros((0,), np.float64)
  t = batch_width([len(w) - 1 for w, _ in rows], seq_len, width_multiple)
  sums = np.zeros((len(rows),), np.float64)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    inputs = np.full((batch_size, t), PAD_ID, np.int32)
    targets = np.full((batch_size, t), PAD_ID, np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    for i, (w, _) in enumerate(chunk):
      n = len(w) - 1
      inputs[i, :n], targets[i, :n], mask[i, :n] = w[:-1], w[1:], 1
    out = np.asarray(logprob_fn(inputs, targets, mask), np.float64)
    for i, (w, n_cont) in enumerate(chunk):
      n = len(w) - 1
      sums[start + i] = out[i, n - n_cont:n].sum()
    if progress is not None:
      progress(min(start + batch_size, len(rows)), len(rows))
  return np.array([sums[unique[(w, n)]] for w, n in zip(windows, conts)])


def print_progress(label: str, every_s: float = 10.0) -> ProgressFn:
  """A ProgressFn printing 'label: done/total' to stderr every `every_s`."""
  last = [0.0]

  def report(done: int, total: int) -> None:
    now = time.monotonic()
    if done == total or now - last[0] >= every_s:
      last[0] = now
      print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)
  return report


def make_loglikelihood_fn(params, model_config: ModelConfig,
                          tokenizer: Tokenizer, batch_size: int = 8,
                          seq_len: int = HF_MAX_LENGTH,
                          logprob_fn: TokenLogprobFn | None = None,
                          progress: ProgressFn | None = None
                          ) -> LoglikelihoodFn:
  """[(context, continuation)] -> summed log-probs under our model.

  seq_len plays the harness's max_length: longer requests are cut from the
  left. Batches are only as wide as the longest request needs.
  `logprob_fn` replaces the single-device forward (e.g. a sharded one); by
  default `make_token_logprob_fn(params, model_config)`.
  """
  tokenizer.check_vocab(model_config.vocab_size)
  fn = logprob_fn or make_token_logprob_fn(params, model_config)

  def loglikelihood(requests):
    ids = [encode_pair(tokenizer, c, x) for c, x in requests]
    return loglikelihoods(ids, fn, batch_size, seq_len,
                          progress=progress).tolist()
  return loglikelihood


def choice_requests(task: "tasks_lib.Task", contexts: Sequence[str]
                    ) -> list[tuple[str, str]]:
  """Every (context, delimiter + choice) request, document by document."""
  return [(ctx, task.target_delimiter + choice)
          for ctx, doc in zip(contexts, task.docs) for choice in doc.choices]


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int
                   ) -> dict:
  """acc, acc_norm and acc_bytes of one document (harness formulas)."""
  lls = np.asarray(lls, np.float64)
  chars = np.array([float(len(c)) for c in choices])
  nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
  pred = int(np.argmax(lls))
  pred_norm = int(np.argmax(lls / chars))
  pred_bytes = int(np.argmax(lls / nbytes))
  return {"pred": pred, "pred_norm": pred_norm, "pred_bytes": pred_bytes,
          "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
          "acc_bytes": float(pred_bytes == gold)}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
  """Mean and the harness's mean_stderr (sample std / sqrt(n))."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(values.mean()), float("nan")
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(
      len(values)))


def summarize(items: Sequence[dict], metrics: Sequence[str]) -> dict:
  """{metric, metric_stderr, ..., 'n'} over per-item records."""
  out = {}
  for m in metrics:
    out[m], out[f"{m}_stderr"] = mean_and_stderr([it[m] for it in items])
  out["n"] = len(items)
  return out


MC_METRICS = ("acc", "acc_norm", "acc_bytes")


def choice_items(task: "tasks_lib.Task", contexts: Sequence[str],
                 lls: Sequence[float]) -> tuple[dict, list[dict]]:
  """(metrics, one record per document) from the log-likelihoods of
  `choice_requests(task, contexts)`, in that order.

  A record holds the prompt, each choice's log-likelihood, its length in
  characters and bytes, the three predictions, the gold index and the
  0/1 metrics.
  """
  items, k = [], 0
  for i, (ctx, doc) in enumerate(zip(contexts, task.docs)):
    doc_lls = [float(x) for x in lls[k:k + len(doc.choices)]]
    k += len(doc.choices)
    items.append({
        "task": task.name, "doc": i, "where": doc.where, "context": ctx,
        "choices": list(doc.choices), "loglikelihoods": doc_lls,
        "lengths": [len(c) for c in doc.choices],
        "bytes": [len(c.encode("utf-8")) for c in doc.choices],
        "gold": doc.gold, **choice_metrics(doc_lls, doc.choices, doc.gold)})
  return summarize(items, MC_METRICS), items


def evaluate_multiple_choice(task: "tasks_lib.Task",
                             loglikelihood_fn: LoglikelihoodFn,
                             seed: int = tasks_lib.FEWSHOT_SEED
                             ) -> tuple[dict, list[dict]]:
  """Scores a multiple-choice task: (metrics, one record per document)."""
  if task.kind != "multiple_choice":
    raise ConfigError(f"{task.name} is a {task.kind} task, not multiple "
                      "choice")
  ctxs = tasks_lib.contexts(task, seed)
  return choice_items(task, ctxs,
                      list(loglikelihood_fn(choice_requests(task, ctxs))))
