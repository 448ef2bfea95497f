"""Evaluation through lm-evaluation-harness (0.4.13) itself.

    harness       GemmaJaxLM: our model as an lm_eval LM, registered as
                  `gemma_jax` (loglikelihood, rolling, generate_until)
    decoding      KV-cache generation in chunks that stops a batch early
    benchmarks    the harness's tasks, options and results; `study`; the
                  gold requests of every document (Fisher rows)
    forgetting    checkpoints side by side: held-out loss per source and
                  the harness's benchmarks (`gemma-jax report`)
    report        the harness's results as tables, JSON and bar charts
    during_training  harness tasks on a training run's live params
    synthetic     small offline tasks from the embedded corpus (as files
                  and as harness task YAMLs)
    testing       tiny local copies of the harness's tasks, for tests

    lm = harness.GemmaJaxLM(checkpoint="runs/tiny/params",
                            tokenizer="tokenizer.model")
    results = benchmarks.evaluate(lm, benchmarks.Options(tasks=("study",)))

Still hand-written, for `gemma-jax fisher --task` only (a Fisher on
benchmark gold answers from the original files): readers, tasks and
scoring build the harness's prompts and tokenization themselves; the
harness's own requests for the same files are equal
(tests/evals/test_synthetic.py).
"""
