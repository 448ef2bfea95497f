"""Evaluation through lm-evaluation-harness (0.4.13) itself.

    harness       GemmaJaxLM: our model as an lm_eval LM, registered as
                  `gemma_jax` (loglikelihood, rolling, generate_until);
                  RequestTokens: the token ids it scores, without a model
    decoding      KV-cache generation in chunks that stops a batch early
    benchmarks    the harness's tasks, options and results; `study`; the
                  local data files of a task, checked; the gold requests of
                  every document (Fisher rows)
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

Every benchmark number is the harness's own (one way to score): its task
configs build the prompts, few-shot examples and requests, and GemmaJaxLM
scores them. A Fisher on benchmark gold answers (`gemma-jax fisher
--tasks`) takes the same requests (benchmarks.gold_requests) tokenised as
GemmaJaxLM tokenises them (harness.RequestTokens).
"""
