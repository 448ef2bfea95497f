"""The forgetting report: checkpoints side by side on held-out data and
lm-evaluation-harness benchmarks, with the change from the first (the base)
to each later one.

    program = TrainProgram(run_config)
    pipe = gemma_jax.data.pipeline_for(run_config)
    opts = benchmarks.Options(tasks=("arc_easy", "mmlu"), limit=200)
    results = forgetting.report(program, pipe, {"base": "runs/base/params",
                                                "ewc": "runs/ewc"},
                                opts, "out/")

Per checkpoint: per-source held-out loss and perplexity (the run config's
eval splits, the trainer's evaluation) and the harness's results for the
tasks (evals/benchmarks.py, through the gemma_jax model on the program's
mesh). Writes report.md (a summary, held-out loss and perplexity per
source, the benchmarks side by side with each change from the base and
whether it exceeds the stderr), report.json, the harness's own results JSON
and per-sample files per checkpoint (harness/<checkpoint>/results_*.json,
samples_<task>_*.jsonl) and PNG bar charts.
"""

import os
from typing import Any

import jax

from gemma_jax import configlib, fileio
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.evals import benchmarks
from gemma_jax.evals import report as report_lib
from gemma_jax.train import metrics

# The harness's max_length for our HF exports: their config.json's
# max_position_embeddings (gemma_jax.checkpoint.hf_config.to_hf).
HF_MAX_LENGTH = 8192
# The harness's keys a report keeps (its results JSON has them all).
_HARNESS_KEYS = (
  "results",
  "groups",
  "group_subtasks",
  "n-shot",
  "higher_is_better",
  "versions",
  "n-samples",
)


def load_params(path: str, program):
  """Params of a native export, a Hugging Face directory or a training run
  (its latest checkpoint; `RUN@STEP` for another), placed in the program's
  param shardings. The model must be the program's."""
  from gemma_jax.checkpoint import hf, native
  from gemma_jax.checkpoint.hf_config import check_same_architecture
  from gemma_jax.train.checkpointing import Checkpointer

  run, _, step = path.partition("@")
  cfg = program.cfg.model
  if os.path.exists(os.path.join(run, native.CONFIG_FILE)):
    check_same_architecture(cfg, native.load_config(run), "the run config", run)
    params, _ = native.load(run, shardings=program.param_shardings)
    return params
  if os.path.exists(os.path.join(run, hf.CONFIG)):
    params, _ = hf.load(run, cfg, model_name="the run config")
    return jax.device_put(params, program.param_shardings)
  if os.path.isdir(os.path.join(run, "checkpoints")):
    ckpt = Checkpointer(
      os.path.join(run, "checkpoints"), program.cfg.checkpoint
    )
    try:
      meta = ckpt.restore_meta(int(step) if step else None)
      saved = configlib.from_dict(type(cfg), meta["config"]["model"], "model")
      check_same_architecture(cfg, saved, "the run config", run)
      restored = ckpt.restore(
        program.abstract_state, int(step) if step else None
      )
    finally:
      ckpt.close()
    return restored.state.params
  raise CheckpointError(
    f"{path}: neither a native export (model_config."
    f"json), a Hugging Face directory (config.json) nor "
    f"a training run (checkpoints/)"
  )


def model_for(program, params, tokenizer, batch_size=8, **kw):
  """The harness's view of params placed for `program` (its mesh and
  sharding rules): a GemmaJaxLM that scores on them as they are."""
  from gemma_jax.evals.harness import GemmaJaxLM

  return GemmaJaxLM(
    params=params,
    model_config=program.cfg.model,
    tokenizer=tokenizer,
    mesh=program.mesh,
    mesh_config=program.cfg.mesh,
    batch_size=batch_size,
    **kw,
  )


def evaluate_checkpoint(
  program,
  params,
  pipe,
  opts: benchmarks.Options | None,
  manager=None,
  *,
  eval_batches: int = 4,
  batch_size: int = 8,
  max_length: int = HF_MAX_LENGTH,
) -> dict[str, Any]:
  """{"heldout": {source: {loss, perplexity, tokens}}, "harness": the
  harness's results (None without opts)} of one set of params."""
  heldout = metrics.evaluate(program, params, pipe, eval_batches)
  harness_results = None
  if opts is not None:
    lm = model_for(
      program,
      params,
      pipe.tokenizer,
      batch_size,
      max_length=max_length,
      seed=opts.seeds[2],  # HFLM samples with the torch seed
    )
    harness_results = benchmarks.evaluate(lm, opts, manager)
  return {"heldout": heldout, "harness": harness_results}


def heldout_table(results: dict) -> str:
  """Markdown: per source, each checkpoint's held-out loss (perplexity) and
  the change of the last from the first."""
  names = list(results)
  sources = list(
    dict.fromkeys(s for r in results.values() for s in r["heldout"])
  )
  header = ["source", *names]
  if len(names) > 1:
    header.append(f"Δ loss ({names[-1]} - {names[0]})")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for source in sources:
    per = [results[n]["heldout"].get(source) for n in names]
    row = [source] + [
      f"{m['loss']:.4f} ({m['perplexity']:.2f})" if m else "-" for m in per
    ]
    if len(names) > 1:
      row.append(
        f"{per[-1]['loss'] - per[0]['loss']:+.4f}"
        if per[0] and per[-1]
        else "-"
      )
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def top_level(result: dict) -> list[str]:
  """Tasks and groups asked for: those no group lists as its subtask."""
  inner = {t for ts in result.get("group_subtasks", {}).values() for t in ts}
  names = [*result.get("groups", {}), *result.get("results", {})]
  return [t for t in dict.fromkeys(names) if t not in inner]


def _signed(value: float, base: float | None) -> str:
  return "" if base is None else f" ({value - base:+.3f})"


def summary_table(results: dict) -> str:
  """Markdown, one row per checkpoint: held-out loss per source, then each
  task's main metric (report.MAIN_METRICS), with the change from the
  first checkpoint in parentheses."""
  names = list(results)
  sources = list(
    dict.fromkeys(s for r in results.values() for s in r["heldout"])
  )
  harness = {n: r.get("harness") or {} for n, r in results.items()}
  rows = report_lib.metric_rows(harness)
  columns = []  # (task, the row shown for it)
  for task in dict.fromkeys(t for h in harness.values() for t in top_level(h)):
    row = report_lib.main_metric(rows, task)
    if row is not None:
      columns.append(row)
  header = (
    ["checkpoint"]
    + [f"{s} loss" for s in sources]
    + [f"{r.alias} {r.metric}" for r in columns]
  )
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  first = results[names[0]]
  for k, name in enumerate(names):
    r, cells = results[name], [name]
    for s in sources:
      m, b = r["heldout"].get(s), first["heldout"].get(s)
      cells.append(
        "-"
        if not m
        else f"{m['loss']:.3f}"
        + _signed(m["loss"], b["loss"] if k and b else None)
      )
    for row in columns:
      v, b = row.values.get(name), row.values.get(names[0])
      cells.append(
        "-" if v is None else f"{v:.3f}" + _signed(v, b if k else None)
      )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _save_harness_files(name: str, result: dict, out_dir: str) -> None:
  """The harness's own results JSON and per-sample files, as `lm_eval
  --output_path OUT/harness --log_samples` writes them."""
  from lm_eval.loggers import EvaluationTracker

  result = dict(result)
  samples = result.pop("samples", None)
  tracker = EvaluationTracker(output_path=os.path.join(out_dir, "harness"))
  tracker.general_config_tracker.model_name = name
  tracker.general_config_tracker.model_name_sanitized = name
  tracker.save_results_aggregated(results=result, samples=samples)
  for task in result.get("configs", {}) if samples else ():
    tracker.save_results_samples(task_name=task, samples=samples[task])


def write_report(results: dict, out_dir: str) -> list[str]:
  """report.md, report.json, the harness's files and PNG charts; returns
  the files written (the harness's folder once)."""
  os.makedirs(out_dir, exist_ok=True)
  names = list(results)
  harness = {n: r["harness"] for n, r in results.items() if r.get("harness")}
  rows = report_lib.metric_rows(harness)
  text = (
    "# Forgetting report\n\n## Summary (change from "
    f"{names[0]} in parentheses)\n\n"
    + summary_table(results)
    + "\n## Held-out loss (perplexity) per source\n\n"
    + heldout_table(results)
  )
  if harness:
    text += (
      "\n## Benchmarks (lm-evaluation-harness)\n\n"
      + report_lib.comparison_table(rows, list(harness))
      + "\nΔ: the change from the first checkpoint; *: |Δ| exceeds the "
      "stderr of the difference, sqrt(se_first² + se²).\n"
    )
  written = [
    os.path.join(out_dir, "report.md"),
    os.path.join(out_dir, "report.json"),
  ]
  report_lib.write_json(
    written[1],
    {
      n: {
        "heldout": r["heldout"],
        "harness": {
          k: r["harness"][k] for k in _HARNESS_KEYS if k in r["harness"]
        }
        if r.get("harness")
        else None,
      }
      for n, r in results.items()
    },
  )
  for name, result in harness.items():
    _save_harness_files(name, result, out_dir)
  if harness:
    written.append(os.path.join(out_dir, "harness"))
  path = os.path.join(out_dir, "heldout.png")
  report_lib.bar_chart(
    {
      n: {s: (m["loss"], None) for s, m in r["heldout"].items()}
      for n, r in results.items()
    },
    path,
    title="Held-out loss per source (lower is better)",
    ylabel="loss (nats per token)",
  )
  written.append(path)
  if harness:
    shown = [
      r
      for t in dict.fromkeys(x for h in harness.values() for x in top_level(h))
      if (r := report_lib.main_metric(rows, t)) is not None
    ]
    path = os.path.join(out_dir, "benchmarks.png")
    report_lib.bar_chart(
      {
        n: {
          f"{r.alias}\n{r.metric}": (r.values.get(n), r.stderrs.get(n))
          for r in shown
        }
        for n in harness
      },
      path,
    )
    written.append(path)
  fileio.atomic_write(written[0], text)
  return written


def report(
  program,
  pipe,
  checkpoints: dict[str, str],
  opts: benchmarks.Options | None,
  out_dir: str,
  manager=None,
  **kw,
) -> dict:
  """Evaluates every checkpoint in order and writes the report (process 0
  only); returns {checkpoint: {"heldout": ..., "harness": ...}}."""
  if len(set(checkpoints)) != len(checkpoints) or not checkpoints:
    raise ConfigError("give one or more checkpoints with distinct names")
  if opts is not None:
    manager = manager or benchmarks.task_manager(opts)
    benchmarks.check_tasks(opts.task_names(), manager)
  results = {}
  for name, path in checkpoints.items():
    params = load_params(path, program)
    results[name] = evaluate_checkpoint(
      program, params, pipe, opts, manager, **kw
    )
    del params
  if jax.process_index() == 0:
    write_report(results, out_dir)
  return results
