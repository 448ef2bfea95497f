"""Throughput of the data pipeline on the default corpus, vs tiny CPU training.

    python scripts/bench_data.py [--corpus DIR] [--batch 8] [--seq-len 128]
        [--steps 400] [--workers 2] [--no-train]

Prints rows/s and tokens/s of: random-access `batch(step)`, `iterate` with
prefetch threads, and `iterate` with grain worker processes; then the tokens/s
that one tiny-gemma2 training step (forward, backward, AdamW) consumes on this
CPU, and the ratio.

    python scripts/bench_data.py --prepare [--copies 2] [--pod-seq-len 8192]

instead measures `gemma-jax data prepare` (tokens/s and MB/s of text at 1
and 2 worker processes, on the standard library's sources written as
.jsonl.gz files, with the default corpus's tokenizer), then the read
throughput of the pipeline on that prepared dataset at the pods' sequence
length (`iterate` with prefetch, tokens/s per host), against what one host
of each pod config consumes at its step time (docs/pods.md).
"""

import argparse
import gzip
import json
import os
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MFU = 0.5  # docs/pods.md's step times: analytic FLOPs at 50% MFU


def pod_needs():
  """(config, hosts, step time in s, tokens/s one host consumes) for every
  configs/pods/*.yaml on the topology its header names: the global batch x
  sequence length per step, at the step time its analytic FLOPs
  (train.metrics.model_flops_per_token, the MFU convention) take at 50% of
  the chips' peak, shared by its hosts (one per 4 chips). Upper bounds where
  a config trains less than a full model (LoRA) or runs a teacher too."""
  import glob
  import re

  from gemma_jax.hardware import CHIPS
  from gemma_jax.launch.slices import parse_tpu
  from gemma_jax.train.config import load_config
  from gemma_jax.train.metrics import model_flops_per_token

  for path in sorted(glob.glob(os.path.join(ROOT, "configs/pods/*.yaml"))):
    with open(path) as f:
      launch = re.search(r"--topology (\S+)(?: --slices (\d+))?", f.read())
    assert launch, f"{path}: its header names no --topology"
    tpu, slices = parse_tpu(launch[1]), int(launch[2] or 1)
    cfg = load_config(path)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops = model_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    peak = CHIPS[tpu.generation].peak_flops * tpu.chips * slices
    step_s = flops / (peak * MFU)
    hosts = tpu.gke_nodes * slices
    name = os.path.basename(path).removesuffix(".yaml")
    yield (
      f"{name} ({tpu}{f' x {slices}' if slices > 1 else ''})",
      (
        hosts,
        step_s,
        tokens / step_s / hosts,
      ),
    )


def measure(fn, steps: int, rows: int, seq_len: int) -> tuple[float, float]:
  fn(0)  # warm up: opens epochs, spawns workers
  start = time.perf_counter()
  for i in range(1, steps + 1):
    fn(i)
  dt = time.perf_counter() - start
  return steps * rows / dt, steps * rows * seq_len / dt


def train_tokens_per_sec(batch: dict, steps: int = 10) -> float:
  """tiny-gemma2 train steps (value_and_grad + AdamW, jitted) on this CPU."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax.linen import meta

  from gemma_jax.model import Transformer, preset

  model = Transformer(preset("tiny-gemma2"))
  arrays = {k: jnp.asarray(v) for k, v in batch.items()}
  params = meta.unbox(model.init(jax.random.key(0), arrays["inputs"])["params"])
  opt = optax.adamw(1e-3)
  state = opt.init(params)

  def loss_fn(p, b):
    logits = model.apply(
      {"params": p}, b["inputs"], b["positions"], b["segment_ids"]
    )
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
    return (nll * b["loss_mask"]).sum() / jnp.maximum(b["loss_mask"].sum(), 1)

  @jax.jit
  def step(p, s, b):
    loss, grads = jax.value_and_grad(loss_fn)(p, b)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  params, state, loss = step(params, state, arrays)
  loss.block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    params, state, loss = step(params, state, arrays)
  loss.block_until_ready()
  return steps * batch["inputs"].size / (time.perf_counter() - start)


def write_inputs(out_dir: str, copies: int, files: int = 8) -> int:
  """The standard library's sources, `copies` times, as `files` .jsonl.gz
  files of one document per source file; returns the bytes of text."""
  from gemma_jax.data import corpus

  paths = corpus.stdlib_files(6_000_000)
  texts = [corpus._read(p) for p in paths] * copies
  os.makedirs(out_dir, exist_ok=True)
  for i in range(files):
    with gzip.open(os.path.join(out_dir, f"part-{i:03d}.jsonl.gz"), "wt") as f:
      for t in texts[i::files]:
        f.write(json.dumps({"text": t}) + "\n")
  return sum(len(t.encode()) for t in texts)


def bench_prepare(args) -> None:
  from gemma_jax import configlib
  from gemma_jax.data import DataConfig, build_pipeline, corpus, prepare_files
  from gemma_jax.tokenizer import Tokenizer

  data = corpus.build_default_corpus(args.corpus or corpus.DEFAULT_DIR)
  tok = Tokenizer.load(data["tokenizer"])
  load = os.getloadavg()
  print(
    f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
    f"{os.cpu_count()} cores (others' work counts against these numbers)"
  )
  with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
    text_bytes = write_inputs(os.path.join(tmp, "in"), args.copies)
    inputs = [os.path.join(tmp, "in", "*.jsonl.gz")]
    for workers in (1, 2):
      out = os.path.join(tmp, f"tfds{workers}")
      start = time.perf_counter()
      meta = prepare_files.prepare_files(
        "bench",
        out,
        inputs,
        tok,
        prepare_files.Options(),
        workers=workers,
        work_dir=os.path.join(tmp, f"work{workers}"),
      )
      dt = time.perf_counter() - start
      tokens = meta["train"]["num_tokens"]
      print(
        f"  prepare, {workers} worker(s): {meta['train']['num_docs']} docs, "
        f"{tokens} tokens in {dt:.1f} s: {tokens / dt:10.0f} tokens/s, "
        f"{text_bytes / dt / 1e6:.2f} MB/s of text "
        f"({tokens / dt / workers:.0f} tokens/s per worker)"
      )
    try:
      import apache_beam  # noqa: F401

      from gemma_jax.data import beam
    except ImportError:
      beam = None  # the `beam` extra is not installed
    if beam is not None:
      start = time.perf_counter()
      meta = beam.prepare_with_beam(
        "bench",
        os.path.join(tmp, "tfds-beam"),
        inputs,
        data["tokenizer"],
        prepare_files.Options(),
        beam_options="--runner=DirectRunner",
        work_dir=os.path.join(tmp, "work-beam"),
      )
      dt = time.perf_counter() - start
      tokens = meta["train"]["num_tokens"]
      print(
        f"  prepare, Beam DirectRunner: {tokens} tokens in {dt:.1f} s: "
        f"{tokens / dt:10.0f} tokens/s, {text_bytes / dt / 1e6:.2f} MB/s"
      )
    cfg = {
      "seq_len": args.pod_seq_len,
      "tokenizer": data["tokenizer"],
      "sources": {
        "bench": {
          "kind": "tfds",
          "name": "bench",
          "data_dir": os.path.join(tmp, "tfds1"),
        }
      },
    }
    pipe = build_pipeline(
      configlib.from_dict(DataConfig, cfg, "data"), args.batch
    )
    stream = pipe.iterate(0)
    rows, read = measure(
      lambda _: next(stream), args.steps, args.batch, args.pod_seq_len
    )
    stream.close()
    print(
      f"  read, iterate with prefetch, seq_len {args.pod_seq_len}, "
      f"batch {args.batch}: {rows:.1f} rows/s, {read:.0f} tokens/s"
    )
    margins = []
    for name, (hosts, step_s, need) in pod_needs():
      margins.append((read / need, hosts, name))
      print(
        f"  {name:40s} {hosts:5d} hosts, step {step_s:5.2f} s: consumes "
        f"{need:8.0f} tokens/s per host: margin {read / need:6.1f}x"
      )
    largest = max(margins, key=lambda m: m[1])
    hungriest = min(margins)
    print(
      f"  margin for the largest pod ({largest[2]}): {largest[0]:.1f}x; "
      f"the smallest margin ({hungriest[2]}): {hungriest[0]:.1f}x"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--corpus", default=None)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--no-train", action="store_true")
  parser.add_argument("--prepare", action="store_true")
  parser.add_argument("--copies", type=int, default=2)
  parser.add_argument("--pod-seq-len", type=int, default=8192)
  args = parser.parse_args()

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.prepare:
    bench_prepare(args)
    return
  from gemma_jax import configlib
  from gemma_jax.data import DataConfig, build_pipeline, corpus

  data = corpus.build_default_corpus(args.corpus or corpus.DEFAULT_DIR)
  data = {
    **data,
    "seq_len": args.seq_len,
    "stages": [
      {"start_step": 0, "weights": {"prose": 0.4, "code": 0.4, "math": 0.2}},
      {
        "start_step": args.steps // 2,
        "weights": {"prose": 0.2, "code": 0.2, "math": 0.6},
      },
    ],
  }
  b, t = args.batch, args.seq_len
  results = {}
  pipe = build_pipeline(configlib.from_dict(DataConfig, data, "data"), b)
  results["batch(step), random access"] = measure(pipe.batch, args.steps, b, t)
  for workers in (0, args.workers):
    cfg = configlib.from_dict(
      DataConfig, {**data, "num_workers": workers}, "data"
    )
    stream = build_pipeline(cfg, b).iterate(0)
    results[f"iterate, {workers} worker processes"] = measure(
      lambda _, stream=stream: next(stream), args.steps, b, t
    )
    stream.close()
  print(f"batch {b} x seq_len {t}, {args.steps} steps, default corpus")
  for name, (rows, tokens) in results.items():
    print(f"  {name:32s} {rows:10.0f} rows/s {tokens:12.0f} tokens/s")
  if not args.no_train:
    train = train_tokens_per_sec(pipe.batch(0))
    slowest = min(tok for _, tok in results.values())
    print(
      f"  {'tiny-gemma2 train step (CPU)':32s} {train / t:10.0f} rows/s "
      f"{train:12.0f} tokens/s"
    )
    print(
      f"  slowest pipeline mode feeds {slowest / train:.0f}x what tiny "
      "training consumes"
    )


if __name__ == "__main__":
  main()
