"""The forgetting report: checkpoints side by side on held-out data and
benchmarks, with the change from the first (the base) to each later one.

    program = TrainProgram(run_config)
    pipe = gemma_jax.data.pipeline_for(run_config)
    results = forgetting.report(program, pipe, {"base": "runs/base/params",
                                                "ewc": "runs/ewc"},
                                forgetting.load_tasks("tasks.yaml"), "out/")

Per checkpoint: per-source held-out loss and perplexity (the run config's
eval splits, the trainer's evaluation) and every task's metrics (scored as
lm-evaluation-harness scores them, gemma_jax.evals). Writes report.md (both
tables), report.json, items/<checkpoint>.jsonl (every document: each
choice's log-likelihood, the prediction, the gold) and PNG bar charts.

A task file is a YAML list; each entry names a reader and local files:

    - {kind: arc, path: ARC-Easy/ARC-Easy-Test.jsonl}
    - {kind: arc, name: arc_challenge,
       path: ARC-Challenge/ARC-Challenge-Test.jsonl}
    - {kind: mmlu, path: mmlu/data, num_fewshot: 5}
    - {kind: gsm8k, path: gsm8k/test.jsonl, shots: gsm8k/train.jsonl}
    - {kind: hellaswag, path: hellaswag/hellaswag_val.jsonl}
    - {kind: multiple_choice, path: mine.jsonl}      # {context, choices, gold}
    - {kind: generative, path: sums.jsonl, shots: sums_train.jsonl,
       num_fewshot: 3, max_gen_toks: 64}

Optional keys: name, shots (the few-shot file), num_fewshot (default: the
harness's for the benchmark), split (mmlu), max_gen_toks (generative;
default the harness's 256).
"""

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_jax import configlib, fileio
from gemma_jax.errors import CheckpointError, ConfigError
from gemma_jax.evals import evaluate, generation, scoring
from gemma_jax.evals import report as report_lib
from gemma_jax.evals import tasks as tasks_lib
from gemma_jax.sharding import rules
from gemma_jax.train import metrics

TASK_KINDS: dict[str, Callable[..., Any]] = {  # -> Task (mmlu: list)
  "arc": tasks_lib.arc,
  "hellaswag": tasks_lib.hellaswag,
  "gsm8k": tasks_lib.gsm8k,
  "mmlu": tasks_lib.mmlu,
  "multiple_choice": tasks_lib.multiple_choice,
  "generative": tasks_lib.generative,
}
_TASK_KEYS = (
  "kind",
  "path",
  "shots",
  "num_fewshot",
  "name",
  "split",
  "max_gen_toks",
)


def load_tasks(path) -> list[tasks_lib.Task]:
  """The tasks a YAML task file lists (see the module docstring)."""
  entries = configlib.load_yaml_list(path)
  found = []
  for i, entry in enumerate(entries):
    where = f"{path}: entry {i}"
    if not isinstance(entry, dict):
      raise ConfigError(f"{where}: expected a mapping, got {entry!r}")
    unknown = sorted(set(entry) - set(_TASK_KEYS))
    if unknown:
      raise ConfigError(
        f"{where}: unknown key {unknown[0]!r}; valid keys: "
        f"{', '.join(_TASK_KEYS)}"
      )
    kind = entry.get("kind")
    if kind not in TASK_KINDS:
      raise ConfigError(
        f"{where}: kind {kind!r} is not one of {', '.join(TASK_KINDS)}"
      )
    if "path" not in entry:
      raise ConfigError(f"{where}: needs a path")
    kw = {
      k: entry[k]
      for k in ("num_fewshot", "name", "shots", "split", "max_gen_toks")
      if entry.get(k) is not None
    }
    if "max_gen_toks" in kw and kind != "generative":
      raise ConfigError(
        f"{where}: `max_gen_toks` is for generative only "
        f"(gsm8k keeps the harness's {tasks_lib.MAX_GEN_TOKS})"
      )
    if kind == "mmlu":
      kw.pop("shots", None)  # MMLU's shots are its dev split
      found += tasks_lib.mmlu(entry["path"], **kw)
      continue
    if "split" in kw:
      raise ConfigError(f"{where}: `split` is for mmlu only")
    found.append(TASK_KINDS[kind](entry["path"], **kw))
  return found


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


def sharded_logprob_fn(program, params):
  """log p(target) [B, T] of rows split over the program's batch axes; 0 at
  mask 0. Each process passes the whole batch and keeps the result."""
  rows = NamedSharding(program.mesh, program.batch_sharding.spec)
  replicated = NamedSharding(program.mesh, P())

  @jax.jit
  def logprobs(params, inputs, targets, mask):
    t = inputs.shape[1]
    batch = {
      "inputs": inputs,
      "segment_ids": mask,
      "positions": jnp.broadcast_to(jnp.arange(t), inputs.shape),
    }
    logits = program.forward(params, program.frozen, batch)
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    out = picked - jax.nn.logsumexp(logits, axis=-1)
    return jax.lax.with_sharding_constraint(
      jnp.where(mask == 1, out, 0.0), replicated
    )

  def fn(inputs, targets, mask):
    # Every process holds the whole (small) batch: place it row-sharded.
    put = lambda x: jax.make_array_from_callback(
      x.shape, rows, lambda index: x[index]
    )
    with program.context():
      out = logprobs(params, put(inputs), put(targets), put(mask))
    return np.asarray(out.addressable_data(0))

  return fn


def _batch_size(requested: int, program) -> int:
  """Rows per scoring batch: a multiple of the batch shards."""
  axes = rules.axes_of(program.batch_sharding.spec[0])
  shards = math.prod(program.mesh.shape[a] for a in axes)
  return max(shards, -(-requested // shards) * shards)


def evaluate_checkpoint(
  program,
  params,
  pipe,
  tasks,
  tokenizer,
  *,
  eval_batches: int = 4,
  batch_size: int = 8,
  max_length: int = scoring.HF_MAX_LENGTH,
):
  """({"heldout": {source: {loss, perplexity, tokens}}, "tasks": {task:
  metrics}}, per-document items) of one set of params."""
  heldout = metrics.evaluate(program, params, pipe, eval_batches)
  results: dict[str, dict] = {}
  items: list[dict] = []
  if tasks:
    progress = scoring.print_progress("scoring")
    ll = scoring.make_loglikelihood_fn(
      params,
      program.cfg.model,
      tokenizer,
      _batch_size(batch_size, program),
      max_length,
      logprob_fn=sharded_logprob_fn(program, params),
      progress=progress,
    )
    gen = generation.make_generate_fn(
      params,
      program.cfg.model,
      tokenizer,
      batch_size,
      max_length,
      progress=progress,
    )
    results, items = evaluate.evaluate_tasks(tasks, ll, gen)
  return {"heldout": heldout, "tasks": results}, items


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


def _signed(value: float, base: float | None) -> str:
  return "" if base is None else f" ({value - base:+.3f})"


def summary_table(results: dict) -> str:
  """Markdown, one row per checkpoint: held-out loss per source, then each
  task's first metric (report.chart_metric), with the change from the
  first checkpoint in parentheses."""
  names = list(results)
  sources = list(
    dict.fromkeys(s for r in results.values() for s in r["heldout"])
  )
  tasks = {n: r["tasks"] for n, r in results.items()}
  columns = []  # (task, the metric shown for it)
  for t in report_lib.task_names(tasks):
    m = report_lib.chart_metric(tasks, t)
    if m is not None:
      columns.append((t, m))
  header = (
    ["checkpoint"]
    + [f"{s} loss" for s in sources]
    + [f"{t} {m.split(',')[-1]}" for t, m in columns]
  )
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  first = results[names[0]]
  for k, name in enumerate(names):
    r, row = results[name], [name]
    for s in sources:
      m, b = r["heldout"].get(s), first["heldout"].get(s)
      row.append(
        "-"
        if not m
        else f"{m['loss']:.3f}"
        + _signed(m["loss"], b["loss"] if k and b else None)
      )
    for t, metric in columns:
      m, b = r["tasks"].get(t, {}), first["tasks"].get(t, {})
      row.append(
        "-"
        if metric not in m
        else f"{m[metric]:.3f}"
        + _signed(m[metric], b.get(metric) if k else None)
      )
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def write_report(results: dict, items: dict, out_dir: str) -> list[str]:
  """report.md, report.json, items/<name>.jsonl and PNG charts; returns the
  files written."""
  os.makedirs(os.path.join(out_dir, "items"), exist_ok=True)
  tasks = {n: r["tasks"] for n, r in results.items()}
  text = (
    "# Forgetting report\n\n## Summary (change from "
    f"{next(iter(results))} in parentheses)\n\n"
    + summary_table(results)
    + "\n## Held-out loss (perplexity) per source\n\n"
    + heldout_table(results)
  )
  if any(tasks.values()):
    text += "\n## Benchmarks\n\n" + report_lib.markdown_table(tasks)
  written = [
    os.path.join(out_dir, "report.md"),
    os.path.join(out_dir, "report.json"),
  ]
  fileio.atomic_write(written[0], text)
  report_lib.write_json(written[1], results)
  for name, its in items.items():
    path = os.path.join(out_dir, "items", f"{name}.jsonl")
    report_lib.write_items(path, its)
    written.append(path)
  heldout = {
    n: {f"heldout {s}": {"loss": m["loss"]} for s, m in r["heldout"].items()}
    for n, r in results.items()
  }
  path = os.path.join(out_dir, "heldout.png")
  report_lib.bar_chart(
    heldout,
    path,
    {t: "loss" for r in heldout.values() for t in r},
    title="Held-out loss per source (lower is better)",
  )
  written.append(path)
  if any(tasks.values()):
    path = os.path.join(out_dir, "benchmarks.png")
    report_lib.bar_chart(tasks, path)
    written.append(path)
  return written


def report(
  program, pipe, checkpoints: dict[str, str], tasks, out_dir: str, **kw
) -> dict:
  """Evaluates every checkpoint in order and writes the report; returns
  {checkpoint: {"heldout": ..., "tasks": ...}}."""
  if len(set(checkpoints)) != len(checkpoints) or not checkpoints:
    raise ConfigError("give one or more checkpoints with distinct names")
  results, items = {}, {}
  for name, path in checkpoints.items():
    params = load_params(path, program)
    results[name], items[name] = evaluate_checkpoint(
      program, params, pipe, tasks, pipe.tokenizer, **kw
    )
    del params
  if jax.process_index() == 0:
    write_report(results, items, out_dir)
  return results
