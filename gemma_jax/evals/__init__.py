"""Benchmarks scored as lm-evaluation-harness 0.4.x (checked against 0.4.13)
scores them.

    readers     original file formats (ARC, MMLU, GSM8K, HellaSwag, generic)
    tasks       the harness's prompts, few-shot sampling and defaults
    scoring     multiple choice by log-likelihood (acc, acc_norm, acc_bytes)
    generation  generative exact match (GSM8K strict / flexible)
    evaluate    a list of tasks with one model; group averages (MMLU)
    report      markdown table, JSON, per-item JSONL, bar chart
    synthetic   small offline tasks from the embedded corpus

    ll = scoring.make_loglikelihood_fn(params, cfg, tokenizer, batch_size=8)
    gen = generation.make_generate_fn(params, cfg, tokenizer, batch_size=8)
    metrics, items = evaluate.evaluate_tasks(
        [tasks.arc("ARC-Easy-Test.jsonl"), *tasks.mmlu("mmlu/data"),
         tasks.gsm8k("gsm8k/test.jsonl", shots="gsm8k/train.jsonl")], ll, gen)

scripts/compare_lm_eval.py runs the harness's `hf` model on an HF export of
the same checkpoint and compares document by document.

Where we knowingly differ from the harness (none changes a score on plain
benchmark text):
- Text that spells a special token ("<bos>", "<eos>", ...) is encoded by
  SentencePiece as plain text; transformers' tokenizer turns it into the
  special id (and the harness adds no bos before a context that starts with
  "<bos>").
- Per-token log-probabilities are float32 in both; we add them in float64,
  the harness in float32.
- Only the plain-text prompt path: no chat template, system instruction or
  gen_prefix; the multiple-choice `exact_match` (is_greedy) and
  `acc_mutual_info` are not computed.
- Generation always decodes max_gen_toks tokens and then cuts at the stop
  strings; the harness stops a batch early once every row has one. Greedy
  decoding makes the text before the stop the same.
- A group's stderr pools the members' stderrs once (mmlu over 57 subjects);
  the harness pools through its sub-groups (stem, humanities, ...). The
  group mean is the same.
- A document is excluded from shots drawn from its own split when its
  content (query, choices, gold, target) matches; the harness compares the
  raw rows, so two rows differing only in an id field count as different
  there and as the same here.
- The harness renders prompts through Jinja templates; we build the same
  strings directly. A generic task whose context is all digits would become
  an integer there (its "multiple input" mode); here it stays text.
"""
