"""lm-evaluation-harness tasks during training, on the live params.

    harness:                  # in a run config
      tasks: [arc_easy, hellaswag]
      every: 500              # steps (0: at the end only)
      limit: 200              # documents per task
      num_fewshot: 0

The `harness` feature (gemma_jax/features/harness_eval.py) calls this
module's Runner every `harness.every` steps: the harness through the same
model class as `gemma-jax report`
and `gemma-jax lm-eval` (evals/harness.GemmaJaxLM), on the trainer's
params as they are placed on its mesh: no second copy, no checkpoint round
trip, and the train step is not recompiled (the scoring programs are
compiled once per shape and kept for the next evaluation). Every metric
and its stderr go to eval.jsonl and TensorBoard beside the held-out loss,
as harness/<task>/<metric> (/<filter> when there is one), e.g.
harness/arc_easy/acc, harness/gsm8k/exact_match/strict-match.

The task names are checked when the run starts (one line naming every
unknown one), before anything trains. Importing this module plugs it into
the feature (evals sits above the features in the package's stack, so
gemma_jax.features cannot import it); `gemma-jax train` does.
"""

from gemma_jax.features import harness_eval


def options(cfg):
  """benchmarks.Options of a run config's `harness` section."""
  from gemma_jax.evals import benchmarks

  h = cfg.harness
  return benchmarks.Options(
    tasks=tuple(h.tasks),
    include_path=tuple(h.include_path),
    limit=h.limit,
    num_fewshot=h.num_fewshot,
    gen_kwargs=h.gen_kwargs,
    seed=(cfg.train.seed, 1234, 1234, 1234),
  )


def record(step: int, results: dict) -> dict:
  """The eval.jsonl record of harness results: harness/<task>/<metric>."""
  from gemma_jax.evals import report

  out: dict = {"step": step}
  for row in report.metric_rows({"run": results}):
    key = f"harness/{row.task}/{row.metric}"
    if row.filter not in ("", "none"):
      key += f"/{row.filter}"
    out[key] = row.values["run"]
    if row.stderrs["run"] is not None:
      out[key + "_stderr"] = row.stderrs["run"]
  return out


class Session:
  """One run's evaluations: the task index and the model object, made at
  the start and reused every time (so are its compiled programs)."""

  def __init__(self, cfg, manager, tokenizer):
    self.cfg, self.manager, self.tokenizer = cfg, manager, tokenizer
    self.lm = None


class Runner:
  """What gemma_jax.features.harness_eval runs (plugged in on import)."""

  @staticmethod
  def start(cfg, program, pipe) -> Session:
    """Checks the task names (one line naming every unknown one)."""
    from gemma_jax.evals import benchmarks

    del program
    opts = options(cfg)
    manager = benchmarks.task_manager(opts)
    benchmarks.check_tasks(opts.task_names(), manager)
    return Session(cfg, manager, pipe.tokenizer)

  @staticmethod
  def run(session: Session, trainer, step: int) -> None:
    """Scores the trainer's params as they are; writes eval.jsonl."""
    from gemma_jax.evals import benchmarks, forgetting, report

    cfg, program = session.cfg, trainer.program
    params = program.full_params(trainer.state.params)
    if session.lm is None:
      session.lm = forgetting.model_for(
        program,
        params,
        session.tokenizer,
        cfg.harness.batch_size,
        max_length=cfg.harness.max_length,
        seed=cfg.train.seed,
      )
    session.lm.params = params  # the live ones; nothing is copied
    results = benchmarks.evaluate(session.lm, options(cfg), session.manager)
    trainer.writer.write(record(step, results), name="eval")
    rows = report.metric_rows({"run": results})
    shown = [
      f"{row.alias} {row.metric} {row.values['run']:.3f}"
      for task in forgetting.top_level(results)
      if (row := report.main_metric(rows, task))
      and row.values["run"] is not None
    ]
    # The trainer's own console line (process 0; its log function).
    trainer._print(f"harness step {step}: {', '.join(shown)}")


harness_eval.plug(Runner)
