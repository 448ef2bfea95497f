"""Benchmarks scored as lm-evaluation-harness 0.4.x scores them.

    readers     original file formats (ARC, MMLU, GSM8K, HellaSwag, generic)
    tasks       the harness's prompts, few-shot sampling and defaults
    scoring     multiple choice by log-likelihood (acc, acc_norm, acc_bytes)
    generation  generative exact match (GSM8K strict / flexible)
    evaluate    a list of tasks with one model; group averages (MMLU)
    report      markdown table, JSON, per-item JSONL, bar chart
    synthetic   small offline tasks from the embedded corpus
"""
