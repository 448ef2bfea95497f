"""Scoring throughput of lm-evaluation-harness with `--model gemma_jax`
against `--model hf`, on the same tiny model, side by side in one run.

    OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu python scripts/bench_harness.py \\
        --batch-size 8 --repeats 2

A random two-layer Gemma 2 (the tests' model) is exported to Hugging Face;
both models run the harness's own tasks on the tiny local copies of
gemma_jax/evals/testing.py (every request type: loglikelihood,
loglikelihood_rolling, generate_until). Each model runs the tasks
--repeats times; the first run of gemma_jax includes its compiles, so the
best run is reported with the first. Requests are counted from the
harness's logged samples.
"""

import argparse
import dataclasses
import os
import pathlib
import tempfile
import time


def count_requests(results) -> int:
  return sum(
    len(s["arguments"])
    for samples in results["samples"].values()
    for s in samples
    if s["filter"] in ("none", "strict-match")
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--max-gen-toks", type=int, default=24)
  args = parser.parse_args()
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")

  import lm_eval
  import torch
  from lm_eval.tasks import TaskManager

  import gemma_jax.evals.harness  # noqa: F401  (registers gemma_jax)
  from gemma_jax.checkpoint import hf
  from gemma_jax.checkpoint.testing import random_params
  from gemma_jax.data import testing
  from gemma_jax.evals.testing import TASKS, write_tasks
  from gemma_jax.model.testing import TINY_GEMMA2_MQA
  from gemma_jax.tokenizer import Tokenizer

  torch.set_num_threads(1)
  root = tempfile.mkdtemp(prefix="bench_harness_")
  tok = Tokenizer.load(testing.tiny_tokenizer(os.path.join(root, "t.model")))
  cfg = dataclasses.replace(
    TINY_GEMMA2_MQA, sliding_window=8, vocab_size=tok.vocab_size
  )
  directory = os.path.join(root, "hf")
  hf.save(directory, random_params(cfg, scale=0.2), cfg, tokenizer=tok)
  tasks = write_tasks(pathlib.Path(root) / "tasks")
  manager = TaskManager(include_path=str(tasks), include_defaults=False)
  models = {
    "gemma_jax": f"checkpoint={directory}",
    "hf": f"pretrained={directory},dtype=float32,attn_implementation=eager",
  }
  print(
    f"{len(TASKS)} task formats, batch size {args.batch_size}, "
    f"max_gen_toks {args.max_gen_toks}"
  )
  print(
    "| model | requests | first run (s) | best run (s) | requests/s (best) |"
  )
  print("|---|---|---|---|---|")
  for name, model_args in models.items():
    times, n = [], 0
    for _ in range(args.repeats):
      start = time.perf_counter()
      results = lm_eval.simple_evaluate(
        model=name,
        model_args=model_args,
        tasks=[f"local_{t}" for t in TASKS],
        batch_size=args.batch_size,
        log_samples=True,
        gen_kwargs=f"max_gen_toks={args.max_gen_toks}",
        device="cpu",
        task_manager=manager,
      )
      times.append(time.perf_counter() - start)
      n = count_requests(results)
    best = min(times)
    print(
      f"| {name} | {n} | {times[0]:.1f} | {best:.1f} | {n / best:.1f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
