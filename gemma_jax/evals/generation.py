"""Generative exact match (GSM8K), as lm-evaluation-harness 0.4.x scores it.

The prompt is decoded greedily; the text is cut before the first stop
string (the task's `until` plus the eos piece "<eos>", which the harness's
HF model appends); two filters extract an answer (gsm8k.yaml):

    strict-match      the first "#### <number>"           (regex, take_first)
    flexible-extract  the last number-like span in the text

and each is compared with the reference after the same normalisation of
both (exact_match with regexes_to_ignore ",", "\\$", "(?s).*#### ", "\\.$"
applied in that order, then lower case). No match gives "[invalid]".

    generate = make_generate_fn(params, cfg, tokenizer, batch_size=8)
    metrics, items = evaluate_generative(task, generate)
"""

import re
from typing import Callable, Sequence

from gemma_jax.errors import ConfigError
from gemma_jax.evals import scoring
from gemma_jax.evals import tasks as tasks_lib
from gemma_jax.model import ModelConfig
from gemma_jax.tokenizer import BOS_ID, EOS_ID, Tokenizer

EOS_TEXT = "<eos>"
FALLBACK = "[invalid]"
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
FILTERS = ("strict-match", "flexible-extract")

# (prompts, max_new_tokens) -> generated text of each prompt, uncut.
GenerateFn = Callable[[Sequence[str], int], list[str]]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """The harness's postprocess_generated_text: split at each stop in turn."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


def regex_filter(text: str, pattern: re.Pattern, group_select: int) -> str:
  """The harness's RegexFilter (findall, pick a match, first non-empty
  group, strip)."""
  matches = pattern.findall(text)
  if not matches:
    return FALLBACK
  match = matches[group_select]
  if isinstance(match, tuple):
    match = next((m for m in match if m), FALLBACK)
  return match.strip()


def strict_match(text: str) -> str:
  return regex_filter(text, STRICT, 0)


def flexible_extract(text: str) -> str:
  return regex_filter(text, FLEXIBLE, -1)


def normalize(text: str) -> str:
  """exact_match's normalisation in gsm8k.yaml (ignore_case, no
  punctuation stripping)."""
  for pattern in IGNORE:
    text = re.sub(pattern, "", text)
  return text.lower()


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize(prediction) == normalize(reference))


def make_generate_fn(params, model_config: ModelConfig, tokenizer: Tokenizer,
                     batch_size: int = 8,
                     max_length: int = scoring.HF_MAX_LENGTH,
                     progress: scoring.ProgressFn | None = None
                     ) -> GenerateFn:
  """Greedy generation with our KV-cache sampler.

  Prompts are encoded with bos and, like the harness, keep only their last
  `max_length - max_new_tokens` tokens. They are decoded longest first in
  batches of `batch_size`. Every batch the sampler sees has the same shape,
  so it compiles once per call: short batches are filled with filler rows,
  and one more filler row as long as the longest prompt fixes the width
  (rows never attend to each other; filler outputs are dropped).
  """
  from gemma_jax.model import sampler
  tokenizer.check_vocab(model_config.vocab_size)

  def generate(prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    keep = max_length - max_new_tokens
    if keep <= 0:
      raise ConfigError(f"max_new_tokens ({max_new_tokens}) must be less "
                        f"than max_length ({max_length})")
    ids = [tokenizer.encode(p, add_bos=True)[-keep:].tolist()
           for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    width = max(len(x) for x in ids)
    out = [""] * len(ids)
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      batch = [ids[i] for i in rows]
      batch += [[BOS_ID]] * (batch_size - len(rows)) + [[BOS_ID] * width]
      new = sampler.generate(params, model_config, batch, max_new_tokens,
                             temperature=0.0, eos_id=EOS_ID)
      for i, tokens in zip(rows, new):
        out[i] = tokenizer.decode([t for t in tokens if t != EOS_ID])
      if progress is not None:
        progress(min(start + batch_size, len(ids)), len(ids))
    return out
  return generate


def generation_metrics(generation: str, reference: str) -> dict:
  """Both filters' answers and exact matches for one document."""
  strict, flexible = strict_match(generation), flexible_extract(generation)
  return {"strict-match": strict, "flexible-extract": flexible,
          "exact_match,strict-match": exact_match(strict, reference),
          "exact_match,flexible-extract": exact_match(flexible, reference)}


METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def evaluate_generative(task: "tasks_lib.Task", generate_fn: GenerateFn,
                        seed: int = tasks_lib.FEWSHOT_SEED
                        ) -> tuple[dict, list[dict]]:
  """Scores a generate_until task: (metrics, one record per document)."""
  if task.kind != "generate_until":
    raise ConfigError(f"{task.name} is a {task.kind} task, not generative")
  ctxs = tasks_lib.contexts(task, seed)
  raw = generate_fn(ctxs, task.max_gen_toks)
  until = list(task.until) + ([EOS_TEXT] if EOS_TEXT not in task.until
                              else [])
  items = []
  for i, (ctx, doc, text) in enumerate(zip(ctxs, task.docs, raw)):
    generation = cut_at_stop(text, until)
    items.append({"task": task.name, "doc": i, "where": doc.where,
                  "context": ctx, "generation": generation,
                  "target": doc.target,
                  **generation_metrics(generation, doc.target)})
  return scoring.summarize(items, METRICS), items
